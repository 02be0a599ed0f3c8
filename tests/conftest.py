import pytest
import torch

from lte.config import RunSpec, spec_from_dict

TINY_MODEL = {"name": "vit_tiny_patch16_224",
              "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10,
                         "embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.fixture
def tiny_spec() -> RunSpec:
    """A ViT small enough that exact-equivalence tests run in seconds on two cores."""
    return spec_from_dict({"model": TINY_MODEL, "data": {"batch_size": 24},
                           "lte": {"heads": 3, "rank": 4, "alpha": 16, "merge_every": 2}})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
