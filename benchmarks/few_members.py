"""Rounds with few members: merge weights n_n / sum n against a fixed denominator (lte.round_samples), on digits.

    .venv/bin/python benchmarks/few_members.py [--steps 400] [--seeds 0 1 2] [--participation 0.5 0.25] [--jobs 2]

Each round merges every head with probability `participation` (at least one); a head left out keeps its progress
and its samples for its next round (the reset-less bookkeeping of pipelined rounds). With weights over the round's
own samples a one-member round applies that head's whole update, which on a loaded 4-peer demo dropped accuracy by
5-7 points each time (issue 12); with the fixed denominator D = T x batch (a full round's samples) a short round
moves the base by its share of a full one. Every run is stored under <out-dir>/few_members_runs/ as it finishes and
reused on a rerun with the same settings (training is deterministic).
"""
from __future__ import annotations

import statistics

from common import TrainJob, banner, machine, parse, parser, pm, table, write_json
from pipeline_quality import run_cached


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, help="steps per run (default 400; quick 60)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; quick 0")
    ap.add_argument("--participation", type=float, nargs="+", help="default 0.5 0.25; quick 0.25")
    ap.add_argument("--eval-every", type=int, help="default 50; quick 20")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each on CPU)")
    args = parse(ap)
    steps = args.steps or (60 if args.quick else 400)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    shares = args.participation or ([0.25] if args.quick else [0.5, 0.25])
    every = args.eval_every or (20 if args.quick else 50)
    from lte.config import load_spec

    spec = load_spec(args.config)
    full_round = spec.lte.merge_every * spec.data.batch_size
    common = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": every}
    banner(f"Rounds with few members on digits, {steps} steps x batch {spec.data.batch_size}, {spec.lte.heads} heads, "
           f"seeds {seeds}", args.quick)

    variants = [("every head every round", 1.0, {})]
    for p in shares:
        variants += [(f"p={p} weights n over the round", p, {}),
                     (f"p={p} weights n over D", p, {"lte": {"round_samples": full_round}})]
    jobs = [TrainJob(label, "lte", seed, {**common, **over}, participation=p)
            for label, p, over in variants for seed in seeds]
    jobs.sort(key=lambda j: (j.seed, j.label))  # a seed's variants side by side under the same machine load
    runs = run_cached(jobs, args.config, args.device, args.jobs, args.out_dir / "few_members_runs")
    by = {label: sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"]) for label, _, _ in variants}

    ref = [r["test_accuracy"] for r in by["every head every round"]]
    rows, summary = [], {}
    for label, rs in by.items():
        final = [r["test_accuracy"] for r in rs]
        # the worst drop between two consecutive evaluations: what a bad round does to the curve
        drops = [max(0.0, max(a["test_accuracy"] - b["test_accuracy"] for a, b in zip(r["eval_curve"], r["eval_curve"][1:])))
                 for r in rs]
        diff = [100 * (a - b) for a, b in zip(final, ref)]
        summary[label] = {"final": final, "points_vs_every_round": diff, "worst_drop": drops}
        rows.append([label, pm(final), "—" if label == "every head every round" else pm(diff, "+.2f"),
                     pm([100 * d for d in drops], ".2f")])
    text = table(["variant", "final test acc", "points vs every head every round (same seed)",
                  "worst drop between evaluations (points)"], rows)
    verdicts = []
    for p in shares:
        a, b = summary[f"p={p} weights n over the round"]["final"], summary[f"p={p} weights n over D"]["final"]
        verdicts.append(f"p={p}: fixed denominator minus n/sum n = {pm([100 * (y - x) for x, y in zip(a, b)], '+.2f')} "
                        "points (same seeds)")
    print("\n" + "\n".join(verdicts))
    write_json(args.out_dir, "few_members", {
        "machine": machine(args.device), "quick": args.quick, "steps": steps, "config": args.config, "seeds": seeds,
        "participation": shares, "round_samples": full_round, "summary": summary, "table": text,
        "verdicts": verdicts, "runs": runs})


if __name__ == "__main__":
    main()
