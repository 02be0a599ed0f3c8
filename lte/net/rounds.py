"""The LTE round protocol on top of the generic transport: record names and formats, and the merge of a round.

Both the coordinator and the peers import this module, so they read and write the same records and merge a
committed round with the same code, which is what keeps their bases bitwise identical. See docs/protocol.md.

Factors travel one blob per layer, listed by a small manifest blob, so that a receiver fetches only the layers it
merges from factors; layers where the dense path is cheaper for the group that formed go through `lte.net.dense`.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lte.costs import layer_cost
from lte.merge import HeadContribution
from lte.validate import Rejected, check_tensors
from lte.net.blobs import BlobService
from lte.wire import Layout, unpack_replicas

PROTOCOL_VERSION = 3  # 3: digests carry their round, commits carry rejections and the norm bound

_HEX64 = re.compile(r"[0-9a-f]{64}")

# Blob kinds: traffic is counted per kind.
FACTORS, PREV_FACTORS, REPLICAS, BASE, MANIFEST = "factors", "factors_prev", "replicas", "base", "manifest"
DENSE_SLICES, DENSE_REDUCED = "dense_slices", "dense_reduced"
CHECKPOINT = "checkpoint"  # checkpoint files (model.safetensors, meta.json) served as file blobs
DATA = "data"  # the run's training data: shard files and their signed manifest, served as file blobs


def spec_key(coordinator_peer_id: str) -> str:
    """Keyed by the coordinator's peer id, which a joining peer reads from the --dht address it was given."""
    return f"lte.run.{coordinator_peer_id}"


def base_key(run: str) -> str:
    return f"lte.{run}.base"


def commit_key(run: str, round_id: int) -> str:
    return f"lte.{run}.commit.{round_id}"


def checkpoints_key(run: str) -> str:
    """The coordinator's signed list of the checkpoints it serves (round, file blob addresses, base hash)."""
    return f"lte.{run}.checkpoints"


def providers_key(run: str, round_id: int) -> str:
    """Peers that serve the checkpoint of round `round_id` (its model file blob, and its meta.json), besides the
    coordinator: a download still works when the coordinator is gone."""
    return f"lte.{run}.ckpt.{round_id}"


def data_holders_key(run: str) -> str:
    """Which shards each peer holds (and serves, unless in client mode) and which it is about to fetch: a joining
    peer starts on the shards fewest peers have, and fetches them from these peers besides the coordinator."""
    return f"lte.{run}.data.holders"


def alive_key(run: str) -> str:
    """Peers announce themselves here each round with their local training time, so the coordinator can size the
    next window for every live peer, including those that missed the last round."""
    return f"lte.{run}.alive"


def run_prefix(run: str) -> str:
    """The averager and servicer namespace of a run (hivemind forbids dots there)."""
    return "lte_" + "".join(c if c.isalnum() else "_" for c in run)


@dataclass(frozen=True)
class Digest:
    """What a participant announces when it joins round k (gathered by every member; must stay tiny).

    `f`, `r`: addresses of its factors manifest and replicas blob; `v`: address of the factors manifest whose
    products are its V (empty when V is zero); `n`: samples since its last merge; `loss`: mean local loss of those
    steps; `t`: seconds its local training took (the coordinator sizes the next round's window from it);
    `client`: it cannot be reached, so its blobs are served by the coordinator; `k`: the round (base version) it
    trained on, which must be the round it joins; `a`: the multiaddrs it can be reached at (empty in client mode),
    so that members dial each other directly instead of relying on libp2p's peer routing to find them. The
    coordinator joins with `coordinator=True`.
    """

    f: str = ""
    r: str = ""
    v: str = ""
    n: int = 0
    loss: float = 0.0
    t: float = 0.0
    spec: str = ""
    client: bool = False
    coordinator: bool = False
    k: int = -1
    a: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dict(f=self.f, r=self.r, v=self.v, n=self.n, loss=self.loss, t=self.t, spec=self.spec,
                    client=self.client, c=self.coordinator, k=self.k, a=list(self.a))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Digest":
        return cls(f=str(d.get("f", "")), r=str(d.get("r", "")), v=str(d.get("v", "")), n=int(d.get("n", 0)),
                   loss=float(d.get("loss", 0.0)), t=float(d.get("t", 0.0)), spec=str(d.get("spec", "")),
                   client=bool(d.get("client", False)), coordinator=bool(d.get("c", False)), k=int(d.get("k", -1)),
                   a=_addresses(d.get("a")))


