"""Accuracy cost of a low-precision frozen base (`lte-peer join --base-dtype bf16|int8`) on digits.

    .venv/bin/python benchmarks/base_dtype.py [--steps 200] [--seeds 0] [--jobs 2] [--device cpu|cuda] [--quick]

LTE on configs/digits.yaml (4 heads, T = 10), the same seeds, data and steps, with every head's frozen base held
in fp32, bf16 or int8 (the case where every peer of a run chose it). Merges apply to the fp32 master either way,
so the base itself carries no quantization error; what differs is each head's forward and gradients between
merges, computed against the rounded weights. The evaluation is of the merged fp32 base, as the coordinator's is.
"""
from __future__ import annotations

import statistics

from common import TrainJob, banner, machine, parse, parser, pm, run_jobs, table, write_json

BASE_DTYPES = ("fp32", "bf16", "int8")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, help="steps per run (default 200; quick 60)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each on CPU)")
    args = parse(ap)
    steps = args.steps or (60 if args.quick else 200)
    seeds = args.seeds or [0]
    over = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": steps}
    banner(f"Low-precision frozen base: LTE on digits, {steps} steps x batch 64, seeds {seeds}", args.quick)

    jobs = [TrainJob(dt, "lte", seed, over, base_dtype=dt) for seed in seeds for dt in BASE_DTYPES]
    runs = run_jobs(jobs, args.config, args.device, args.jobs)
    by = {dt: [r for r in runs if r["base_dtype"] == dt] for dt in BASE_DTYPES}
    ref = {r["seed"]: r["test_accuracy"] for r in by["fp32"]}
    rows = []
    for dt, rs in by.items():
        diff = [100 * (r["test_accuracy"] - ref[r["seed"]]) for r in rs]
        rows.append([dt, pm([r["test_accuracy"] for r in rs]), pm([r["test_loss"] for r in rs]),
                     "—" if dt == "fp32" else f"{statistics.fmean(diff):+.2f}"
                     + (f" ± {statistics.stdev(diff):.2f}" if len(diff) > 1 else ""),
                     f"{statistics.fmean(r['wall_time_s'] for r in rs):.0f}"])
    print()
    text = table(["base dtype", "final test acc", "final test loss", "points vs fp32 (same seed)", "wall s"], rows)
    write_json(args.out_dir, "base_dtype", {"machine": machine(args.device), "quick": args.quick, "steps": steps,
                                             "seeds": seeds, "table": text, "runs": runs})


if __name__ == "__main__":
    main()
