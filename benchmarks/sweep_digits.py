"""The sweep behind configs/digits.yaml: LTE learning rate x alpha (and A's init scale) at a fixed step budget.

    .venv/bin/python benchmarks/sweep_digits.py [--steps 1500] [--out results/sweep_digits.json]

Prints one table row per setting; docs/algorithm.md records the table it printed.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from lte.config import load_spec
from lte.train import train

GRID = {"lte.alpha": [64, 256, 1024], "optim.lr": [1e-4, 3e-4, 1e-3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--a-init", nargs="+", default=["sqrt_in_over_r"])
    ap.add_argument("--out", default="results/sweep_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print(f"{'alpha':>6} {'lr':>8} {'a_init':>16} {'acc':>6} {'loss':>6}", flush=True)
    for alpha, lr, a_init in itertools.product(GRID["lte.alpha"], GRID["optim.lr"], args.a_init):
        spec = load_spec(args.config, {"lte": {"alpha": alpha, "a_init": a_init},
                                       "optim": {"lr": lr, "steps": args.steps}, "eval_every": args.steps})
        r = train(spec, "lte", progress=False)
        rows.append({"alpha": alpha, "lr": lr, "a_init": a_init, "test_accuracy": r["test_accuracy"],
                     "test_loss": r["test_loss"], "final_train_loss": sum(r["loss_curve"][-50:]) / 50})
        print(f"{alpha:>6} {lr:>8.0e} {a_init:>16} {r['test_accuracy']:>6.3f} {r['test_loss']:>6.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
