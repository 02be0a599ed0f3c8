"""full vs lora vs mhlora vs lte on the digits benchmark, same step budget, side by side in one run.

    .venv/bin/python benchmarks/compare_digits.py [--steps 1500] [--seeds 0] [--out results/compare_digits.json]

Prints a table (test accuracy at the end and at the halfway evaluation, trainable parameters, wall time ratio to
`full`); docs/algorithm.md records what it printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lte.config import load_spec
from lte.data import load_datasets
from lte.train import METHODS, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/compare_digits.json")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        spec = load_spec(args.config, {"seed": seed, "optim": {"steps": args.steps}, "eval_every": args.steps // 2})
        data = load_datasets(spec.data, 0)  # one split for all seeds: seeds vary init and batch order
        for method in args.methods:
            r = train(spec, method, device=args.device, progress=False, datasets=data)
            rows.append({"seed": seed, **{k: r[k] for k in ("method", "test_accuracy", "test_loss", "wall_time_s",
                                                             "trainable_parameters", "samples_seen")},
                         "half_accuracy": r["eval_curve"][0]["test_accuracy"]})
            print(f"seed {seed} {method:>7}: acc {r['test_accuracy']:.4f}", flush=True)
    full_wall = statistics.mean(r["wall_time_s"] for r in rows if r["method"] == "full") if "full" in args.methods else None
    print(f"\n{'method':>7} {'test acc (mean ± std)':>22} {'acc at half':>11} {'trainable':>10} {'time / full':>11}")
    for m in args.methods:
        rs = [r for r in rows if r["method"] == m]
        accs = [r["test_accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = statistics.mean(r["wall_time_s"] for r in rs) / full_wall if full_wall else float("nan")
        print(f"{m:>7} {statistics.mean(accs):>14.4f} ± {std:.4f} {statistics.mean(r['half_accuracy'] for r in rs):>11.4f} "
              f"{rs[0]['trainable_parameters']:>10,} {ratio:>11.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
