"""Quality on digits: full, lora, mhlora, lte (T = 1, 10, 50) and the DiLoCo-style baseline, several seeds.

    .venv/bin/python benchmarks/quality.py [--steps 400] [--seeds 0 1 2] [--jobs 2] [--device cpu|cuda] [--quick]

Every method sees the same samples (cumulative batch 64 of configs/digits.yaml, split across the 4 heads or
workers where there are any), so the eval curves compare at equal samples. Reports the test accuracy at the end and
along the way, and the samples each method needs to reach 99 % of full training's final accuracy (interpolated on
the eval curve). Targets (issue 5): LTE with T = 10 ends within 0.5 points of full and needs at most 1.2x its samples.
"""
from __future__ import annotations

import statistics

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


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, help="steps per run (default 400; quick 80)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; quick 0")
    ap.add_argument("--eval-every", type=int, help="default 20; quick 10")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each on CPU)")
    args = parse(ap)
    steps = args.steps or (80 if args.quick else 400)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    every = args.eval_every or (10 if args.quick else 20)
    common = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": every}
    banner(f"Quality on digits: {steps} steps x batch 64, seeds {seeds}", args.quick)

    jobs = [TrainJob(label, method, seed, {**common, **over}) for seed in seeds for label, method, over in VARIANTS]
    runs = run_jobs(jobs, args.config, args.device, args.jobs)
    by = {label: [r for r in runs if r["label"] == label] for label, _, _ in VARIANTS}

    full_final = statistics.fmean(r["test_accuracy"] for r in by["full"])
    target = 0.99 * full_final
    reach = {k: [samples_to_reach(r["eval_curve"], target) for r in rs] for k, rs in by.items()}
    full_reach = statistics.fmean(s for s in reach["full"] if s is not None) if all(reach["full"]) else None
    def curve_at(rs: list[dict], frac: float) -> list[float]:  # accuracy at the evaluation nearest frac of the budget
        return [r["eval_curve"][max(0, round(len(r["eval_curve"]) * frac) - 1)]["test_accuracy"] for r in rs]

    rows, summary = [], {}
    for label, rs in by.items():
        got = [s for s in reach[label] if s is not None]
        mean_reach = statistics.fmean(got) if len(got) == len(rs) else None
        reach_txt = (f"{mean_reach:,.0f}" if mean_reach is not None else
                     f"not reached ({len(got)}/{len(rs)} seeds)" if got else "not reached")
        ratio = mean_reach / full_reach if mean_reach is not None and full_reach else None
        final = [r["test_accuracy"] for r in rs]
        summary[label] = {"final_mean": statistics.fmean(final), "final": final, "samples_to_target": reach[label],
                          "samples_ratio_to_full": ratio}
        rows.append([label, pm(final), pm(curve_at(rs, 0.25)), pm(curve_at(rs, 0.5)), reach_txt,
                     f"{ratio:.2f}" if ratio is not None else "—", f"{rs[0]['trainable_parameters']:,}"])
    print(f"full's final accuracy {full_final:.4f}; target 99 % of it = {target:.4f}\n")
    text = table(["method", "final test acc", "acc at 25 % samples", "acc at 50 %", "samples to 99 % of full",
                  "x full", "trainable params"], rows)

    lte = summary["lte T=10"]
    gap = (full_final - lte["final_mean"]) * 100
    ok_acc = gap <= TARGET_POINTS
    ok_samples = lte["samples_ratio_to_full"] is not None and lte["samples_ratio_to_full"] <= TARGET_SAMPLES
    verdicts = [
        f"LTE T=10 final accuracy {lte['final_mean']:.4f} vs full {full_final:.4f}: {gap:+.2f} points behind "
        f"(target <= {TARGET_POINTS}): {'met' if ok_acc else 'NOT met'}",
        f"LTE T=10 samples to 99 % of full: "
        f"{'%.2fx' % lte['samples_ratio_to_full'] if lte['samples_ratio_to_full'] else 'not reached'} full's "
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
    write_json(args.out_dir, "quality", {"machine": machine(args.device), "quick": args.quick, "steps": steps,
                                          "seeds": seeds, "eval_every": every, "full_final": full_final,
                                          "target_accuracy": target, "summary": summary, "table": text,
                                          "verdicts": verdicts, "runs": runs})


if __name__ == "__main__":
    main()
