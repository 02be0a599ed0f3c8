"""A small ImageFolder of real images for data-shipping tests: scikit-learn's digits drawn at 32x32 as PNG files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from netproc import SMALL_SPEC

def folder_spec(folder: Path) -> dict[str, Any]:
    """netproc.SMALL_SPEC's run on an image folder: 32x32 inputs cut into 16 patches of 8x8 (each 2x2 pixels of the
    original 8x8 digit), RGB as ImageFolder loads it; the learning settings are SMALL_SPEC's."""
    spec = yaml.safe_load(SMALL_SPEC)
    spec["run"] = "digits-folder"
    spec["model"]["kwargs"].update(img_size=32, patch_size=8, in_chans=3)
    spec["data"] = {"dataset": "imagefolder", "path": str(folder), "image_size": 32, "batch_size": 64,
                    "test_fraction": 0.2}
    return spec


def make_digit_folder(root: Path, limit: int | None = None) -> Path:
    """`root/<digit>/<i>.png` for each of scikit-learn's 1,797 digits (or the first `limit`), 32x32 greyscale PNG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = len(x) if limit is None else limit
    for i in range(n):
        d = root / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((x[i].reshape(8, 8) * (255 / 16)).astype(np.uint8), mode="L")
        img.resize((32, 32), Image.NEAREST).save(d / f"{i:04d}.png")
    return root


def write_folder_spec(directory: Path, folder: Path) -> Path:
    path = Path(directory) / "folder-spec.yaml"
    path.write_text(yaml.safe_dump(folder_spec(folder), sort_keys=False))
    return path
