"""`lte-demo`: a whole LTE run on this machine — one coordinator and N peers as separate processes on 127.0.0.1.

Prints one line per round (peers merged, mean local loss, the coordinator's test accuracy, payload bytes moved)
and ends with the final accuracy and the checkpoint path.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from lte.cliargs import OneLineParser, device_available, directory_to_create, int_in, seconds
from lte.config import load_spec
from lte.errors import ConfigError


def _reader(name: str, stream: IO[str], out: "queue.Queue[tuple[str, dict | str]]", keep: Path) -> None:
    for line in stream:
        with open(keep, "a") as f:  # the events stay on disk for a look after the run
            f.write(line)
        line = line.strip()
        if line.startswith("{"):
            try:
                out.put((name, json.loads(line)))
                continue
            except json.JSONDecodeError:
                pass
        out.put((name, line))


def _spawn(cmd: list[str], name: str, out: "queue.Queue", log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    threading.Thread(target=_reader, args=(name, proc.stdout, out, log.with_suffix(".events")), daemon=True).start()
    return proc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="lte-demo", description=__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--peers", type=int_in(1), default=3)
    ap.add_argument("--rounds", type=int_in(1), default=40)
    ap.add_argument("--checkpoint-dir", type=Path,
                    help="default: a new runs/demo/<time>/ (an existing checkpoint dir resumes its run)")
    ap.add_argument("--round-seconds", type=seconds, default=2.0)
    ap.add_argument("--paths", choices=["auto", "factors", "dense"], default="auto",
                    help="how merged layers travel between peers (see lte-coordinator start --help)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the peers train")
    ap.add_argument("--eval-every", type=int_in(1), default=1, help="the coordinator evaluates every K rounds")
    ap.add_argument("--timeout", type=seconds, default=900.0, help="give up after this many seconds")
    ap.add_argument("--logs", type=Path, help="keep every process's log and JSON events here (default: a temp dir)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # the coordinator would refuse these too, but only in its log, seconds later
        load_spec(args.config)
        device_available(args.device)
        for flag, path in (("--checkpoint-dir", args.checkpoint_dir), ("--logs", args.logs)):
            if path is not None:
                directory_to_create(path, flag)
    except ConfigError as err:
        print(f"lte-demo: error: {err}", file=sys.stderr)
        return 2
    if args.checkpoint_dir is None:  # a fresh run each time: the coordinator would resume an existing directory
        args.checkpoint_dir = Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="lte-demo-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    events: queue.Queue = queue.Queue()
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    exe = sys.executable
    t0 = time.monotonic()
    try:
        procs.append(_spawn([exe, "-m", "coordinator.cli", "start", "--config", args.config, "--checkpoint-dir",
                             str(args.checkpoint_dir), "--max-rounds", str(args.rounds), "--round-seconds",
                             str(args.round_seconds), "--paths", args.paths, "--eval-every", str(args.eval_every),
                             "--json"], "coordinator", events,
                            logs / "coordinator.log"))
        join = None
        while join is None:
            name, ev = events.get(timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
            if isinstance(ev, str) and ev.startswith("lte-peer join --dht "):
                join = ev.split()[-1]
            if procs[0].poll() is not None:
                print(f"lte-demo: error: the coordinator exited; see {logs / 'coordinator.log'}", file=sys.stderr)
                return 1
        print(f"coordinator up at {join}; starting {args.peers} peers (logs in {logs})", flush=True)
        for i in range(args.peers):
            procs.append(_spawn([exe, "-m", "peer.cli", "join", "--dht", join, "--shard", f"{i}/{args.peers}",
                                 "--host", "127.0.0.1",  # one machine: loopback, as the coordinator
                                 "--name", f"peer{i}", "--threads", "1", "--device", args.device, "--no-progress",
                                 "--json"],
                                f"peer{i}", events, logs / f"peer{i}.log"))
        print(f"{'round':>5} {'peers':>5} {'local loss':>10} {'test acc':>8} {'bytes moved':>12}", flush=True)
        moved, last_coord_bytes, final = {}, 0, None
        while final is None:
            if time.monotonic() - t0 > args.timeout:
                print(f"lte-demo: error: no result within {args.timeout:.0f} s", file=sys.stderr)
                return 1
            try:
                name, ev = events.get(timeout=5.0)
            except queue.Empty:
                if procs[0].poll() is not None:
                    print(f"lte-demo: error: the coordinator exited; see {logs / 'coordinator.log'}", file=sys.stderr)
                    return 1
                continue
            if not isinstance(ev, dict):
                continue
            if name != "coordinator" and ev.get("event") == "round":
                moved[ev["round"]] = moved.get(ev["round"], 0) + sum(ev["bytes_received"].values())
            elif name == "coordinator" and ev.get("event") == "round":
                r = ev["round"]
                coord_bytes = ev["bytes_received"] + ev["bytes_sent"]
                # Peers report a round just after the coordinator commits it; the previous round is complete.
                prev = moved.pop(r - 1, 0)
                acc = ev.get("test_accuracy")
                loss = ev.get("mean_loss")
                print(f"{r:>5} {ev['peers']:>5} {'-' if loss is None else f'{loss:.4f}':>10} "
                      f"{'-' if acc is None else f'{acc:.4f}':>8} {coord_bytes - last_coord_bytes + prev:>12,}",
                      flush=True)
                last_coord_bytes = coord_bytes
            elif name == "coordinator" and ev.get("event") == "done":
                final = ev
        ev = final.get("evaluation") or {}
        print(f"final test accuracy {ev.get('test_accuracy', float('nan')):.4f} after round {ev.get('round')}; "
              f"checkpoint {final['checkpoint']} ({time.monotonic() - t0:.0f} s)", flush=True)
        for p in procs[1:]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        return 0
    except (KeyboardInterrupt, queue.Empty):
        return 130
    finally:
        for p in procs:  # only the processes this demo started, by pid
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
