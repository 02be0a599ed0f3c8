"""Base states as bytes: the canonical serialization (safetensors) and its hash, shared by every participant."""
from __future__ import annotations

import hashlib
from typing import Mapping

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor


def state_bytes(state: Mapping[str, Tensor]) -> bytes:
    """safetensors bytes of a state dict: a plain file any tool can load, and a stable input for hashing."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in sorted(state.items())})


def state_from_bytes(data: bytes) -> dict[str, Tensor]:
    return st_load(data)


def state_hash(state: Mapping[str, Tensor]) -> str:
    """sha256 of the safetensors bytes: equal hashes mean bitwise-equal bases."""
    return hashlib.sha256(state_bytes(state)).hexdigest()
