"""A broken or hostile peer, for tests: a real `lte-peer join` whose contribution is corrupted in one way per
round, cycling through the kinds in $LTE_ADVERSARY (comma-separated, from `EXPECTED`). With $LTE_FORGE_SPEC=1 it
first publishes a forged run record: the real one's fields with another spec, well signed, but with its own key.
With $LTE_IGNORE_ALLOWLIST=1 it joins a closed run that does not list it (skipping the peer's own check).

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
from lte.net.rounds import REPLICAS, Digest, local_factors, put_factors  # noqa: E402
from peer.service import Peer  # noqa: E402

# kind -> the reason lte/validate.py must reject it for
EXPECTED = {"nan": "nonfinite", "inf": "nonfinite", "scaled": "norm_outlier", "shape": "malformed",
            "dtype": "wrong_dtype", "spec": "spec_mismatch", "stale": "stale_round", "truncated": "blob_truncated",
            "garbled": "blob_hash_mismatch", "malformed": "malformed"}


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


def corrupt(kind: str, peer: Peer, d: Digest, k: int) -> Digest:
    """Digest `d` (honest, already stored) turned into the given kind of bad contribution."""
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
    def __init__(self, *args, **kwargs) -> None:
        self.plan = [k for k in os.environ.get("LTE_ADVERSARY", "").split(",") if k]
        self.attacks = 0
        super().__init__(*args, **kwargs)
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
        if not self.plan:
            return d
        kind = self.plan[self.attacks % len(self.plan)]
        self.attacks += 1
        self.log({"event": "attack", "round": k, "kind": kind})
        return corrupt(kind, self, d, k)


if __name__ == "__main__":
    import peer.cli

    sys.exit(peer.cli.main(sys.argv[1:], peer_class=AdversaryPeer))
