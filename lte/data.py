"""Data sets and deterministic shards.

The embedded default is scikit-learn's bundled `load_digits` (1,797 real 8x8 images): it needs no download, so a
fresh clone trains on real data. Users bring their own through torchvision (ImageFolder, CIFAR-10 from local files).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from lte.config import DataSpec
from lte.errors import ConfigError

DIGITS_TEST_SIZE = 397  # 1,400 train / 397 test, as in the calibration runs of the design notes


def load_digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_SIZE, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()  # statistics of the training split only

    def to_ds(xs, ys) -> TensorDataset:
        imgs = torch.tensor((xs - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(imgs, torch.tensor(ys, dtype=torch.long))

    return to_ds(x_tr, y_tr), to_ds(x_te, y_te)


def _image_transform(image_size: int | None):
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))] if image_size else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(0.5, 0.5)])


def _need_path(spec: DataSpec) -> Path:
    if not spec.path:
        raise ConfigError(f"data.path is required for data.dataset={spec.dataset}")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path {path} does not exist")
    return path


def load_imagefolder_split(spec: DataSpec, seed: int = 0) -> tuple[Dataset, Dataset]:
    """`path/train` + `path/val` if both exist, else one folder split by `data.test_fraction` with `seed`."""
    from torchvision.datasets import ImageFolder

    path = _need_path(spec)
    tf = _image_transform(spec.image_size)
    try:
        if (path / "train").is_dir() and (path / "val").is_dir():
            return ImageFolder(str(path / "train"), tf), ImageFolder(str(path / "val"), tf)
        full = ImageFolder(str(path), tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"data.path {path}: not an image folder ({err})") from None
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(len(full) * spec.test_fraction))
    return Subset(full, perm[n_test:]), Subset(full, perm[:n_test])


def load_cifar10_split(spec: DataSpec) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import CIFAR10

    path = _need_path(spec)
    tf = _image_transform(spec.image_size)
    try:
        return CIFAR10(str(path), train=True, transform=tf, download=False), CIFAR10(
            str(path), train=False, transform=tf, download=False)
    except RuntimeError:
        raise ConfigError(
            f"data.path {path}: no CIFAR-10 files found (expected cifar-10-batches-py/ as unpacked from "
            "cifar-10-python.tar.gz; nothing is downloaded at run time)") from None


def load_datasets(spec: DataSpec, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for a run's data spec."""
    if spec.dataset == "digits":
        return load_digits_split(seed)
    if spec.dataset == "imagefolder":
        return load_imagefolder_split(spec, seed)
    return load_cifar10_split(spec)


def shard_indices(n_items: int, index: int, count: int, seed: int = 0) -> list[int]:
    """Shard `index` of `count`: a seeded permutation dealt round-robin, so shards are disjoint and cover the set."""
    if count <= 0 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} is not valid: need 0 <= I < N")
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[index::count])


def shard(dataset: Dataset, index: int, count: int, seed: int = 0) -> Dataset:
    return dataset if count == 1 else Subset(dataset, shard_indices(len(dataset), index, count, seed))


def batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """An endless stream of shuffled full batches; the same seed gives the same stream."""
    if len(dataset) < batch_size:
        raise ConfigError(f"data: {len(dataset)} training examples are fewer than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(dataset, TensorDataset):  # in-memory: index directly, no loader overhead
        x, y = dataset.tensors
        while True:
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                idx = perm[i:i + batch_size]
                yield x[idx], y[idx]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=gen), drop_last=True)
    while True:
        yield from loader


def eval_loader(dataset: Dataset, batch_size: int = 512) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
