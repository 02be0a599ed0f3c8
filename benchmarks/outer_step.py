"""An outer Nesterov step on LTE's merged update and lossy wires, against plain LTE, as T grows (issue 13, design
notes §6), on digits.

    .venv/bin/python benchmarks/outer_step.py [--steps 400] [--seeds 0 1 2] [--merge-every 10 50] [--outer 0.7,0.9 1.0,0.5]
                                              [--wires raw int8]

Each variant is LTE at one T (`lte.merge_every`) with an outer step `lr,momentum` (`lte.outer_lr`,
`lte.outer_momentum`; "none" is 1,0: plain LTE) and one wire (`lte.wire`: raw fp32, fp16 or int8 factors). The sweep is recorded as run, every variant against plain LTE at
T = 10 with the same seed. Runs are stored under <out-dir>/outer_runs/ as they finish and reused on a rerun with the
same settings (training is deterministic).
"""
from __future__ import annotations


from common import TrainJob, banner, machine, parse, parser, pm, table, write_json
from pipeline_quality import run_cached


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, help="steps per run (default 400; quick 60)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; quick 0")
    ap.add_argument("--merge-every", type=int, nargs="+", help="values of T (default 10 50; quick 20)")
    ap.add_argument("--outer", nargs="+", default=["0.7,0.9"], help="outer steps lr,momentum besides none")
    ap.add_argument("--wires", nargs="+", default=["raw"], choices=["raw", "fp16", "int8"],
                    help="lte.wire of the variants (each T and outer step runs with each)")
    ap.add_argument("--eval-every", type=int, help="default 50; quick 20")
    ap.add_argument("--jobs", type=int, default=2, help="training runs in parallel (one thread each on CPU)")
    args = parse(ap)
    steps = args.steps or (60 if args.quick else 400)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    every = args.eval_every or (20 if args.quick else 50)
    ts = args.merge_every or ([20] if args.quick else [10, 50])
    # "none" always runs (the reference); `--outer 1,0` alone runs only it
    outers = list(dict.fromkeys([(1.0, 0.0)] + [tuple(float(x) for x in o.split(",")) for o in args.outer]))
    common = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": every}
    banner(f"Outer step on LTE's merge, digits, {steps} steps, T in {ts}, seeds {seeds}", args.quick)

    def label(t: int, lr: float, mu: float, wire: str = "raw") -> str:
        return (f"T={t} " + ("none" if (lr, mu) == (1.0, 0.0) else f"outer lr {lr} mom {mu}")
                + ("" if wire == "raw" else f", {wire} wire"))

    def lte(t: int, lr: float, mu: float, wire: str) -> dict:
        over = {"merge_every": t, "outer_lr": lr, "outer_momentum": mu}
        return over | ({"wire": wire} if wire != "raw" else {})  # raw: the same runs (and cache) as before

    variants = [(label(t, lr, mu, w), {"lte": lte(t, lr, mu, w)}) for t in ts for lr, mu in outers for w in args.wires]
    ref = label(10, 1.0, 0.0)
    if ref not in dict(variants):
        variants.insert(0, (ref, {"lte": {"merge_every": 10}}))
    jobs = [TrainJob(name, "lte", seed, {**common, **over}) for name, over in variants for seed in seeds]
    jobs.sort(key=lambda j: (j.seed, j.label))
    runs = run_cached(jobs, args.config, args.device, args.jobs, args.out_dir / "outer_runs")
    by = {name: sorted((r for r in runs if r["label"] == name), key=lambda r: r["seed"]) for name, _ in variants}
    base = [r["test_accuracy"] for r in by[ref]]
    rows, summary = [], {}
    for name, rs in by.items():
        final = [r["test_accuracy"] for r in rs]
        diff = [100 * (a - b) for a, b in zip(final, base)]
        summary[name] = {"final": final, "points_vs_T10": diff}
        rows.append([name, pm(final), "—" if name == ref else pm(diff, "+.2f")])
    text = table(["variant", "final test acc", f"points vs {ref} (same seed)"], rows)
    write_json(args.out_dir, "outer_step", {
        "machine": machine(args.device), "quick": args.quick, "steps": steps, "config": args.config, "seeds": seeds,
        "merge_every": ts, "outer": outers, "wires": args.wires, "summary": summary, "table": text, "runs": runs})


if __name__ == "__main__":
    main()
