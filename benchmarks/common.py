"""What every benchmark script shares: arguments, the machine record, tables, JSON, plots, training jobs, timing.

The scripts stay readable top to bottom because the plumbing lives here. Tables print as Markdown, so what a run
prints is what docs/benchmarks.md shows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from lte.data import batches
from lte.train import optimizer_step, param_groups, warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench"


# ----- arguments and the machine ---------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer steps, seeds and repetitions (labelled QUICK)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and PNG files go")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, then refuse a CUDA run without CUDA with one line, not a traceback."""
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{ap.prog}: error: --device cuda: no CUDA device is available", file=sys.stderr)
        sys.exit(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return args


def machine(device: str) -> dict[str, Any]:
    """Where and when a number was measured: every JSON file carries it."""
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0], "device": device, "processor": platform.processor() or platform.machine()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def banner(title: str, quick: bool) -> None:
    print(f"\n## {title}{'  [QUICK: reduced settings, not the reported numbers]' if quick else ''}\n", flush=True)


# ----- output -----------------------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; prints it and returns it (the JSON keeps it too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])
    print(text, flush=True)
    return text


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


def pyplot():
    """matplotlib.pyplot (headless), or None when the `bench` extra is not installed: the tables still print."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): plots skipped", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out_dir: Path, name: str) -> None:
    # Small DPI keeps the PNGs commit-sized (tens of KB) for docs/img/.
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


# ----- statistics -------------------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: Sequence[float], fmt: str = ".4f") -> str:
    m, s = mean_std(xs)
    return f"{m:{fmt}} ± {s:{fmt}}"


def median_iqr(xs: Sequence[float]) -> tuple[float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q2, q3 - q1


# ----- training jobs (quality and LoRA-rank benchmarks) -----------------------------------------------------------
@dataclass(frozen=True)
class TrainJob:
    """One `lte.train.train` run: a labelled method with spec overrides and a seed (and the frozen base's dtype,
    which is a peer's choice, not part of the spec)."""
    label: str
    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    base_dtype: str = "fp32"
    participation: float = 1.0  # emulated peers missing rounds (lte.train.train), not part of the spec


def _run_job(job: TrainJob, config: str, device: str, threads: int) -> dict[str, Any]:
    from lte.config import load_spec
    from lte.data import load_datasets
    from lte.train import train

    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(config, {**job.overrides, "seed": job.seed})
    data = load_datasets(spec.data, 0)  # one split for every seed: seeds vary init, head seeds and batch order
    r = train(spec, job.method, device=device, progress=False, datasets=data, base_dtype=job.base_dtype,
              participation=job.participation)
    return {**asdict(job), **{k: r[k] for k in ("test_accuracy", "test_loss", "wall_time_s", "trainable_parameters",
                                                 "samples_seen", "merges", "eval_curve")}}


def run_jobs(jobs: Sequence[TrainJob], config: str, device: str, workers: int) -> list[dict[str, Any]]:
    """Run training jobs, `workers` at a time in fresh processes with one thread each (on CPU, two single-thread
    runs beat one two-thread run for models this small). Results come back in job order."""
    threads = 1 if device == "cpu" and workers > 1 else 0
    bar = tqdm(total=len(jobs), desc="training runs", dynamic_ncols=True, file=sys.stdout)
    if workers <= 1:
        out = []
        for j in jobs:
            out.append(_run_job(j, config, device, threads))
            bar.update()
        bar.close()
        return out
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, j, config, device, threads) for j in jobs]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        out = [f.result() for f in futures]
    bar.close()
    return out


def samples_to_reach(curve: Sequence[dict[str, Any]], target: float) -> float | None:
    """Samples at which the eval curve first reaches `target`, interpolated linearly between the two evaluations
    around the crossing (the first evaluation's samples when that one already reaches it); None when it never does."""
    prev = None
    for e in curve:
        s, a = float(e["samples"]), e["test_accuracy"]
        if a >= target:
            if prev is None:
                return s
            return prev[0] + (target - prev[1]) / (a - prev[1]) * (s - prev[0])
        prev = (s, a)
    return None


# ----- the reference training step (compute and memory benchmarks) ---------------------------------------------
class StepTrainer:
    """`lte.train.HeadTrainer`'s step for any model: the same batch stream, loss, AdamW groups and schedule.

    With the unconverted model and method "full" it is standard training, the reference an LTE peer is compared
    with; with an N-head `LTEModel` and "lte" it is the simulator's N emulated heads."""

    def __init__(self, spec, model: torch.nn.Module, method: str, train_set, batch_size: int, device: str = "cpu"):
        self.device = device
        self.model = model.to(device)
        self.opt = torch.optim.AdamW(param_groups(self.model, spec, method), betas=spec.optim.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(spec.optim.warmup_steps, spec.optim.steps))
        self.stream = batches(train_set, batch_size, spec.seed)

    def train_steps(self, n: int) -> None:
        for _ in range(n):
            optimizer_step(self.model, self.opt, self.sched, next(self.stream), self.device)


# ----- timing ----------------------------------------------------------------------------------------------------
def interleaved_times(cases: dict[str, Callable[[], None]], warmup: int, reps: int,
                      device: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each case `reps` times, round-robin (case A, B, C, A, B, C, ...), after `warmup` rounds.

    Interleaving exposes every case to the same background load, so their ratio is fair on a shared machine even
    when absolute times drift. Returns (wall seconds, process CPU seconds) per case: on a CPU shared with other
    jobs the CPU time leaves out the time spent waiting for a core."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    sync()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in tqdm(range(reps), desc="timing", leave=False, dynamic_ncols=True, file=sys.stdout):
        for k, fn in cases.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu
