"""Building the base network. Everything is a plain timm model, so a merged checkpoint loads into timm as is."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from torch.utils.data import Dataset

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


def check_fits(model: nn.Module, dataset: Dataset, what: str) -> None:
    """One forward pass on one sample, so that a model that cannot take the data (channels, image size) is refused
    with one line at start, not with a traceback from the middle of the first round."""
    x = dataset[0][0].unsqueeze(0)
    was_training = model.training
    model.eval()  # batch norm cannot train on one sample
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.kwargs: {what} gives images of shape {tuple(x.shape[1:])}, which this model cannot "
                          f"take: {reason}") from None
    finally:
        model.train(was_training)
