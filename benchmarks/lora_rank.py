"""Does one LoRA head, trained from scratch, fall short of full training on digits (the paper's first claim)?

    .venv/bin/python benchmarks/lora_rank.py [--ranks 8 4] [--scales 8] [--replicas-only] [--classifier-lora] [--lte]
                                             [--steps 400] [--seeds 0 1 2] [--jobs 2] [--device cpu|cuda] [--quick]

Every (rank, scale) pair is one `lora` variant with alpha = scale * rank, so the update's scale s = alpha / r stays
fixed as the rank shrinks (a fixed alpha blows s up at small ranks: that diverges, which is a step-size effect, not
a rank effect). Two controls put the rank result in context:
  --replicas-only    alpha ~ 0: the LoRA path contributes nothing, only the dense replicas (patch embedding,
                     position embedding, norms, biases, classifier) train. What the blocks add beyond that is what
                     the rank limits.
  --classifier-lora  the classifier is a LoRA layer too (lte.dense_modules = []), closer to the paper's code, which
                     converts every linear layer.
  --lte              LTE at the same rank and scale too (the config's 4 heads, merged every T = 10 steps): the
                     paper's second claim, that many heads of a rank too small for one head, merged, recover full
                     training, because each merge adds up to heads x rank to the base's accumulated update.
Same seeds, data and step budget as `full`, which runs alongside as the reference. With --full-from QUALITY_JSON
(what `make bench` passes), `full`'s runs are taken from the quality benchmark of the same run instead, when they
are exactly the runs this one would repeat: same config, device, torch, seeds and overrides (all but `eval_every`,
which does not touch training). Training is deterministic, so they are the same numbers, three runs sooner.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from common import TrainJob, banner, machine, parse, parser, pm, pyplot, run_jobs, save_figure, table, write_json


def variants(ranks: list[int], scales: list[float], replicas_only: bool, classifier_lora: bool,
             lte: bool = False) -> list[tuple[str, str, dict]]:
    out = [("full", "full", {})]
    for r in ranks:
        for s in scales:
            out.append((f"lora r={r} s={s:g}", "lora", {"lte": {"rank": r, "alpha": s * r}}))
            if lte:
                out.append((f"lte r={r} s={s:g}", "lte", {"lte": {"rank": r, "alpha": s * r, "merge_every": 10}}))
            if classifier_lora and r <= 10:  # the classifier has 10 outputs: the rank cannot exceed that
                out.append((f"lora r={r} s={s:g} +classifier", "lora",
                            {"lte": {"rank": r, "alpha": s * r, "dense_modules": []}}))
    if replicas_only:
        out.append(("replicas only (s ~ 0)", "lora", {"lte": {"rank": min(ranks), "alpha": 1e-6}}))
    return out


def stored_runs(path: Path | None, jobs: list[TrainJob], config: str, device: str) -> dict[int, dict]:
    """{job index: stored run} for the jobs that `path` (a quality benchmark's JSON) already ran exactly: its
    `full` runs, in practice (its LoRA variants have other ranks)."""
    if path is None or not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if (stored.get("config"), stored.get("device"), stored["machine"].get("torch")) != (config, device, torch.__version__):
        return {}
    same = lambda a, b: {k: v for k, v in a.items() if k != "eval_every"} == {k: v for k, v in b.items() if k != "eval_every"}  # noqa: E731
    out = {}
    for i, job in enumerate(jobs):
        for run in stored["runs"]:
            if (run["method"], run["seed"], run["base_dtype"]) == (job.method, job.seed, job.base_dtype) \
                    and same(run["overrides"], job.overrides):
                out[i] = {**run, "label": job.label, "from": str(path)}
                break
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--ranks", type=int, nargs="+", help="default 8 4; quick 4")
    ap.add_argument("--scales", type=float, nargs="+", default=[8.0], help="s = alpha / r (default 8, the default config's)")
    ap.add_argument("--replicas-only", action="store_true")
    ap.add_argument("--classifier-lora", action="store_true")
    ap.add_argument("--lte", action="store_true")
    ap.add_argument("--steps", type=int, help="default 400; quick 80")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; quick 0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--full-from", type=Path, metavar="QUALITY_JSON",
                    help="take full's runs from this quality benchmark JSON when they are the same runs")
    args = parse(ap)
    steps = args.steps or (80 if args.quick else 400)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    ranks = args.ranks or ([4] if args.quick else [8, 4])
    common = {"optim": {"steps": steps, "warmup_steps": min(50, steps // 8)}, "eval_every": steps}
    grid = variants(ranks, args.scales, args.replicas_only, args.classifier_lora, args.lte)
    banner(f"One LoRA head vs full training on digits (embed 128): {steps} steps, seeds {seeds}", args.quick)

    jobs = [TrainJob(label, method, seed, {**common, **over}) for seed in seeds for label, method, over in grid]
    reused = stored_runs(args.full_from, jobs, args.config, args.device)
    if reused:
        print(f"{len(reused)} run(s) taken from {args.full_from} (the same runs; training is deterministic): "
              f"{', '.join(sorted({jobs[i].label for i in reused}))}")
    fresh = iter(run_jobs([j for i, j in enumerate(jobs) if i not in reused], args.config, args.device, args.jobs))
    runs = [reused[i] if i in reused else next(fresh) for i in range(len(jobs))]
    by = {label: [r for r in runs if r["label"] == label] for label, _, _ in grid}
    full = statistics.fmean(r["test_accuracy"] for r in by["full"])

    rows, summary = [], {}
    for label, method, over in grid:
        rs = by[label]
        acc = [r["test_accuracy"] for r in rs]
        lte = over.get("lte", {})
        mean = statistics.fmean(acc)
        summary[label] = {"final": acc, "final_mean": mean, "gap_points": (full - mean) * 100}
        rows.append([label, lte.get("rank", "—"), f"{lte['alpha']:g}" if "alpha" in lte else "—",
                     f"{rs[0]['trainable_parameters']:,}", pm(acc), f"{summary[label]['gap_points']:+.2f}"])
    text = table(["variant", "rank", "alpha", "trainable params", "final test acc", "points behind full"], rows)

    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
        labels = list(by)
        means = [statistics.fmean(r["test_accuracy"] for r in by[k]) for k in labels]
        stds = [statistics.stdev([r["test_accuracy"] for r in by[k]]) if len(seeds) > 1 else 0 for k in labels]
        ax.barh(labels, means, xerr=stds, color=["0.4"] + ["C0"] * (len(labels) - 1))
        ax.axvline(full, color="k", lw=0.8, ls=":")
        ax.set(xlabel="final test accuracy", xlim=(max(0.0, min(means) - 0.05), 1.0),
               title=f"one LoRA head vs full, {steps} steps, {len(seeds)} seed(s){' (QUICK)' if args.quick else ''}")
        ax.invert_yaxis()
        save_figure(fig, args.out_dir, "lora_rank")
    write_json(args.out_dir, "lora_rank", {"machine": machine(args.device), "quick": args.quick, "steps": steps,
                                            "seeds": seeds, "full_final": full, "summary": summary, "table": text,
                                            "runs": runs})


if __name__ == "__main__":
    main()
