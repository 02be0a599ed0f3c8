"""Utilization: the share of a peer's time spent inside training steps, synchronous rounds against pipelined ones,
side by side in one run of this script, on loopback.

    .venv/bin/python benchmarks/utilization.py [--rounds 12] [--peers 3] [--slow 4] [--schedules sync pipelined]
                                               [--seeds 0] [--quick]

Each case runs the real `lte-coordinator` and N `lte-peer` processes (one torch thread each) on 127.0.0.1 with the
test suite's digits ViT at T = --T local steps (default 250: a round's training lasts seconds, longer than its
communication on loopback), for --rounds rounds; with --slow F, each schedule also runs with the
last peer F times slower (tests/slowpeer.py sleeps (F - 1) x each step's time after it). Per peer:
- utilization: seconds inside training steps (the `train_s_total` of its round events) / wall seconds, between its
  first and its last round event after round 2 (joining and the first windows are not steady state);
- steps per round: the samples the coordinator merged from it, per round it was merged in, over its batch.
The coordinator's last evaluation gives the final test accuracy (its private test split; one evaluation per run).
All processes share this machine's cores: on a 2-core machine four processes contend, which slows every step, but
time spent in a slowed step still counts as training.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, banner, machine, parse, parser, table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from netproc import SMALL_SPEC, Network  # noqa: E402

STEADY_FROM = 2  # rounds before this one hold the join (base download, first windows)


def spec_text(T: int, seed: int) -> str:
    """The test suite's digits ViT with T local steps per round, and a schedule long enough for any run here."""
    spec = yaml.safe_load(SMALL_SPEC)
    spec["seed"], spec["lte"]["merge_every"], spec["optim"]["steps"] = seed, T, max(1500, 40 * T)
    return yaml.safe_dump(spec)


def run_once(schedule: str, peers: int, rounds: int, slow: float, seed: int, T: int, round_s: float,
             workdir: Path) -> dict[str, Any]:
    """One run: every process's events."""
    spec = workdir / "spec.yaml"
    spec.write_text(spec_text(T, seed))
    with Network(workdir / "logs") as net:
        coord, join = net.coordinator(spec, workdir / "ck", "--round-seconds", str(round_s), "--fetch-timeout", "10",
                                      "--checkpoint-every", "1000", "--max-rounds", str(rounds), "--min-peers", "2",
                                      "--eval-every", str(rounds), "--score-size", "0")
        procs = []
        for i in range(peers):
            args = ["join", "--dht", join, "--shard", f"{i}/{peers}", "--threads", "1", "--no-progress", "--json",
                    "--name", f"p{i}", "--host", "127.0.0.1", "--schedule", schedule]
            slowed = slow > 1 and i == peers - 1
            program = [str(ROOT / "tests" / "slowpeer.py"), str(slow)] if slowed else ["-m", "peer.cli"]
            procs.append(net.start(f"p{i}", [*program, *args]))
        net.wait_for(coord, lambda e: e.get("event") == "done", 300 + 60 * rounds, "the end of the run")
        for p in procs:
            net.wait_exit(p, 120)
    return {"coordinator": coord.events, "peers": {p.name: p.events for p in procs}}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    coord = [e for e in run["coordinator"] if e.get("event") == "round"]
    spec = yaml.safe_load(SMALL_SPEC)
    batch = spec["data"]["batch_size"] // spec["lte"]["heads"]  # --T changes neither
    per_peer = {}
    for name, events in run["peers"].items():
        mine = [e for e in events if e.get("event") == "round" and e["round"] >= STEADY_FROM]
        util = None
        if len(mine) >= 2:
            util = (mine[-1]["train_s_total"] - mine[0]["train_s_total"]) / (mine[-1]["_t"] - mine[0]["_t"])
        merged = [e for e in events if e.get("event") == "round" and e["merged"]]
        per_peer[name] = {"utilization": util, "merged_rounds": len(merged),
                          "steps_per_round": [e["samples"] / batch for e in merged if e["round"] >= STEADY_FROM]}
    times = [b["_t"] - a["_t"] for a, b in zip(coord, coord[1:]) if a["round"] >= STEADY_FROM]
    evals = [e["test_accuracy"] for e in coord if e.get("test_accuracy") is not None]
    return {"round_s": statistics.median(times) if times else None, "peers": per_peer,
            "test_accuracy": evals[-1] if evals else None, "rounds": len(coord)}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--slow", type=float, default=4.0, help="also run with the last peer this many times slower "
                                                             "(1: not)")
    ap.add_argument("--schedules", nargs="+", choices=["sync", "pipelined", "lockstep"], default=["sync", "pipelined"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--T", type=int, default=250, help="local steps per round (lte.merge_every): 250 makes a round's "
                                                        "training on this model last seconds, longer than its bytes")
    ap.add_argument("--round-seconds", type=float, default=1.0, help="the coordinator's shortest window")
    args = parse(ap, argv)
    if args.quick:
        args.rounds, args.slow = 6, 1.0
    banner(f"Utilization on loopback: {args.peers} peers, {args.rounds} rounds", args.quick)
    cases = [(s, f) for f in ([1.0, args.slow] if args.slow > 1 else [1.0]) for s in args.schedules]
    results = []
    for seed in args.seeds:
        for schedule, slow in cases:  # schedules side by side, so that both see the same machine load
            print(f"{schedule}, slow peer x{slow:g}, seed {seed} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="utilization-") as tmp:
                run = run_once(schedule, args.peers, args.rounds, slow, seed, args.T, args.round_seconds, Path(tmp))
            results.append({"schedule": schedule, "slow": slow, "seed": seed,
                            **summarize(run)})
            write_json(args.out_dir, "utilization", {"partial": True, "results": results})
    rows = []
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in results:
        names = sorted(r["peers"])
        fast = names[:-1] if r["slow"] > 1 else names
        utils = [r["peers"][n]["utilization"] for n in fast if r["peers"][n]["utilization"] is not None]
        steps = [s for n in fast for s in r["peers"][n]["steps_per_round"]]
        slow_peer = r["peers"][names[-1]] if r["slow"] > 1 else None
        rows.append([r["schedule"], f"x{r['slow']:g}" if r["slow"] > 1 else "-", r["seed"], fmt(r["round_s"]),
                     f"{statistics.fmean(utils):.2f} (min {min(utils):.2f})" if utils else "-",
                     f"{statistics.median(steps):.0f}" if steps else "-",
                     "-" if slow_peer is None else fmt(slow_peer["utilization"]),
                     "-" if slow_peer is None else f"{slow_peer['merged_rounds']} / {r['rounds']}",
                     fmt(r["test_accuracy"])])
    text = table(["schedule", "slow peer", "seed", "round s (median)", "utilization (fast peers)",
                  "steps / round (median)", "slow peer utilization", "slow peer merged", "final test acc"], rows)
    write_json(args.out_dir, "utilization", {"machine": machine("cpu"), "peers": args.peers, "rounds": args.rounds,
                                              "quick": args.quick, "results": results, "table": text})


if __name__ == "__main__":
    main()
