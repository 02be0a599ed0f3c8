"""Content-addressed blobs: ordered lists of tensors, kept in their on-wire (serialized) form.

A blob's address is the sha256 of what goes on the wire: dtype, shape, codec and bytes of every tensor.
Hashing the wire form, not the original tensors, means that with a lossy wire codec (fp16, int8) every receiver
checks and decodes the same bytes, so all of them end up with identical tensors. The sender should use
`BlobStore.tensors(sha)` (the decoded wire form), not its originals, wherever results must match bitwise.

The serialized protobuf as a whole (`SerializeToString`) is not hashed: streaming sets its `chunks` field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from lte.quant import WIRE_FORMATS, int8_decode, int8_encode

Wire = Literal["raw", "fp16", "int8"]
FILE_CHUNK_BYTES = 2**20


def encode(tensors: Iterable[torch.Tensor], wire: Wire = "raw") -> list[runtime_pb2.Tensor]:
    """Serialize tensors for the wire; float32 tensors travel as float16 with wire="fp16", and as two parts with
    wire="int8": int8 codes of the tensor's shape, then one float32 scale per block (lte/quant.py). Others go raw."""
    if wire not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {wire!r}")
    parts = []
    for tensor in tensors:
        tensor = tensor.detach().cpu()
        if wire == "int8" and tensor.dtype == torch.float32:
            parts += [serialize_torch_tensor(t, runtime_pb2.CompressionType.NONE) for t in int8_encode(tensor)]
            continue
        codec = runtime_pb2.CompressionType.NONE
        if wire == "fp16" and tensor.dtype == torch.float32:
            codec = runtime_pb2.CompressionType.FLOAT16
        parts.append(serialize_torch_tensor(tensor, codec))
    return parts


