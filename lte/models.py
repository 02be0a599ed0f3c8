"""Building the base network. Everything is a plain timm model, so a merged checkpoint loads into timm as is."""
from __future__ import annotations

import timm
import torch.nn as nn

from lte.config import ModelSpec
from lte.errors import ConfigError


def create_base_model(spec: ModelSpec) -> nn.Module:
    """The untrained timm model a run starts from (never pretrained: no hub access, and LTE trains from scratch)."""
    if not timm.is_model(spec.name):
        raise ConfigError(f"model.name: unknown timm model {spec.name!r}")
    try:
        return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"model.kwargs: timm cannot build {spec.name} with {spec.kwargs}: {err}") from None
