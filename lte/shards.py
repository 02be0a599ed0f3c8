"""A run's training data as content-addressed shards, and the signed manifest that lists them (design notes §7).

Format: WebDataset-style tar files. Sample `000123` is two members, `000123.png` (the image file's original encoded
bytes: JPEG stays JPEG, nothing is decoded and re-encoded) and `000123.cls` (the class index as ASCII digits). Any
ML engineer can open a shard with Python's `tarfile` or the `webdataset` library, and a peer reads one sample at a
time by seeking to its offset, so it never holds a shard, let alone the set, in memory.

Packing is deterministic (fixed order, mtime, owner and mode in every header): the same split gives byte-identical
shards, hence the same addresses, so a restarted coordinator serves what peers have cached.

The manifest is JSON signed like a checkpoint's meta.json (lte/checkpoint.py): every shard's sha256, blob address,
sample count and size, the class names and the preprocessing. A peer trains only on shards whose bytes hash to an
entry of a manifest signed by the run's coordinator. No networking here.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch.utils.data import Dataset

from lte.checkpoint import CheckpointError, Signer, sign_meta, verify_meta
from lte.errors import ConfigError

MANIFEST_FORMAT = "lte-data-v1"
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_BYTES = 16 * 2**20  # a few seconds on a home link: the first training step comes soon
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


class DataError(ConfigError):
    """Data that cannot be used: a manifest or shard that fails verification, a cache that cannot hold it."""


@dataclass(frozen=True)
class Sample:
    """One training example as it travels: the image file's encoded bytes, its suffix, its class index."""

    data: bytes
    suffix: str  # "png", "jpg", ...
    label: int


@dataclass(frozen=True)
class ShardEntry:
    index: int
    name: str
    sha256: str  # of the tar file's bytes: what a cached file is checked against
    blob: str  # its address as a file blob (lte.net.blobstore.FileDigest.blob_sha)
    samples: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Manifest:
    run: str
    spec_hash: str
    classes: tuple[str, ...]
    preprocessing: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    raw: dict[str, Any]  # the signed document as read

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def by_sha(self) -> dict[str, ShardEntry]:
        return {s.sha256: s for s in self.shards}


