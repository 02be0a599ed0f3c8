"""Rounds over shaped home links, in the network lab (tests/lab.py): round time and its parts, the bytes each peer
moves, the bandwidth bound, and how much of a peer's time goes to training. Needs root (network namespaces).

    .venv/bin/python benchmarks/lab_rounds.py [--rates 100 20 5] [--rtt 50] [--peers 3] [--rounds 6]
                                              [--models tiny vit-s] [--quick]

Each (model, rate) runs the real `lte-coordinator` and N `lte-peer` processes, each on its own lab host whose link
is shaped to `--rtt` ms between any two hosts and `--rate` Mbit/s each way. Two models:
- `tiny`: the test suite's digits ViT (T = 20 local steps): compute against latency, few bytes.
- `vit-s`: ViT-S's trunk (21.3M parameters, LoRA rank 32) on 8x8 digits with T = 1 step on 2 samples, as in
  round_latency.py: the round is the bytes.

Only steady rounds count: the coordinator merged all N peers in it and in the round before. Per peer-round:
- train, agree (waiting for the group to close), commit (waiting for the coordinator's fetch, checks and commit),
  merge (fetching the members' blobs and merging): from the peers' phase events, as the benchmark saw them;
- bytes: received (payload of the round event) and sent (growth of its sent total);
- bound: max(received, sent) at the link rate, the least time the round's bytes take on that link;
- round / bound: the target is at most 1.5;
- utilization: seconds inside training steps (`train_s_total` of its round events) / wall seconds, from the round
  before the first steady one to the last.
Each case runs once per peer schedule (--schedules): synchronous (train T steps, then wait for the round) and
pipelined (train on while the round is agreed, fetched and merged). A pipelined peer's phases overlap its training,
so its train/agree/commit/merge columns say when the round's parts happened, not what its training waited for.
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
from lab import Lab, Shape  # noqa: E402
from netproc import SMALL_SPEC, Network  # noqa: E402
from round_latency import vit_s_spec  # noqa: E402

# what a peer logs as it enters each part of a round; `follow`: waiting to merge a round it did not train for
PHASES = ("train", "agree", "fetch", "merge", "follow")
PART_NAMES = {"train": "train", "agree": "agree", "fetch": "commit", "merge": "merge", "follow": "follow"}


def spec_text(model: str, peers: int, tiny_t: int = 20) -> str:
    if model == "tiny":  # with a learning-rate schedule long enough for any run here, as utilization.py's
        spec = yaml.safe_load(SMALL_SPEC)
        spec["lte"]["merge_every"], spec["optim"]["steps"] = tiny_t, max(spec["optim"]["steps"], 40 * tiny_t)
        return yaml.safe_dump(spec)
    return yaml.safe_dump(vit_s_spec(str(ROOT / "configs" / "digits.yaml"), peers, 32))


def run_once(model: str, rate: float, rtt_ms: float, peers: int, rounds: int, workdir: Path,
             schedule: str = "pipelined", tiny_t: int = 20) -> dict[str, Any]:
    """One run in a fresh lab; every process's events."""
    link = Shape(delay_ms=rtt_ms / 4, rate_mbit=rate)  # four one-way legs on a path between two hosts
    spec = workdir / "spec.yaml"
    spec.write_text(spec_text(model, peers, tiny_t))
    with Lab() as lab, Network(workdir / "logs") as net:
        ch = lab.host("coord", link)
        hosts = [lab.host(f"peer{i}", link) for i in range(peers)]
        coord = net.start("coordinator", **ch.netproc([
            "-m", "coordinator.cli", "start", "--config", str(spec), "--checkpoint-dir", str(workdir / "ck"), "--json",
            "--host", ch.ip, "--round-seconds", "2", "--fetch-timeout", "60", "--checkpoint-every", "1000",
            "--max-rounds", str(rounds), "--min-peers", str(peers), "--eval-every", "1000", "--score-size", "0"]))
        join = net.wait_line(coord, lambda l: l.startswith("lte-peer join --dht "), 180, "the join line").split()[-1]
        procs = [net.start(f"p{i}", **h.netproc(["-m", "peer.cli", "join", "--dht", join, "--shard", f"{i}/{peers}",
                                                  "--threads", "1", "--no-progress", "--json", "--name", f"p{i}",
                                                  "--host", h.ip, "--schedule", schedule]))
                 for i, h in enumerate(hosts)]
        net.wait_for(coord, lambda e: e.get("event") == "done", 300 + 120 * rounds, "the end of the run")
        for p in procs:
            net.wait_exit(p, 120)
        escaped = lab.escaped_packets()
    if any(escaped.values()):
        sys.exit(f"lab_rounds: packets addressed outside the lab: {escaped}")
    return {"coordinator": coord.events, "peers": {p.name: p.events for p in procs}}