MAX_CONCURRENT_MEMBERS = 8  # members whose blobs a merge fetches at once (as the coordinator's MAX_CONCURRENT_FETCHES)
MAX_ADDRESSES = 8  # a host's addresses fit; a digest must stay tiny (lte.net.membership.MAX_DIGEST_BYTES)


def _addresses(value: Any) -> tuple[str, ...]:
    """A digest's address list as announced by anyone: strings only, a few, short (BlobService parses them)."""
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(a for a in value if isinstance(a, str) and len(a) < 300)[:MAX_ADDRESSES]


# ----- base blobs -------------------------------------------------------------------------------------------------
def base_to_tensors(state: Mapping[str, Tensor]) -> list[Tensor]:
    """A base state dict as a blob (sorted keys; the keys themselves come from the run's model)."""
    return [state[k].detach().cpu().contiguous() for k in sorted(state)]


def base_from_tensors(keys: list[str], tensors: list[Tensor]) -> dict[str, Tensor]:
    if len(keys) != len(tensors):
        raise ValueError(f"base blob has {len(tensors)} tensors, the model has {len(keys)}")
    return dict(zip(sorted(keys), tensors))


# ----- factor blobs -----------------------------------------------------------------------------------------------
def put_factors(blobs: BlobService, layout: Layout, factors: Sequence[Tensor], round_id: int, wire: str) -> str:
    """Store one blob per layer (A, B) and a manifest listing them; returns the manifest's address."""
    shas = [blobs.put(factors[2 * i:2 * i + 2], kind=FACTORS, round_id=round_id, wire=wire)
            for i in range(len(layout.layers))]
    return blobs.put([torch.frombuffer(bytearray("".join(shas).encode()), dtype=torch.uint8)], kind=MANIFEST,
                     round_id=round_id)


def _manifest_shas(tensors: Sequence[Tensor], layout: Layout) -> dict[str, str]:
    """The per-layer blob addresses a manifest lists; raises Rejected for anything but 64 hex digits per layer."""
    check_tensors("manifest", tensors, [(64 * len(layout.layers),)], torch.uint8)
    text = bytes(tensors[0].numpy()).decode("ascii", errors="replace")
    shas = [text[i:i + 64] for i in range(0, len(text), 64)]
    if not all(_HEX64.fullmatch(s) for s in shas):
        raise Rejected("malformed", "manifest holds something other than blob addresses")
    return dict(zip(layout.layers, shas))


