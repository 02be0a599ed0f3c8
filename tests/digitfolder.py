"""A small ImageFolder of real images for data-shipping tests: scikit-learn's digits drawn at 32x32 as PNG files."""
from __future__ import annotations

from pathlib import Path

# An image-folder run small enough for 2 CPU cores: 32x32 inputs cut into 16 patches of 8x8 (each 2x2 pixels of
# the original 8x8 digit), RGB as ImageFolder loads it, and the learning settings of netproc.SMALL_SPEC.
FOLDER_SPEC = """\
run: digits-folder
seed: 0
model:
  name: vit_tiny_patch16_224
  kwargs: {{img_size: 32, patch_size: 8, in_chans: 3, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 4}}
data:
  dataset: imagefolder
  path: {path}
  image_size: 32
  batch_size: 64
  test_fraction: 0.2
lte:
  heads: 4
  rank: 8
  alpha: 64
  merge_every: 20
  reset: false
  fold: true
  dense_modules: [head]
optim:
  lr: 1.0e-3
  replica_lr: 3.0e-3
  warmup_steps: 5
  steps: 1500
eval_every: 100
"""


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
    path.write_text(FOLDER_SPEC.format(path=folder))
    return path