def summarize(run: dict[str, Any], peers: int, rate: float) -> dict[str, Any]:
    coord = {e["round"]: e for e in run["coordinator"] if e.get("event") == "round"}
    steady = sorted(r for r, e in coord.items() if e["peers"] == peers and coord.get(r - 1, {}).get("peers") == peers)
    if len(steady) < 2:
        return {"steady_rounds": len(steady)}
    times = [coord[r]["_t"] - coord[r - 1]["_t"] for r in steady]
    parts = {name: [] for name in PHASES}
    recv, sent, util = [], [], []
    for events in run["peers"].values():
        by_round = {e["round"]: e for e in events if e.get("event") == "round"}
        phases = [e for e in events if e.get("event") == "phase"]
        # each phase lasts until the next one starts; a round's merge until its round event
        marks = sorted([(e["_t"], e["phase"], e["round"]) for e in phases]
                       + [(e["_t"], "done", e["round"] - 1) for e in by_round.values()])
        spans = [(a[1], a[2], b[0] - a[0]) for a, b in zip(marks, marks[1:]) if a[1] != "done"]
        for phase, k, seconds in spans:
            if k + 1 in steady:
                parts[phase].append(seconds)
        for r in steady:
            e, prev = by_round.get(r), by_round.get(r - 1)
            if e and prev and e["merged"]:
                recv.append(sum(e["bytes_received"].values()))
                sent.append(sum(e["bytes_sent_total"].values()) - sum(prev["bytes_sent_total"].values()))
        # seconds inside training steps over wall seconds, between this peer's first and last steady round
        seen = [by_round[r] for r in [steady[0] - 1, *steady] if r in by_round]
        if len(seen) >= 2:
            util.append((seen[-1]["train_s_total"] - seen[0]["train_s_total"]) / (seen[-1]["_t"] - seen[0]["_t"]))
    bytes_moved = max(statistics.fmean(recv), statistics.fmean(sent))
    bound = bytes_moved * 8 / (rate * 1e6)
    round_s = statistics.median(times)
    return {"steady_rounds": len(steady), "round_s": round_s,
            "parts_s": {PART_NAMES[p]: statistics.median(v) if v else None for p, v in parts.items()},
            "received": statistics.fmean(recv), "sent": statistics.fmean(sent), "bound_s": bound,
            "ratio": round_s / bound, "utilization": statistics.fmean(util) if util else 0.0,
            "utilization_min": min(util) if util else 0.0}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 20.0, 5.0], help="link rates, Mbit/s")
    ap.add_argument("--rtt", type=float, default=50.0, help="round-trip time between any two hosts, ms")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--models", nargs="+", choices=["tiny", "vit-s"], default=["tiny", "vit-s"])
    ap.add_argument("--tiny-T", type=int, default=20, help="the tiny model's local steps per round (250: its training "
                    "outlasts a round's communication, the case where a pipelined peer should never wait)")
    ap.add_argument("--schedules", nargs="+", choices=["sync", "pipelined"], default=["sync", "pipelined"],
                    help="the peers' --schedule, each run side by side")
    args = parse(ap, argv)
    if args.quick:
        args.rates, args.rounds, args.models = [20.0], 4, ["tiny"]
    banner(f"Over shaped links: {args.peers} peers, {args.rtt:.0f} ms RTT", args.quick)
    results = []
    for model in args.models:
        for rate in args.rates:
            for schedule in args.schedules:
                print(f"{model} at {rate:g} Mbit/s, {schedule} ...", flush=True)
                name = model if model != "tiny" or args.tiny_T == 20 else f"tiny T={args.tiny_T}"
                case = {"model": name, "rate_mbit": rate, "schedule": schedule}
                with tempfile.TemporaryDirectory(prefix="lab-rounds-") as tmp:
                    try:
                        run = run_once(model, rate, args.rtt, args.peers, args.rounds, Path(tmp), schedule,
                                       args.tiny_T)
                        results.append({**case, **summarize(run, args.peers, rate)})
                    except AssertionError as err:  # a run that did not finish: say why in the table, go on
                        results.append({**case, "failed": str(err).splitlines()[0]})
            write_json(args.out_dir, "lab_rounds", {"partial": True, "results": results})
    rows = []
    for r in results:
        if "round_s" not in r:
            why = r.get("failed") or f"only {r['steady_rounds']} steady rounds"
            rows.append([r["model"], f"{r['rate_mbit']:g}", r["schedule"], why] + [""] * 8)
            continue
        p = r["parts_s"]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        rows.append([r["model"], f"{r['rate_mbit']:g}", r["schedule"], f"{r['round_s']:.2f}", fmt(p["train"]), fmt(p["agree"]),
                     fmt(p["commit"]), fmt(p["merge"]), f"{r['received'] / 2**20:.2f} / {r['sent'] / 2**20:.2f}",
                     f"{r['bound_s']:.2f}", f"{r['ratio']:.1f}",
                     f"{r['utilization']:.2f} (min {r['utilization_min']:.2f})"])
    text = table(["model", "Mbit/s", "schedule", "round s (median)", "train s", "agree s", "commit s", "merge s",
                  "MiB recv / sent per peer", "bound s", "round / bound", "utilization"], rows)
    write_json(args.out_dir, "lab_rounds", {"machine": machine("cpu"), "rtt_ms": args.rtt, "peers": args.peers,
                                             "rounds": args.rounds, "quick": args.quick, "results": results,
                                             "table": text})


if __name__ == "__main__":
    main()
