"""LoRA-the-Explorer: the algorithm and its formats. No networking here (that is `lte.net`, imported separately)."""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562): torch and timm take seconds to import, and every submodule
# import (`lte.config`, `lte.errors`) runs this file first, so a command line tool that rejects a bad flag or
# config would otherwise make its user wait for them.
_HOME = {
    "CheckpointError": "lte.checkpoint", "load_checkpoint": "lte.checkpoint",
    "RunSpec": "lte.config", "load_spec": "lte.config",
    "ConfigError": "lte.errors",
    "LoRALinear": "lte.lora", "LTEModel": "lte.lora", "mhlora_model": "lte.lora", "prepare_model": "lte.lora",
    "HeadContribution": "lte.merge", "MergeUpdate": "lte.merge", "apply_update": "lte.merge",
    "merge_contributions": "lte.merge",
    "create_base_model": "lte.models",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lte' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
