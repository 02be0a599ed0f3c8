"""The sweep behind configs/digits.yaml: LTE's learning rates, alpha and A's init scale at a fixed step budget.

    .venv/bin/python benchmarks/sweep_digits.py --steps 800 --alpha 64 256 1024 --lr 3e-4 --replica-lr 1e-3

Every combination of the given values is one run; prints one table row per run and writes JSON. docs/algorithm.md
records the tables it printed.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from lte.config import load_spec
from lte.data import load_datasets
from lte.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--alpha", type=float, nargs="+", default=[256])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4])
    ap.add_argument("--replica-lr", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--a-init", nargs="+", default=["sqrt_in_over_r"])
    ap.add_argument("--out", default="results/sweep_digits.json")
    args = ap.parse_args()
    rows = []
    print(f"{'alpha':>6} {'lr':>8} {'replica_lr':>10} {'a_init':>15} {'test acc':>8} {'test loss':>9}", flush=True)
    for alpha, lr, rlr, a_init in itertools.product(args.alpha, args.lr, args.replica_lr, args.a_init):
        spec = load_spec(args.config, {"lte": {"alpha": alpha, "a_init": a_init}, "eval_every": args.steps,
                                       "optim": {"lr": lr, "replica_lr": rlr, "steps": args.steps}})
        r = train(spec, "lte", progress=False, datasets=load_datasets(spec.data, spec.seed))
        rows.append({"alpha": alpha, "lr": lr, "replica_lr": rlr, "a_init": a_init, "steps": args.steps,
                     "test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"]})
        print(f"{alpha:>6g} {lr:>8.0e} {rlr:>10.0e} {a_init:>15} {r['test_accuracy']:>8.4f} {r['test_loss']:>9.4f}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
