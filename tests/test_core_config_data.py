"""Bad input gives one clear ConfigError; data splits and shards are deterministic."""
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lte.config import DataSpec, load_spec, spec_from_dict
from lte.data import batches, load_datasets, shard_indices
from lte.errors import ConfigError
from lte.lora import prepare_model
from lte.models import create_base_model
from tests.conftest import TINY_MODEL


def _write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_shipped_config_loads():
    spec = load_spec("configs/digits.yaml")
    assert spec.lte.heads * spec.lte.rank >= spec.model.kwargs["embed_dim"]  # the paper's N r >= d quality rule
    assert len(spec.spec_hash()) == 64


@pytest.mark.parametrize("text, message", [
    ("lte: {rank: 0}", "lte.rank: Input should be greater than 0"),
    ("lte: {rank: -3}", "lte.rank"),
    ("data: {batch_size: 10}\nlte: {heads: 4}", "not divisible by lte.heads=4"),
    ("lte: {merge_evry: 3}", "lte.merge_evry: Extra inputs are not permitted"),
    ("lte: [1, 2", "not valid YAML"),
    ("- 1\n- 2", "expected a mapping"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_spec(_write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_rank_larger_than_a_layer_names_the_layer():
    spec = spec_from_dict({"model": TINY_MODEL, "lte": {"rank": 64, "heads": 2}, "data": {"batch_size": 8}})
    with pytest.raises(ConfigError, match=r"lte.rank=64 is larger than layer blocks.0.attn.qkv \(96x32\)"):
        prepare_model(create_base_model(spec.model), spec.lte)


def test_unknown_model_name():
    spec = spec_from_dict({"model": {"name": "vit_does_not_exist"}})
    with pytest.raises(ConfigError, match="unknown timm model 'vit_does_not_exist'"):
        create_base_model(spec.model)


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_missing_data_path(tmp_path, dataset):
    with pytest.raises(ConfigError, match="does not exist"):
        load_datasets(DataSpec(dataset=dataset, path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="data.path is required"):
        load_datasets(DataSpec(dataset=dataset))


def test_cifar10_without_local_files_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no CIFAR-10 files found"):
        load_datasets(DataSpec(dataset="cifar10", path=str(tmp_path)))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    cfg = _write(tmp_path, "lte: {rank: 0}")
    proc = subprocess.run([sys.executable, "-m", "lte.sim", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lte-sim: error: {cfg}: lte.rank: Input should be greater than 0"]


def test_digits_split_is_real_and_deterministic():
    (tr, te), (tr2, _) = load_datasets(DataSpec()), load_datasets(DataSpec())
    assert (len(tr), len(te)) == (1400, 397)
    assert torch.equal(tr.tensors[0], tr2.tensors[0])
    assert set(te.tensors[1].tolist()) == set(range(10))
    assert abs(tr.tensors[0].mean().item()) < 1e-4  # normalised with the training split's statistics


def test_shards_are_disjoint_and_cover():
    shards = [shard_indices(103, i, 4, seed=5) for i in range(4)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(103)) and len(set(flat)) == 103
    assert shards == [shard_indices(103, i, 4, seed=5) for i in range(4)]
    assert shards != [shard_indices(103, i, 4, seed=6) for i in range(4)]
    with pytest.raises(ConfigError, match="shard 4/4"):
        shard_indices(10, 4, 4)


def test_imagefolder_of_real_files(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    train, test = load_datasets(DataSpec(dataset="imagefolder", path=str(tmp_path), image_size=8, test_fraction=0.2))
    assert (len(train), len(test)) == (16, 4)
    x, y = next(batches(train, 4, seed=0))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1}


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_builds_a_model_that_takes_its_images(path):
    from lte.models import create_base_model

    spec = load_spec(path)
    kw = spec.model.kwargs
    size = spec.data.image_size or kw.get("img_size")
    x = torch.zeros(1, kw.get("in_chans", 3), size, size)
    assert create_base_model(spec.model)(x).shape == (1, kw["num_classes"])
    assert spec.data.batch_size % spec.lte.heads == 0
