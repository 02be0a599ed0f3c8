"""Quality on digits: full, lora, mhlora, lte (T = 1, 10, 50) and the DiLoCo-style baseline, several seeds.

    .venv/bin/python benchmarks/quality.py [--steps 400] [--seeds 0 1 2] [--jobs 2] [--device cpu|cuda] [--quick]

Every method sees the same samples (cumulative batch 64 of configs/digits.yaml, split across the 4 heads or
workers where there are any), so the eval curves compare at equal samples. Reports the test accuracy at the end and
along the way, and the samples each method needs to reach 99 % of full training's final accuracy (interpolated on
the eval curve). Targets (issue 5): LTE with T = 10 ends within 0.5 points of full and needs at most 1.2x its samples.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import (TrainJob, banner, machine, parse, parser, pm, pyplot, run_jobs, samples_to_reach, save_figure, table,
                    write_json)

VARIANTS: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("lora", "lora", {}),
    ("mhlora", "mhlora", {}),
    ("lte T=1", "lte", {"lte": {"merge_every": 1}}),
    ("lte T=10", "lte", {"lte": {"merge_every": 10}}),
    ("lte T=50", "lte", {"lte": {"merge_every": 50}}),
    ("diloco T=10", "diloco", {"lte": {"merge_every": 10}}),
]
TARGET_POINTS, TARGET_SAMPLES = 0.5, 1.2


def mean_curve(rs: list[dict]) -> list[dict]:
    """The seeds' eval curves averaged point by point (every run of a benchmark evaluates at the same steps)."""
    return [{"samples": pts[0]["samples"], "test_accuracy": statistics.fmean(p["test_accuracy"] for p in pts)}
            for pts in zip(*(r["eval_curve"] for r in rs))]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, help="steps per run (default 400; quick 80)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; quick 0")
    ap.add_argument("--eval-every", type=int, help="default 20; quick 10")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each on CPU)")
    ap.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], metavar="LABEL",
                    help="run only these (full is always run: it is the reference); default all")
    ap.add_argument("--from-json", type=Path, metavar="QUALITY_JSON",
                    help="analyse the runs stored by an earlier run instead of training (same tables and plot)")
    args = parse(ap)
    if args.from_json:
        stored = json.loads(args.from_json.read_text())
        args.steps, args.seeds, args.eval_every = stored["steps"], stored["seeds"], stored["eval_every"]
    steps = args.steps or (80 if args.quick else 400)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    every = args.eval_every or (10 if args.quick else 20)
    common = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": every}
    banner(f"Quality on digits: {steps} steps x batch 64, seeds {seeds}", args.quick)

    if args.from_json:
        runs = stored["runs"]
    else:
        variants = [v for v in VARIANTS if v[0] == "full" or not args.variants or v[0] in args.variants]
        jobs = [TrainJob(label, method, seed, {**common, **over}) for seed in seeds for label, method, over in variants]
        runs = run_jobs(jobs, args.config, args.device, args.jobs)
    labels = [v[0] for v in VARIANTS if any(r["label"] == v[0] for r in runs)]
    by = {label: [r for r in runs if r["label"] == label] for label in labels}

    full_final = statistics.fmean(r["test_accuracy"] for r in by["full"])
    target = 0.99 * full_final
    # Samples to the target on the seeds' mean curve (full's mean curve always gets there: it ends at full_final),
    # and how many single seeds get there on their own.
    reach = {k: samples_to_reach(mean_curve(rs), target) for k, rs in by.items()}
    seeds_reaching = {k: sum(samples_to_reach(r["eval_curve"], target) is not None for r in rs) for k, rs in by.items()}

    def curve_at(rs: list[dict], frac: float) -> list[float]:  # accuracy at the evaluation nearest frac of the budget
        return [r["eval_curve"][max(0, round(len(r["eval_curve"]) * frac) - 1)]["test_accuracy"] for r in rs]

    rows, summary = [], {}
    for label, rs in by.items():
        ratio = reach[label] / reach["full"] if reach[label] is not None else None
        final = [r["test_accuracy"] for r in rs]
        summary[label] = {"final_mean": statistics.fmean(final), "final": final, "samples_to_target": reach[label],
                          "samples_ratio_to_full": ratio, "seeds_reaching": seeds_reaching[label]}
        rows.append([label, pm(final), pm(curve_at(rs, 0.25)), pm(curve_at(rs, 0.5)),
                     f"{reach[label]:,.0f}" if reach[label] is not None else "not reached",
                     f"{ratio:.2f}" if ratio is not None else "—", f"{seeds_reaching[label]}/{len(rs)}",
                     f"{rs[0]['trainable_parameters']:,}"])
    print(f"full's final accuracy {full_final:.4f}; target 99 % of it = {target:.4f}\n")
    text = table(["method", "final test acc", "acc at 25 % samples", "acc at 50 %", "samples to 99 % of full (mean curve)",
                  "x full", "seeds reaching it", "trainable params"], rows)

    lte = summary.get("lte T=10", {"final_mean": float("nan"), "samples_ratio_to_full": None})
    gap = (full_final - lte["final_mean"]) * 100
    ok_acc = gap <= TARGET_POINTS
    ok_samples = lte["samples_ratio_to_full"] is not None and lte["samples_ratio_to_full"] <= TARGET_SAMPLES
    verdicts = [
        f"LTE T=10 final accuracy {lte['final_mean']:.4f} vs full {full_final:.4f}: {gap:+.2f} points behind "
        f"(target <= {TARGET_POINTS}): {'met' if ok_acc else 'NOT met'}",
        f"LTE T=10 samples to 99 % of full: "
        f"{'%.2fx full' % lte['samples_ratio_to_full'] if lte['samples_ratio_to_full'] else 'not reached'} "
        f"(target <= {TARGET_SAMPLES}x): {'met' if ok_samples else 'NOT met'}",
    ]
    print("\n" + "\n".join(verdicts))

    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, rs in by.items():
            xs = [e["samples"] for e in rs[0]["eval_curve"]]
            ys = [[r["eval_curve"][i]["test_accuracy"] for r in rs] for i in range(len(xs))]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(xs, mean, label=label, lw=1.4, ls="--" if label == "full" else "-")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.axhline(target, color="k", lw=0.8, ls=":", label="99 % of full's final")
        ax.set(xlabel="training samples", ylabel="test accuracy", ylim=(max(0.0, target - 0.35), 1.0),
               title=f"digits, tiny ViT: mean ± std over {len(seeds)} seed(s){' (QUICK)' if args.quick else ''}")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        save_figure(fig, args.out_dir, "quality")
    write_json(args.out_dir, "quality", {"machine": stored["machine"] if args.from_json else machine(args.device), "quick": args.quick, "steps": steps,
                                          "config": args.config, "device": args.device, "seeds": seeds, "eval_every": every, "full_final": full_final,
                                          "target_accuracy": target, "summary": summary, "table": text,
                                          "verdicts": verdicts, "runs": runs})


if __name__ == "__main__":
    main()