def decode(parts: Iterable[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    """Tensors back from their wire form (fp16- and int8-coded ones come back as float32 holding the decoded values).

    An int8 part is always int8 codes followed by its scales: no blob carries int8 tensors of its own (checkpoint
    files travel as uint8). Raises ValueError for parts that do not decode."""
    out: list[torch.Tensor] = []
    parts = iter(parts)
    for part in parts:
        tensor = deserialize_torch_tensor(part)
        if tensor.dtype == torch.int8:
            scales = next(parts, None)
            if scales is None:
                raise ValueError("int8 wire: codes without their scales")
            tensor = int8_decode(tensor, deserialize_torch_tensor(scales))
        out.append(tensor)
    return out


def digest(parts: Iterable[runtime_pb2.Tensor]) -> str:
    """Hex sha256 address of serialized tensors: dtype, shape, codec and bytes of each, length-prefixed."""
    h = hashlib.sha256(b"lte-blob-v1")
    for part in parts:
        _hash_header(h, part.dtype, part.size, int(part.compression), len(part.buffer))
        h.update(part.buffer)
    return h.hexdigest()


def _hash_header(h: Any, dtype: str, size: Iterable[int], compression: int, nbytes: int) -> None:
    header = f"{dtype}|{','.join(map(str, size))}|{compression}".encode()
    h.update(struct.pack("<II", len(header), nbytes))
    h.update(header)


class FileDigest:
    """The address of a file blob (one uint8 tensor holding the file's bytes), computed while the bytes stream by.

    Also gives the plain sha256 of the bytes, which is how checkpoints name their model file.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.seen = nbytes, 0
        self._blob = hashlib.sha256(b"lte-blob-v1")
        _hash_header(self._blob, "uint8", [nbytes], int(runtime_pb2.CompressionType.NONE), nbytes)
        self._plain = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self.seen += len(data)
        self._blob.update(data)
        self._plain.update(data)

    def blob_sha(self) -> str:
        return self._blob.hexdigest()

    def file_sha(self) -> str:
        return self._plain.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> FileDigest:
    """Both hashes of a file (see `FileDigest`), read in chunks."""
    d = FileDigest(os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(FILE_CHUNK_BYTES):
            d.update(chunk)
    return d


def payload_bytes(parts: Iterable[runtime_pb2.Tensor]) -> int:
    return sum(len(part.buffer) for part in parts)


@dataclass(frozen=True)
class Blob:
    """A stored blob. `round_id` (None = keep until removed) lets the caller drop old rounds in one call."""

    parts: tuple[runtime_pb2.Tensor, ...]
    kind: str
    round_id: int | None
    nbytes: int


@dataclass(frozen=True)
class FileBlob:
    """A blob of one uint8 tensor whose bytes stay in a file (a checkpoint): served chunk by chunk from disk, so
    a large model is never held in memory to be served. Its address is what `digest` gives for the same bytes."""

    path: Path
    kind: str
    round_id: int | None
    nbytes: int

    @property
    def parts(self) -> tuple[runtime_pb2.Tensor, ...]:
        """The whole blob in memory, for the rare local use; serving uses `chunks`."""
        data = bytearray(self.path.read_bytes())
        return tuple(encode([torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)]))

    def chunks(self, chunk_bytes: int) -> Iterator[runtime_pb2.Tensor]:
        """The stream `split_for_streaming` would make of `parts`, read from the file as it goes."""
        count = max(1, -(-self.nbytes // chunk_bytes))
        with open(self.path, "rb") as f:
            yield runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.NONE, buffer=f.read(chunk_bytes),
                                     chunks=count, size=[self.nbytes], dtype="uint8", requires_grad=False)
            for _ in range(count - 1):
                yield runtime_pb2.Tensor(buffer=f.read(chunk_bytes))


class BlobStore:
    """Thread-safe map sha256 -> Blob, shared by the local caller and the RPC handlers serving it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, Blob | FileBlob] = {}

    def put(
        self, tensors: Sequence[torch.Tensor], *, kind: str, round_id: int | None = None, wire: Wire = "raw"
    ) -> str:
        """Store tensors in the given wire form and return their address."""
        return self.put_encoded(encode(tensors, wire), kind=kind, round_id=round_id)

    def put_encoded(
        self, parts: Sequence[runtime_pb2.Tensor], *, kind: str, round_id: int | None = None, sha: str | None = None
    ) -> str:
        """Store already serialized tensors (`sha` skips rehashing when the caller has just verified it)."""
        sha = sha or digest(parts)
        blob = Blob(tuple(parts), kind, round_id, payload_bytes(parts))
        with self._lock:
            old = self._blobs.get(sha)
            if old is not None and (old.round_id is None or (round_id is not None and old.round_id >= round_id)):
                return sha  # keep the longer-lived entry
            self._blobs[sha] = blob
        return sha

    def put_file(self, path: str | os.PathLike[str], *, kind: str, sha: str | None = None) -> str:
        """Serve the bytes of file `path` (which must not change while served) as a blob; returns its address.
        Pass `sha` when `file_digest` was computed already: hashing reads the whole file."""
        path = Path(path)
        sha = sha or file_digest(path).blob_sha()
        with self._lock:
            self._blobs[sha] = FileBlob(path, kind, None, path.stat().st_size)
        return sha

    def get(self, sha: str) -> Blob | FileBlob | None:
        with self._lock:
            return self._blobs.get(sha)

    def tensors(self, sha: str) -> list[torch.Tensor]:
        """The blob's tensors exactly as every receiver decodes them. KeyError if absent."""
        blob = self.get(sha)
        if blob is None:
            raise KeyError(sha)
        return decode(blob.parts)

    def __contains__(self, sha: object) -> bool:
        with self._lock:
            return sha in self._blobs

    def __len__(self) -> int:
        with self._lock:
            return len(self._blobs)

    @property
    def nbytes(self) -> int:
        """Payload bytes held, for memory monitoring."""
        with self._lock:
            return sum(blob.nbytes for blob in self._blobs.values())

    def remove(self, sha: str) -> bool:
        with self._lock:
            return self._blobs.pop(sha, None) is not None

    def keep_until(self, shas: Iterable[str], round_id: int) -> None:
        """Tag the held blobs `shas` with round `round_id` unless they are kept longer already, so that
        `drop_rounds_before` spares them that long (a peer's V outlives the round it was sent in when it follows
        rounds without merging)."""
        with self._lock:
            for sha in shas:
                blob = self._blobs.get(sha)
                if blob is not None and blob.round_id is not None and blob.round_id < round_id:
                    self._blobs[sha] = dataclasses.replace(blob, round_id=round_id)

    def drop_rounds_before(self, round_id: int) -> int:
        """Forget blobs tagged with a round older than `round_id`; returns how many were dropped."""
        with self._lock:
            old = [sha for sha, blob in self._blobs.items() if blob.round_id is not None and blob.round_id < round_id]
            for sha in old:
                del self._blobs[sha]
        return len(old)
