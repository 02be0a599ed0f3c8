"""Base states as files: the canonical serialization (safetensors), its hash, and the checkpoint format.

A checkpoint is a directory `round-NNNNNN/` with
- `model.safetensors`: the merged base as a plain timm state dict (nothing LTE-specific in it);
- `meta.json`: what it is (run, spec, round, `base_hash` = sha256 of the model FILE bytes), where it came from
  (parent checkpoint, contributors), how to build the model (`arch`, `kwargs` for `timm.create_model`), its
  evaluation, and the coordinator's RSA signature over the canonical bytes of every other field.

`state_hash(state)` is by construction the sha256 of the file `save_state(state, path)` writes (both are
safetensors' serialization of the same sorted, contiguous CPU tensors), so the hash peers agree on each round is
the hash a downloader checks.

No networking here. Signatures use the scheme of hivemind's `RSAPrivateKey` (RSA-PSS over SHA-256, base64) and
its OpenSSH public key, i.e. the coordinator's owner tag on signed DHT records; verification needs only
`cryptography`, so a user can check a downloaded checkpoint without hivemind.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file
from torch import Tensor

from lte.errors import ConfigError

FORMAT_VERSION = 1
MODEL_FILE, META_FILE, LATEST = "model.safetensors", "meta.json", "latest"
_OWNER_PREFIX, _OWNER_SUFFIX = "[owner:", "]"
_READ_CHUNK = 2**20


class CheckpointError(ConfigError):
    """A checkpoint is missing, malformed, or fails verification (hash or signature)."""


def _canonical_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sorted(state.items())}


def state_bytes(state: Mapping[str, Tensor]) -> bytes:
    """safetensors bytes of a state dict: a plain file any tool can load, and a stable input for hashing."""
    return st_save(_canonical_state(state))


def state_from_bytes(data: bytes) -> dict[str, Tensor]:
    return st_load(data)


def state_hash(state: Mapping[str, Tensor]) -> str:
    """sha256 of the safetensors bytes: equal hashes mean bitwise-equal bases (and equal checkpoint files)."""
    return hashlib.sha256(state_bytes(state)).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in chunks (a model file may be larger than what we want to hold twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def save_state(state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> str:
    """Write `state` as safetensors to `path` (flushed to disk) and return the file's sha256.

    safetensors writes the file tensor by tensor, so no second in-memory copy of the model is made.
    """
    st_save_file(_canonical_state(state), os.fspath(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return file_sha256(path)


# ----- meta.json ------------------------------------------------------------------------------------------------
class Merge(BaseModel):
    """One merge since the parent checkpoint: the base version it produced and the samples each member trained."""

    round: int
    samples: dict[str, int]


class Contributor(BaseModel):
    samples: int = 0
    rounds: int = 0


class CheckpointMeta(BaseModel):
    """meta.json, validated. Unknown fields are kept (and signed): a newer writer may add some."""

    model_config = ConfigDict(extra="allow")

    format: int = FORMAT_VERSION
    run: str
    spec: dict[str, Any]
    spec_hash: str
    round: int = Field(ge=0)
    base_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    parent_round: int | None = None
    parent_hash: str | None = None
    contributors: dict[str, Contributor] = Field(default_factory=dict)  # since the parent, by peer id
    merges: list[Merge] = Field(default_factory=list)  # since the parent, oldest first
    created: float
    arch: str  # timm.create_model(arch, pretrained=False, **kwargs)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    peers: dict[str, dict[str, int | float | None]] = Field(default_factory=dict)  # run totals, scores: for a resume
    history: list[dict[str, Any]] = Field(default_factory=list)  # the last round summaries, for the status page
    owner: str = ""  # the coordinator's owner tag "[owner:ssh-rsa ...]"
    signature: str = ""  # base64 RSA-PSS/SHA-256 over canonical_bytes(meta)


def canonical_bytes(meta: Mapping[str, Any]) -> bytes:
    """The signed bytes: every field but `signature`, as compact JSON with sorted keys.

    Python's JSON round-trips floats exactly, so a reader that parses meta.json recomputes the same bytes.
    """
    body = {k: v for k, v in meta.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class Signer(Protocol):
    """What signs meta.json: hivemind's `RSAPrivateKey` (the coordinator's key) has this method."""

    def sign(self, data: bytes) -> bytes: ...


def sign_meta(meta: dict[str, Any], key: Signer, owner: bytes) -> dict[str, Any]:
    """`meta` with `owner` (the key's owner tag) and the signature over its canonical bytes."""
    signed = {**meta, "owner": owner.decode()}
    signed["signature"] = key.sign(canonical_bytes(signed)).decode()
    return signed


def verify_meta(meta: Mapping[str, Any], owner: bytes | str) -> None:
    """Raise CheckpointError unless `meta` is signed by `owner` (the owner tag the run's DHT records carry)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    owner = owner.decode() if isinstance(owner, bytes) else owner
    if meta.get("owner") != owner:
        raise CheckpointError("meta.json is not signed by the run's coordinator (another owner key)")
    if not (owner.startswith(_OWNER_PREFIX) and owner.endswith(_OWNER_SUFFIX)):
        raise CheckpointError(f"not an owner tag: {owner[:40]!r}")
    try:
        key = serialization.load_ssh_public_key(owner[len(_OWNER_PREFIX):-len(_OWNER_SUFFIX)].encode())
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("not an RSA key")
        # hivemind's RSAPrivateKey.sign: RSA-PSS, MGF1(SHA-256), maximal salt, SHA-256, base64
        key.verify(base64.b64decode(str(meta.get("signature", "")), validate=True), canonical_bytes(meta),
                   padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
                   hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        raise CheckpointError("meta.json signature does not verify: refusing the checkpoint") from None


def parse_meta(data: bytes | str, source: str = META_FILE) -> tuple[CheckpointMeta, dict[str, Any]]:
    """meta.json as a validated model and as the raw dict the signature covers."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return CheckpointMeta.model_validate(raw), raw
    except (ValueError, ValidationError) as err:
        first = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err).splitlines()[0]
        raise CheckpointError(f"{source}: not a valid checkpoint meta.json ({first})") from None


