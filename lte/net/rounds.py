"""The LTE round protocol on top of the generic transport: record names and formats, and the merge of a round.

Both the coordinator and the peers import this module, so they read and write the same records and merge a
committed round with the same code (`merge_committed`), which is what keeps their bases bitwise identical.
See docs/protocol.md for the round message by message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

from lte.merge import HeadContribution, MergeUpdate, merge_contributions
from lte.net.blobs import BlobService
from lte.wire import Layout, contribution

PROTOCOL_VERSION = 1

# Blob kinds: traffic is counted per kind.
FACTORS, PREV_FACTORS, REPLICAS, BASE = "factors", "factors_prev", "replicas", "base"


def spec_key(coordinator_peer_id: str) -> str:
    """Keyed by the coordinator's peer id, which a joining peer reads from the --dht address it was given."""
    return f"lte.run.{coordinator_peer_id}"


def base_key(run: str) -> str:
    return f"lte.{run}.base"


def commit_key(run: str, round_id: int) -> str:
    return f"lte.{run}.commit.{round_id}"


@dataclass(frozen=True)
class Digest:
    """What a participant announces when it joins round k (gathered by every member; must stay tiny).

    `f`, `r`: blob addresses of its factors and replicas; `v`: address of the factors blob whose product is its
    V (empty when V is zero); `n`: samples since its last merge; `loss`: mean local loss of those steps;
    `t`: seconds its local training took (the coordinator sizes the next round's window from it); `client`: it
    cannot be reached, so its blobs are served by the coordinator. The coordinator joins with `coordinator=True`.
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

    def to_dict(self) -> dict[str, Any]:
        return dict(f=self.f, r=self.r, v=self.v, n=self.n, loss=self.loss, t=self.t, spec=self.spec,
                    client=self.client, c=self.coordinator)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Digest":
        return cls(f=str(d.get("f", "")), r=str(d.get("r", "")), v=str(d.get("v", "")), n=int(d.get("n", 0)),
                   loss=float(d.get("loss", 0.0)), t=float(d.get("t", 0.0)), spec=str(d.get("spec", "")),
                   client=bool(d.get("client", False)), coordinator=bool(d.get("c", False)))


def base_to_tensors(state: Mapping[str, Tensor]) -> list[Tensor]:
    """A base state dict as a blob (sorted keys; the keys themselves come from the run's model)."""
    return [state[k].detach().cpu().contiguous() for k in sorted(state)]


def base_from_tensors(keys: list[str], tensors: list[Tensor]) -> dict[str, Tensor]:
    if len(keys) != len(tensors):
        raise ValueError(f"base blob has {len(tensors)} tensors, the model has {len(keys)}")
    return dict(zip(sorted(keys), tensors))


def fetch_contributions(blobs: BlobService, layout: Layout, members: Mapping[str, Digest],
                        sources: Mapping[str, list[str]], round_id: int, timeout: float) -> list[HeadContribution]:
    """Fetch (or take from the local store) every member's blobs and turn them into merge inputs.

    `sources[peer]` lists who may serve that peer's blobs, in order of preference (the peer itself, then the
    coordinator, which holds every blob it committed). Blobs are kept for one more round: this round's factors
    are the next round's V.
    """
    out = []
    for pid in sorted(members):
        d = members[pid]
        wanted = [(d.f, FACTORS), (d.r, REPLICAS)] + ([(d.v, PREV_FACTORS)] if d.v else [])
        got = {}
        for sha, kind in wanted:
            got[sha] = _fetch_any(blobs, sources[pid], sha, kind, round_id, timeout)
        out.append(contribution(layout, pid, d.n, got[d.f], got[d.r], got[d.v] if d.v else None))
    return out


def _fetch_any(blobs: BlobService, sources: list[str], sha: str, kind: str, round_id: int, timeout: float) -> list[Tensor]:
    last: Exception | None = None
    for src in sources:
        try:
            return blobs.fetch(src, sha, kind=kind, timeout=timeout, keep=True, round_id=round_id)
        except Exception as err:  # try the next holder; the caller decides what a total failure means
            last = err
    raise last if last else KeyError(sha)


def merge_round(contributions: list[HeadContribution], scale: float) -> MergeUpdate:
    return merge_contributions(contributions, scale)


def run_prefix(run: str) -> str:
    """The averager and servicer namespace of a run (hivemind forbids dots there)."""
    return "lte_" + "".join(c if c.isalnum() else "_" for c in run)


def quiet_hivemind() -> None:
    """hivemind logs an ERROR with a traceback whenever matchmaking finds no group, which in a run is routine
    (a round nobody else joined); our own code reports what matters in one line."""
    import logging

    for name in ("hivemind.averaging.averager", "hivemind.averaging.matchmaking"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
