"""The run's training data, packed into shards and served: a volunteer needs no copy of the data set.

At start the coordinator packs its training split (never the held-out split, which it evaluates on) into
`CHECKPOINT_DIR/data/shard-NNNNNN.tar` (format: lte/shards.py), signs a manifest listing them, and serves every
shard and the manifest as file blobs straight from disk. The run record carries the manifest's address and sha256,
so a peer reaches the data from the record it already trusts. A restarted coordinator reuses the shards when the
manifest on disk is its own, for the same spec and source files, and every shard still hashes right; otherwise it
packs again (deterministic: unchanged data gives the same shard addresses, so peers' caches stay valid).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lte.checkpoint import Signer
from lte.config import RunSpec
from lte.net.blobs import BlobService
from lte.net.blobstore import file_digest
from lte.net.rounds import DATA
from lte.shards import (MANIFEST_FILE, DataError, build_manifest, encoded_training_split, pack_shards, parse_manifest,
                        preprocessing_of, sign_manifest)

DATA_DIR = "data"
SHIPPED = ("imagefolder", "cifar10")  # digits come with scikit-learn: every peer has them already


class DataPublisher:
    """Packs (or reuses) the shards and serves them; `record()` is the run record's `data` field."""

    def __init__(self, spec: RunSpec, train_set: Any, checkpoint_dir: Path, key: Signer, owner: bytes,
                 shard_bytes: int, progress: bool = True):
        self.directory = checkpoint_dir / DATA_DIR
        samples, classes, source = encoded_training_split(train_set, spec.seed)
        self.manifest_path = self.directory / MANIFEST_FILE
        manifest = self._reusable(spec, owner, source)
        if manifest is None:
            for old in self.directory.glob("shard-*.tar"):
                old.unlink()
            with tqdm(total=len(train_set), desc="packing data shards", unit="img", disable=not progress,
                      file=sys.stderr, leave=False) as bar:
                paths = pack_shards(_counted(samples, bar), self.directory, shard_bytes)
            entries = []
            for i, path in enumerate(paths):
                d = file_digest(path)
                entries.append({"index": i, "name": path.name, "sha256": d.file_sha(), "blob": d.blob_sha(),
                                "samples": _samples_in(path), "bytes": d.nbytes})
            doc = build_manifest(spec.run, spec.spec_hash(), classes, preprocessing_of(spec.data.image_size), source,
                                 entries)
            tmp = self.manifest_path.with_suffix(".tmp")
            tmp.write_bytes(sign_manifest(doc, key, owner))
            os.replace(tmp, self.manifest_path)
            manifest = parse_manifest(self.manifest_path.read_bytes(), owner, spec.run, spec.spec_hash())
        self.manifest = manifest
        d = file_digest(self.manifest_path)
        self.manifest_blob, self.manifest_sha = d.blob_sha(), d.file_sha()

    def _reusable(self, spec: RunSpec, owner: bytes, source: str):
        if not self.manifest_path.is_file():
            return None
        try:
            m = parse_manifest(self.manifest_path.read_bytes(), owner, spec.run, spec.spec_hash())
        except DataError:
            return None
        if m.raw.get("source") != source:
            return None
        for s in m.shards:
            path = self.directory / s.name
            if not path.is_file() or path.stat().st_size != s.bytes or file_digest(path).file_sha() != s.sha256:
                return None
        return m

    def serve(self, blobs: BlobService) -> None:
        """Serve the manifest and every shard from disk (never loaded into memory to be served)."""
        blobs.store.put_file(self.manifest_path, kind=DATA, sha=self.manifest_blob)
        for s in self.manifest.shards:
            blobs.store.put_file(self.directory / s.name, kind=DATA, sha=s.blob)

    def record(self) -> dict[str, Any]:
        """What the signed run record says about the data: enough for a peer to fetch and check the manifest."""
        return {"manifest": self.manifest_blob, "sha256": self.manifest_sha, "bytes": self.manifest_path.stat().st_size,
                "shards": len(self.manifest.shards), "samples": self.manifest.samples, "data_bytes": self.manifest.bytes}


def _counted(samples, bar):
    for s in samples:
        bar.update(1)
        yield s


def _samples_in(path: Path) -> int:
    import tarfile

    with tarfile.open(path, "r:") as tar:
        return sum(1 for m in tar if m.isfile() and m.name.endswith(".cls"))


def data_publisher(spec: RunSpec, train_set: Any, checkpoint_dir: Path, key: Signer, owner: bytes,
                   shard_bytes: int) -> DataPublisher | None:
    """The publisher of a run whose data peers cannot have already (an image folder, CIFAR-10 files); None for the
    built-in digits."""
    if spec.data.dataset not in SHIPPED:
        return None
    return DataPublisher(spec, train_set, checkpoint_dir, key, owner, shard_bytes)