# ----- loading --------------------------------------------------------------------------------------------------
def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The round directory `path` names: itself, its parent for a model.safetensors, or the target of `latest`."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / LATEST).exists():
        path = (path / LATEST).resolve()
    if not (path / META_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected {MODEL_FILE} and {META_FILE}, or {LATEST})")
    return path


def read_meta(directory: str | os.PathLike[str]) -> tuple[CheckpointMeta, dict[str, Any]]:
    path = Path(directory) / META_FILE
    try:
        return parse_meta(path.read_bytes(), str(path))
    except OSError as err:
        raise CheckpointError(f"{path}: {err.strerror}") from None


def verified_dir(path: str | os.PathLike[str]) -> tuple[Path, CheckpointMeta]:
    """The checkpoint directory at `path` and its meta, after checking the model file against `base_hash`."""
    directory = checkpoint_dir(path)
    meta, _ = read_meta(directory)
    if file_sha256(directory / MODEL_FILE) != meta.base_hash:
        raise CheckpointError(f"{directory / MODEL_FILE}: sha256 does not match meta.json's base_hash: corrupt "
                              "or tampered")
    return directory, meta


def load_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """The merged model of a checkpoint as a plain timm module (in eval mode), after verifying its hash.

    `path`: a `round-NNNNNN/` directory, a checkpoint directory with a `latest` link, or a model.safetensors.
    It does exactly what the README's three lines do.
    """
    import timm
    from safetensors.torch import load_file

    directory, meta = verified_dir(path)
    model = timm.create_model(meta.arch, pretrained=False, **meta.kwargs)
    model.load_state_dict(load_file(directory / MODEL_FILE), strict=True)
    return model.eval()
