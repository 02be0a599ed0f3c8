"""Run every benchmark in sequence, each in its own process, then print all their tables together.

    .venv/bin/python benchmarks/run.py [--quick] [--device cpu|cuda] [--only quality compute ...]

`make bench` runs this (CPU, under 30 minutes on 2 idle cores); `make bench-quick` runs it with --quick
(fewer steps and seeds, under 5 minutes: a smoke run whose numbers are labelled QUICK and are not the reported
ones). docs/benchmarks.md records the full run. Results: results/bench/*.json and *.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "bench"

# name -> script, or None for a benchmark that is not built yet (listed so the gap shows in every run). Order
# matters: communication reads the quality benchmark's JSON of the same run for its bytes-to-target table.
BENCHMARKS: dict[str, str | None] = {
    "compute": "compute.py",
    "memory": "memory.py",
    "quality": "quality.py",
    "lora_rank": "lora_rank.py",
    "base_dtype": "base_dtype.py",
    "communication": "communication.py",
    "round_latency": "round_latency.py",
}
# lora_rank's `full` runs are quality's (same seeds and steps): it takes them from quality's JSON of this run.
EXTRA_ARGS = {"lora_rank": ["--replicas-only", "--full-from", str(RESULTS / "quality.json")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    t0, walls, failed = time.perf_counter(), {}, []
    for name in names:
        script = BENCHMARKS[name]
        if script is None:
            print(f"\n## {name}: not yet measured (no benchmark script yet)", flush=True)
            continue
        cmd = [sys.executable, str(HERE / script), "--device", args.device] + (["--quick"] if args.quick else [])
        cmd += EXTRA_ARGS.get(name, [])
        t = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        walls[name] = time.perf_counter() - t

    print(f"\n# Summary{' (QUICK)' if args.quick else ''}: wall time {time.perf_counter() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in walls.items())})")
    for name in names:
        path = RESULTS / f"{name}.json"
        if BENCHMARKS[name] is None:
            print(f"\n## {name}\nnot yet measured")
        elif name in failed or not path.exists():
            print(f"\n## {name}\nFAILED (see its output above)")
        else:
            data = json.loads(path.read_text())
            print(f"\n## {name}\n")
            for t in data.get("tables") or [data["table"]]:
                print(t + "\n")
            for v in data.get("verdicts", []):
                print(v)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