def local_factors(blobs: BlobService, layout: Layout, manifest: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors of a manifest held locally, as every receiver decodes them (used by the sender for its own V)."""
    shas = _manifest_shas(blobs.store.tensors(manifest), layout)
    out = {}
    for layer, sha in shas.items():
        a, b = blobs.store.tensors(sha)
        out[layer] = (a.float(), b.float())
    return out


def fetch_from(blobs: BlobService, sources: Sequence[str], shas: Sequence[str], kind: str, round_id: int,
               timeout: float) -> list[list[Tensor]]:
    """Fetch blobs in parallel from the first source that has them all, trying the next source for the rest."""
    got: dict[str, list[Tensor]] = {}
    last: Exception | None = None
    for src in sources:
        missing = [s for s in dict.fromkeys(shas) if s not in got]
        if not missing:
            break
        try:
            for sha, tensors in zip(missing, blobs.fetch_many([(src, s) for s in missing], kind=kind, timeout=timeout,
                                                              keep=True, round_id=round_id)):
                got[sha] = tensors
        except Exception as err:  # some or all failed: fetch_many stored the ones that arrived; retry the rest
            last = err
            for s in missing:
                if s in blobs.store:
                    got[s] = blobs.store.tensors(s)
    if any(s not in got for s in shas):
        raise last if last is not None else KeyError("no source for blobs")
    return [got[s] for s in shas]


def _factors_of(blobs, layout, sources, manifest, layers, kind, round_id, timeout):
    """Checked factors of the given layers (raises Rejected for a blob that breaks the run's layout)."""
    shas = _manifest_shas(fetch_from(blobs, sources, [manifest], MANIFEST, round_id, timeout)[0], layout)
    shapes = dict(zip(layout.layers, layout.factor_shapes))
    fetched = fetch_from(blobs, sources, [shas[l] for l in layers], kind, round_id, timeout)
    return {l: tuple(check_tensors(f"factors of {l}", t, shapes[l])) for l, t in zip(layers, fetched)}


def member_delta(a: Tensor, b: Tensor, prev: tuple[Tensor, Tensor] | None) -> Tensor:
    """A head's dense delta B A - B' A' as it goes over the dense path: computed in float64, sent as float32.

    The coordinator merges dense-path layers from this same float32 value, so both paths give one result.
    """
    d = b.to(torch.float64) @ a.to(torch.float64)
    if prev is not None:
        d = d - prev[1].to(torch.float64) @ prev[0].to(torch.float64)
    return d.to(torch.float32)


def fetch_contributions(blobs: BlobService, layout: Layout, members: Mapping[str, Digest],
                        sources: Mapping[str, Sequence[str]], round_id: int, timeout: float,
                        factor_layers: Sequence[str], dense_layers: Sequence[str] = (),
                        replicas: bool = True) -> list[HeadContribution]:
    """Every member's merge input: factors for `factor_layers`, float32 dense deltas for `dense_layers` (what the
    dense path would carry), and replicas. Blobs are kept for one more round: this round's factors are the next
    round's V.

    `sources[peer]` lists who may serve that peer's blobs, in order of preference (the peer itself, then the
    coordinator, which holds every blob it committed).
    """
    blobs.learn_addresses({pid: d.a for pid, d in members.items() if d.a})
    needed = list(factor_layers) + list(dense_layers)

    def one(pid: str) -> HeadContribution:
        d, src = members[pid], sources[pid]
        cur = _factors_of(blobs, layout, src, d.f, needed, FACTORS, round_id, timeout) if needed else {}
        prev = _factors_of(blobs, layout, src, d.v, needed, PREV_FACTORS, round_id, timeout) if d.v and needed else None
        reps = {}
        if replicas:
            reps = unpack_replicas(layout, check_tensors("replicas", fetch_from(blobs, src, [d.r], REPLICAS, round_id,
                                                                                timeout)[0], layout.replica_shapes))
        deltas = {l: member_delta(*cur[l], prev[l] if prev else None) for l in dense_layers}
        return HeadContribution(pid, d.n, {l: cur[l] for l in factor_layers}, reps,
                                {l: prev[l] for l in factor_layers} if prev else None, deltas)

    # Members side by side: each member's blobs take a few round trips (manifest, layers, V, replicas), and one
    # after another they cost a home link M times its latency. The result keeps the sorted order every merge uses.
    order = sorted(members)
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_CONCURRENT_MEMBERS, len(order)))) as pool:
        futures = [pool.submit(one, pid) for pid in order]
    return [f.result() for f in futures]


def choose_dense_layers(layout: Layout, members: int, mode: str = "auto") -> list[str]:
    """Layers whose merged delta is cheaper to move densely than as factors, for a group of `members` peers."""
    if mode == "factors" or members < 2:
        return []
    if mode == "dense":
        return list(layout.layers)
    out = []
    for layer, ((r, fan_in), (fan_out, _)) in zip(layout.layers, layout.factor_shapes):
        if layer_cost(fan_in, fan_out, r, members).cheaper == "dense":
            out.append(layer)
    return out



def factor_blob_shas(blobs: BlobService, layout: Layout, manifest: str) -> list[str]:
    """A manifest and the layer blobs it lists (what a client-mode peer pushes to the coordinator)."""
    return [manifest, *_manifest_shas(blobs.store.tensors(manifest), layout).values()]


def round_dense_layers(layout: Layout, members: Mapping[str, Digest], mode: str) -> list[str]:
    """The dense-path layers of a committed round; the coordinator and every peer derive the same list.

    Client-mode members cannot serve slices, so a round with one uses factors only.
    """
    if any(d.client for d in members.values()):
        return []
    return choose_dense_layers(layout, len(members), mode)


def as_dense(c: HeadContribution, layers: Sequence[str]) -> HeadContribution:
    """The same contribution with `layers` given as the float32 deltas the dense path carries."""
    if not layers:
        return c
    deltas = {l: member_delta(*c.factors[l], c.prev_factors[l] if c.prev_factors else None) for l in layers}
    keep = [l for l in c.factors if l not in deltas]
    return HeadContribution(c.head_id, c.samples, {l: c.factors[l] for l in keep}, c.replicas,
                            {l: c.prev_factors[l] for l in keep} if c.prev_factors else None, deltas)
