"""A broken or hostile peer, for tests: a real `lte-peer join` whose contribution is corrupted in one way per
round, cycling through the kinds in $LTE_ADVERSARY (comma-separated, from `EXPECTED`). With $LTE_FORGE_SPEC=1 it
first publishes a forged run record: the real one's fields with another spec, well signed, but with its own key.
With $LTE_IGNORE_ALLOWLIST=1 it joins a closed run that does not list it (skipping the peer's own check).

Poisoning kinds (`POISON`) pass every format and norm check and are left to the coordinator's scoring
(lte/score.py): `signflip` sends -9x its update (just under the 10x norm bound; the V it announces is forged to
match, so the delta is exactly -9x), `labels` trains honestly on labels shifted by one class (every round, once in
the plan), `freerider` sends random factors with its honest update's norm per layer and the base's replicas
(samples claimed, nothing learned), `zero` sends its V again (an empty update that claims samples). With
$LTE_ADVERSARY_AFTER=K it sends what it trained, unchanged, in its first K rounds (with `labels` in the plan that is
still trained on shifted labels).

Run as `python tests/adversary.py join --dht ... [lte-peer join options]`. It logs `{"event": "attack", "round",
"kind"}` for each round it joins and `{"event": "forged"}` once the forged record is stored.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402

from lte.net.blobstore import Blob, BlobStore  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import peer.service  # noqa: E402
import peer.training_data  # noqa: E402
from lte.net.rounds import REPLICAS, Digest, local_factors, put_factors  # noqa: E402
from peer.service import Peer  # noqa: E402

# kind -> the reason lte/validate.py must reject it for
EXPECTED = {"nan": "nonfinite", "inf": "nonfinite", "scaled": "norm_outlier", "shape": "malformed",
            "dtype": "wrong_dtype", "spec": "spec_mismatch", "stale": "stale_round", "truncated": "blob_truncated",
            "garbled": "blob_hash_mismatch", "malformed": "malformed"}
# kind -> the reasons a poisoned contribution may be rejected for (the norm bound catches a -9x update whose
# honest norm was above the pool's median; the scoring catches the rest)
POISON = {"signflip": {"score_outlier", "norm_outlier"}, "labels": {"score_outlier", "norm_outlier"},
          "freerider": {"score_outlier", "norm_outlier"}, "zero": {"score_outlier"}}
SIGNFLIP = -9.0


class _BreaksOff:
    """A stored blob that announces all its parts but streams one fewer (the servicer reads `parts` twice)."""

    def __init__(self, blob: Blob) -> None:
        self._blob, self._reads = blob, 0
        self.kind, self.round_id, self.nbytes = blob.kind, blob.round_id, blob.nbytes

    @property
    def parts(self) -> tuple[runtime_pb2.Tensor, ...]:
        self._reads += 1
        return self._blob.parts if self._reads == 1 else self._blob.parts[:-1]


class LyingStore(BlobStore):
    """Serves the blobs in `truncate` broken off (each fetch sees a fresh stream that ends early)."""

    truncate: set[str]

    def get(self, sha: str):
        blob = super().get(sha)
        return _BreaksOff(blob) if sha in self.truncate and isinstance(blob, Blob) else blob


def _with_factors(peer: Peer, d: Digest, k: int, change) -> Digest:
    factors = local_factors(peer.blobs, peer.layout, d.f)
    first = peer.layout.layers[0]
    flat = []
    for layer in peer.layout.layers:
        a, b = change(layer == first, *factors[layer])
        flat += [a, b]
    return replace(d, f=put_factors(peer.blobs, peer.layout, flat, k, peer.wire))


def _with_replicas(peer: Peer, d: Digest, k: int, parts: list[runtime_pb2.Tensor], sha: str | None = None) -> Digest:
    store = peer.blobs.store
    if sha is not None:
        store.remove(sha)  # the same address, other bytes
    return replace(d, r=store.put_encoded(parts, kind=REPLICAS, round_id=k, sha=sha))


def _put(peer: Peer, k: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    flat = [t for layer in peer.layout.layers for t in factors[layer]]
    return put_factors(peer.blobs, peer.layout, flat, k, peer.wire)


def poison(kind: str, peer: Peer, d: Digest, k: int) -> Digest:
    """Digest `d` (honest, already stored) turned into a contribution that passes every format and norm check."""
    cur = local_factors(peer.blobs, peer.layout, d.f)
    prev = local_factors(peer.blobs, peer.layout, d.v) if d.v else None
    reps = peer.blobs.store.tensors(d.r)
    base = [peer.base_replicas[n].to(torch.float32) for n in peer.layout.replicas]
    if kind == "labels":  # the training itself was poisoned (see AdversaryPeer)
        return d
    if kind == "zero":  # V again, and the base's replicas: nothing changes, samples are claimed
        return replace(d, f=d.v or _put(peer, k, {l: (a, torch.zeros_like(b)) for l, (a, b) in cur.items()}),
                       r=peer.blobs.put(base, kind=REPLICAS, round_id=k))
    if kind == "signflip":  # B A - V' = -9 (B A - V) with V' = -9 V: both manifests forged
        f = _put(peer, k, {l: (a, SIGNFLIP * b) for l, (a, b) in cur.items()})
        v = _put(peer, k, {l: (a, SIGNFLIP * b) for l, (a, b) in prev.items()}) if prev else ""
        flipped = [b + SIGNFLIP * (r - b) for r, b in zip(reps, base)]
        return replace(d, f=f, v=v, r=peer.blobs.put(flipped, kind=REPLICAS, round_id=k))
    if kind == "freerider":  # per layer: a random delta R A' with ||R A'|| = ||B A - V||, on top of V
        g = torch.Generator().manual_seed(k)
        out = {}
        for layer, (a, b) in cur.items():
            honest = b.double() @ a.double()
            pa, pb = prev[layer] if prev else (a, torch.zeros_like(b))
            if prev:
                honest = honest - pb.double() @ pa.double()
            r = torch.randn(b.shape, generator=g)
            norm = float((r.double() @ pa.double()).norm())
            out[layer] = (pa, pb + r * (float(honest.norm()) / norm if norm > 0 else 0.0))
        return replace(d, f=_put(peer, k, out), r=peer.blobs.put(base, kind=REPLICAS, round_id=k))
    raise ValueError(f"unknown kind {kind!r}")


def _shifted_labels(load):
    """`load_datasets` whose training split has every label moved to the next class."""
    def load_shifted(spec, seed=0):
        train, test = load(spec, seed)
        if not isinstance(train, TensorDataset):
            raise SystemExit("adversary: the labels kind needs an in-memory data set (digits)")
        x, y = train.tensors
        return TensorDataset(x, (y + 1) % (int(y.max()) + 1)), test
    return load_shifted


def corrupt(kind: str, peer: Peer, d: Digest, k: int) -> Digest:
    """Digest `d` (honest, already stored) turned into the given kind of bad contribution."""
    if kind in POISON:
        return poison(kind, peer, d, k)
    def nan(first, a, b):
        if first:
            a = a.clone()
            a[0, 0] = float("nan")
        return a, b

    if kind == "nan":
        return _with_factors(peer, d, k, nan)
    if kind == "scaled":
        return _with_factors(peer, d, k, lambda first, a, b: (a, b * 1000))
    if kind == "shape":
        return _with_factors(peer, d, k, lambda first, a, b: (torch.cat([a, a[:1]], 0) if first else a, b))
    if kind == "dtype":
        return _with_factors(peer, d, k, lambda first, a, b: (a.double() if first else a, b))
    if kind == "spec":
        return replace(d, spec="0" * 64)
    if kind == "stale":
        return replace(d, k=k - 1)
    parts = [runtime_pb2.Tensor.FromString(p.SerializeToString()) for p in peer.blobs.store.get(d.r).parts]
    if kind == "inf":
        reps = peer.blobs.store.tensors(d.r)
        reps[0] = reps[0].clone()
        reps[0].view(-1)[0] = float("inf")
        return replace(d, r=peer.blobs.put(reps, kind=REPLICAS, round_id=k))
    if kind == "garbled":
        buf = bytearray(parts[0].buffer)
        buf[len(buf) // 2] ^= 0xFF
        parts[0].buffer = bytes(buf)
        return _with_replicas(peer, d, k, parts, sha=d.r)
    if kind == "malformed":  # well addressed, but the bytes do not fill the announced shape
        parts[0].buffer = parts[0].buffer[: len(parts[0].buffer) // 2]
        return _with_replicas(peer, d, k, parts)
    if kind == "truncated":
        peer.blobs.store.truncate.add(d.r)
        return d
    raise ValueError(f"unknown kind {kind!r}")


class AdversaryPeer(Peer):
    """Always on the synchronous schedule: a pipelined peer takes what it announced as its snapshot (V), and an
    adversary announces a forged digest, so it would go on training from its own corruption (a NaN round made every
    later kind fail as `nonfinite`). What the tests examine is what it sends, never its own head."""

    def __init__(self, opts, *args, **kwargs) -> None:
        opts = replace(opts, schedule="sync")
        self.plan = [k for k in os.environ.get("LTE_ADVERSARY", "").split(",") if k]
        unknown = set(self.plan) - set(EXPECTED) - set(POISON)
        if unknown:
            raise SystemExit(f"adversary: unknown kinds {sorted(unknown)}")
        self.honest_rounds = int(os.environ.get("LTE_ADVERSARY_AFTER", "0"))
        self.attacks = 0
        if "labels" in self.plan:
            peer.training_data.load_datasets = _shifted_labels(peer.training_data.load_datasets)
        super().__init__(opts, *args, **kwargs)
        self.blobs.store.__class__ = LyingStore  # the servicer holds this very object
        self.blobs.store.truncate = set()
        if os.environ.get("LTE_FORGE_SPEC") == "1":
            self._forge_run_record()

    def _check_allowed(self) -> None:
        if os.environ.get("LTE_IGNORE_ALLOWLIST") != "1":
            super()._check_allowed()

    def _forge_run_record(self) -> None:
        from hivemind.dht.crypto import RSASignatureValidator

        from lte.config import spec_from_dict
        from lte.net.records import publish_signed, read_signed
        from lte.net.rounds import spec_key

        real = read_signed(self.dht, spec_key(self.coordinator), self.owner).value
        spec = dict(real["spec"], optim={**real["spec"]["optim"], "lr": 10.0})
        forged = {**real, "spec": spec, "spec_hash": spec_from_dict(spec, "forged").spec_hash()}
        publish_signed(self.dht, spec_key(self.coordinator), forged, RSASignatureValidator().local_public_key, ttl=600)
        self.log({"event": "forged"})

    def _announce(self, k: int) -> Digest:
        d = super()._announce(k)
        if not self.plan or self.honest_rounds > 0:
            self.honest_rounds -= 1
            return d
        kind = self.plan[self.attacks % len(self.plan)]
        self.attacks += 1
        bad = corrupt(kind, self, d, k)
        # the addresses it announces, so that a rejection for an unexpected reason can be traced to one blob
        self.log({"event": "attack", "round": k, "kind": kind, "f": bad.f, "v": bad.v, "r": bad.r,
                  "held": {sha[:12]: sha in self.blobs.store for sha in (bad.f, bad.v, bad.r) if sha}})
        return bad


if __name__ == "__main__":
    import peer.cli

    sys.exit(peer.cli.main(sys.argv[1:], peer_class=AdversaryPeer))