# ----- packing (coordinator) ----------------------------------------------------------------------------------
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def pack_shards(samples: Iterable[Sample], out_dir: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write `samples`, in order, into `out_dir/shard-NNNNNN.tar` files of about `shard_bytes` each (a shard closes
    once it reaches the size, so none is empty); returns their paths. Each file is written under a temporary name
    and renamed when complete, so an interrupted pack never leaves a shard that looks whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar = tmp = None
    size = 0
    try:
        for key, sample in enumerate(samples):
            if tar is None:
                tmp = out_dir / f".shard-{len(paths):06d}.tar.tmp"
                tar, size = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 0
            _tar_member(tar, f"{key:06d}.{sample.suffix}", sample.data)
            _tar_member(tar, f"{key:06d}.cls", str(sample.label).encode())
            size += _member_bytes(len(sample.data)) + _member_bytes(len(str(sample.label)))
            if size >= shard_bytes:
                paths.append(_close_shard(tar, tmp, len(paths)))
                tar = None
        if tar is not None:
            paths.append(_close_shard(tar, tmp, len(paths)))
            tar = None
    finally:
        if tar is not None:
            tar.close()
            tmp.unlink(missing_ok=True)
    return paths


def _member_bytes(n: int) -> int:
    """What a member takes in a tar file: a 512-byte header and its data padded to 512-byte blocks (for images of a
    few hundred bytes the headers are most of a shard)."""
    return 512 + -(-n // 512) * 512


def _close_shard(tar: tarfile.TarFile, tmp: Path, index: int) -> Path:
    tar.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    final = tmp.with_name(f"shard-{index:06d}.tar")
    os.replace(tmp, final)
    return final


def encoded_training_split(train_set: Any, seed: int) -> tuple[Iterator[Sample], list[str], str]:
    """The training split of an ImageFolder (or a Subset of one) or a CIFAR-10 set as encoded samples, in a seeded
    shuffled order (an ImageFolder lists its files class by class: unshuffled, each shard would hold one class).
    Returns (samples, class names, a fingerprint of the source: file names, sizes and mtimes, or the set's size).

    The held-out split is never passed here: it stays with the coordinator."""
    base, indices = train_set, None
    if isinstance(train_set, torch.utils.data.Subset):
        base, indices = train_set.dataset, list(train_set.indices)
    n = len(indices) if indices is not None else len(base)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    picks = [indices[i] for i in order] if indices is not None else order
    fp = hashlib.sha256()
    if hasattr(base, "samples"):  # torchvision ImageFolder: ship the files' bytes as they are
        files = [base.samples[i] for i in picks]
        for path, label in files:
            st = os.stat(path)
            fp.update(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())

        def from_files() -> Iterator[Sample]:
            for path, label in files:
                suffix = Path(path).suffix.lower().lstrip(".") or "img"
                yield Sample(Path(path).read_bytes(), suffix, int(label))

        return from_files(), list(base.classes), fp.hexdigest()
    if hasattr(base, "data") and hasattr(base, "targets"):  # torchvision CIFAR10: raw pixels, encoded once as PNG
        from PIL import Image

        fp.update(f"cifar|{len(base.data)}|{len(picks)}".encode())

        def from_arrays() -> Iterator[Sample]:
            for i in picks:
                buf = io.BytesIO()
                Image.fromarray(base.data[i]).save(buf, format="PNG")
                yield Sample(buf.getvalue(), "png", int(base.targets[i]))

        return from_arrays(), list(base.classes), fp.hexdigest()
    raise ConfigError("this data set cannot be shipped as shards (only image folders and CIFAR-10 files)")


def build_manifest(run: str, spec_hash: str, classes: list[str], preprocessing: dict[str, Any], source: str,
                   shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The unsigned manifest document (sign it with `sign_manifest`). No timestamp: the same data gives the same
    document, so only its signature differs between coordinator starts."""
    return {"format": MANIFEST_FORMAT, "run": run, "spec_hash": spec_hash, "classes": list(classes),
            "preprocessing": preprocessing, "source": source, "shards": shards,
            "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards)}


def sign_manifest(manifest: dict[str, Any], key: Signer, owner: bytes) -> bytes:
    """The manifest file's bytes, signed with the coordinator's key (the owner tag of the run's DHT records)."""
    return json.dumps(sign_meta(manifest, key, owner), indent=1, sort_keys=True).encode()


def preprocessing_of(image_size: int | None) -> dict[str, Any]:
    """How a peer turns a shard's image bytes into the tensors the coordinator evaluates on (lte.data's
    ImageFolder transform): PIL decode, RGB, resize, [0, 1], normalize."""
    return {"mode": "RGB", "image_size": image_size, "mean": 0.5, "std": 0.5}


# ----- verification (peer) ------------------------------------------------------------------------------------
def parse_manifest(data: bytes, owner: bytes, run: str, spec_hash: str) -> Manifest:
    """The manifest in `data` if it is signed by `owner` (the run's coordinator) and describes this run's spec;
    raises DataError (one line) otherwise."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"data manifest is not valid JSON ({err})") from None
    try:
        verify_meta(raw, owner)
    except CheckpointError as err:
        reason = "another owner key" if "another owner" in str(err) else "its signature does not verify"
        raise DataError(f"data manifest is not signed by the run's coordinator ({reason}): refusing to train "
                        "on it") from None
    if raw.get("format") != MANIFEST_FORMAT:
        raise DataError(f"data manifest format {raw.get('format')!r} is not {MANIFEST_FORMAT}: upgrade lte-network")
    if raw.get("run") != run or raw.get("spec_hash") != spec_hash:
        raise DataError(f"data manifest describes run {raw.get('run')!r} (spec {str(raw.get('spec_hash'))[:12]}), "
                        f"not this run {run!r} (spec {spec_hash[:12]})")
    try:
        shards = tuple(ShardEntry(int(s["index"]), str(s["name"]), str(s["sha256"]), str(s["blob"]),
                                  int(s["samples"]), int(s["bytes"])) for s in raw["shards"])
        manifest = Manifest(run, spec_hash, tuple(map(str, raw["classes"])), dict(raw["preprocessing"]), shards, raw)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"data manifest is malformed ({type(err).__name__}: {err})") from None
    if not shards or [s.index for s in shards] != list(range(len(shards))):
        raise DataError("data manifest lists no shards, or not numbered 0..N-1")
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


# ----- reading (peer) -----------------------------------------------------------------------------------------
def image_transform(pre: Mapping[str, Any]):
    from torchvision import transforms as T

    size = pre.get("image_size")
    steps = [T.Resize((int(size), int(size)))] if size else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(float(pre.get("mean", 0.5)), float(pre.get("std", 0.5)))])


class ShardDataset(Dataset):
    """One shard file as a map-style data set. Only each sample's offset, size and label are kept in memory; an
    image is read from disk and decoded when it is asked for."""

    def __init__(self, path: Path, preprocessing: Mapping[str, Any]):
        self.path, self.mode = Path(path), str(preprocessing.get("mode", "RGB"))
        self.transform = image_transform(preprocessing)
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(self.path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, suffix = m.name.rpartition(".")
                    if suffix == "cls":
                        labels[key] = int(tar.extractfile(m).read().decode().strip())
                    else:
                        images[key] = (m.offset_data, m.size)
        except (tarfile.TarError, ValueError, OSError) as err:
            raise DataError(f"shard {self.path.name} cannot be read ({err})") from None
        self.items = [(images[k][0], images[k][1], labels[k]) for k in sorted(images) if k in labels]
        if not self.items:
            raise DataError(f"shard {self.path.name} holds no labelled images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        offset, size, label = self.items[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        with Image.open(io.BytesIO(data)) as img:
            return self.transform(img.convert(self.mode)), label
