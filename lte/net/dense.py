"""The dense path of a round: owner-computes reduce, then all-gather (design notes §2).

For a layer where the group is large enough (`M r >= 2 in out / (in + out)`), moving the merged dense delta costs
each peer less than fetching everybody's factors. Every member splits its float32 delta B A - B' A' of each dense
layer into M row slices; member j owns slice j, fetches that slice from every other member, reduces it in float64
in sorted peer order with the same `merge_contributions` the coordinator uses on whole matrices, and serves the
resulting new base rows; everyone then fetches every owner's rows. Each peer receives about 2 (M-1)/M of a layer
instead of (M-1) factor pairs.

Slice addresses are announced in plain DHT records. Nothing here is trusted: every slice and every owner's rows
are checked for shape, dtype and finiteness, any failure makes the peer fall back to the factor path (which gives
the same bytes), and the peer checks the resulting base against the coordinator's signed hash.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
from torch import Tensor

from lte.merge import HeadContribution, merge_contributions
from lte.net import NetworkError
from lte.net.blobs import BlobService
from lte.net.errors import BlobUnreachable
from lte.net.records import publish, read
from lte.net.rounds import DENSE_REDUCED, DENSE_SLICES, Digest, fetch_from, member_delta
from lte.validate import Rejected, check_tensors


# A member whose announcement is this late gets dialled to tell slow from dead (see `_wait_for`).
PROBE_AFTER_S = 1.0
NO_BLOB = "0" * 64  # an address no blob has: asking for it costs a round trip and tells whether the peer answers


def row_bounds(rows: int, owners: int) -> list[tuple[int, int]]:
    return [(i * rows // owners, (i + 1) * rows // owners) for i in range(owners)]


def _wait_for(dht, blobs: BlobService, key: str, names: Sequence[str], deadline: float) -> dict:
    """Every member's announcement under `key`. A member that has not announced after `PROBE_AFTER_S` is dialled
    (a request for a blob nobody has): one that cannot be reached is dead, and waiting out the deadline for it
    would only delay the fallback to the factor path, which fetches its factors from the coordinator."""
    probe_at = time.monotonic() + PROBE_AFTER_S
    while True:
        entries = read(dht, key)
        entries = entries if isinstance(entries, dict) else {}
        missing = [n for n in names if n not in entries]
        if not missing:
            return entries
        if time.monotonic() > deadline:
            raise NetworkError(f"dense path: no announcement from {', '.join(n[-8:] for n in missing)} in time")
        if time.monotonic() > probe_at:
            for pid in missing:
                try:
                    blobs.fetch(pid, NO_BLOB, kind=DENSE_SLICES, timeout=min(5.0, max(1.0, deadline - time.monotonic())))
                except BlobUnreachable:
                    raise NetworkError(f"dense path: {pid[-8:]} cannot be reached (gone since the commit)") from None
                except NetworkError:
                    pass  # it answered (not found), or was slow: alive as far as we can tell
            probe_at = time.monotonic() + PROBE_AFTER_S
        time.sleep(0.1)


def dense_exchange(dht, blobs: BlobService, run: str, round_id: int, me: str, members: Mapping[str, Digest],
                   own: Mapping[str, tuple[Tensor, Tensor]], own_prev: Mapping[str, tuple[Tensor, Tensor]] | None,
                   base: Mapping[str, Tensor], layers: Sequence[str], scale: float, timeout: float,
                   denominator: float = 0.0) -> dict[str, Tensor]:
    """New base weights of `layers` (keys `<layer>.weight`) after round `round_id`, via owner-computes reduce
    (`denominator`: the run's lte.round_samples, as the coordinator's merge uses it).
    Raises NetworkError for anything that goes wrong, including malformed announcements from other members."""
    try:
        return _exchange(dht, blobs, run, round_id, me, members, own, own_prev, base, layers, scale, timeout,
                         denominator)
    except NetworkError:
        raise
    except Exception as err:  # unsigned records and others' blobs can hold anything: never crash the peer for it
        raise NetworkError(f"dense path: {type(err).__name__}: {err}") from None


def _exchange(dht, blobs, run, round_id, me, members, own, own_prev, base, layers, scale, timeout, denominator):
    owners = sorted(members)
    pos = owners.index(me)
    deadline = time.monotonic() + timeout
    deltas = {l: member_delta(*own[l], own_prev[l] if own_prev else None) for l in layers}
    bounds = {l: row_bounds(deltas[l].shape[0], len(owners)) for l in layers}

    def rows(t: Tensor, l: str, j: int) -> Tensor:
        lo, hi = bounds[l][j]
        return t[lo:hi].contiguous()

    def checked(what: str, tensors: list[Tensor], j: int) -> list[Tensor]:
        shapes = [(bounds[l][j][1] - bounds[l][j][0], deltas[l].shape[1]) for l in layers]
        try:
            return check_tensors(what, tensors, shapes)
        except Rejected as err:  # fall back to the factors, which are checked like at the coordinator
            raise NetworkError(f"dense path: {err}") from None

    # 1. Serve one slice of my delta to each owner, and say where.
    shas = [blobs.put([rows(deltas[l], l, j) for l in layers], kind=DENSE_SLICES, round_id=round_id)
            for j in range(len(owners))]
    slice_key, reduced_key = f"lte.{run}.dense.{round_id}", f"lte.{run}.reduced.{round_id}"
    publish(dht, slice_key, {"s": shas}, ttl=300, subkey=me)
    # 2. Own slice `pos`: gather it from everyone, reduce exactly like the coordinator does on whole matrices.
    announced = _wait_for(dht, blobs, slice_key, [o for o in owners if o != me], deadline)
    mine = {}
    for pid in owners:
        if pid == me:
            mine[pid] = [rows(deltas[l], l, pos) for l in layers]
        else:
            sha = announced[pid]["s"][pos]
            mine[pid] = checked(f"slice from {pid}", fetch_from(blobs, [pid], [sha], DENSE_SLICES, round_id,
                                                                max(1.0, deadline - time.monotonic()))[0], pos)
    contributions = [HeadContribution(pid, members[pid].n, {}, {}, None, dict(zip(layers, mine[pid]))) for pid in owners]
    update = merge_contributions(contributions, scale, denominator, {})  # no replicas on the dense path
    new_rows = [(rows(base[f"{l}.weight"], l, pos).to(torch.float64) + update.deltas[l]).to(base[f"{l}.weight"].dtype)
                for l in layers]
    reduced = blobs.put(new_rows, kind=DENSE_REDUCED, round_id=round_id)
    publish(dht, reduced_key, reduced, ttl=300, subkey=me)
    # 3. All-gather the owners' rows.
    done = _wait_for(dht, blobs, reduced_key, [o for o in owners if o != me], deadline)
    parts = {}
    for j, pid in enumerate(owners):
        parts[j] = new_rows if pid == me else checked(f"rows from {pid}", fetch_from(
            blobs, [pid], [done[pid]], DENSE_REDUCED, round_id, max(1.0, deadline - time.monotonic()))[0], j)
    return {f"{l}.weight": torch.cat([parts[j][i] for j in range(len(owners))], 0) for i, l in enumerate(layers)}
