"""Communication of real LTE runs on loopback: payload bytes per peer per round, split by what they carry, as the
network layer counts them; checked against the formulas of docs/protocol.md; compared with what per-step
data-parallel gradient all-reduce and a DiLoCo-style run (dense delta all-reduce every T steps) move for the same
samples; and the total bytes to reach the accuracy target.

    .venv/bin/python benchmarks/communication.py [--peers 2 4 8] [--rounds 8] [--paths auto] [--device cpu|cuda] [--quick]
    .venv/bin/python benchmarks/communication.py --to-target 150 --peers 4 --reference QUALITY_JSON

Each N runs `lte-demo` (one coordinator and N peer processes on 127.0.0.1, configs/digits.yaml) and reads every
process's JSON events. Steady rounds only: a peer's round counts when it merged it, through its group's exchange, and
the round before with all N peers (so it already holds the others' previous factors, as docs/protocol.md assumes);
joining rounds also move the base and are left out. Bytes of transfers that broke off and were fetched again (kind
`interrupted`) are shown in their own column: they are real traffic, but no formula predicts them.

Bytes to the target: the rounds LTE needs and the samples full training needs to reach 99 % of full's final
accuracy come from a quality benchmark's JSON (`--reference`, default results/bench/quality.json, written by the
same `make bench` run just before); with `--to-target R` they are measured instead on one network run of up to R
rounds, whose coordinator evaluates the merged base every round.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, banner, machine, parse, parser, pyplot, save_figure, table, write_json

from lte.config import load_spec
from lte.costs import data_parallel_bytes, layer_cost
from lte.lora import prepare_model
from lte.models import create_base_model
from lte.net.counters import INTERRUPTED
from lte.net.rounds import choose_dense_layers
from lte.wire import Layout

# docs/protocol.md's kinds of payload, grouped as the issue asks.
GROUPS = {"factor exchange": ("factors", "factors_prev", "manifest"), "dense all-reduce": ("dense_slices", "dense_reduced"),
          "replica averaging": ("replicas",), "base and checkpoints": ("base", "checkpoint")}
MANIFEST_BYTES = 64  # per layer per member: docs/protocol.md


def layout_of(spec) -> tuple[Layout, int]:
    """The run's blob layout and the parameter count of the full model (what data-parallel all-reduces)."""
    model = create_base_model(spec.model)
    params = sum(p.numel() for p in model.parameters())
    return Layout.of(prepare_model(model, spec.lte.model_copy(update={"heads": 1}), spec.seed)), params


def expected_per_peer(layout: Layout, members: int, dense: list[str]) -> dict[str, int]:
    """Payload bytes one peer receives in a steady round by group (docs/protocol.md): the other members' factors
    and manifests of the factor-path layers, its share of the dense-path layers' reduce, their replicas."""
    out = dict.fromkeys(GROUPS, 0)
    out["replica averaging"] = (members - 1) * 4 * sum(math.prod(s) for s in layout.replica_shapes)
    for layer, ((r, fan_in), (fan_out, _)) in zip(layout.layers, layout.factor_shapes):
        cost = layer_cost(fan_in, fan_out, r, members)
        if layer in dense:
            out["dense all-reduce"] += cost.dense
        else:
            out["factor exchange"] += cost.factors
    if len(dense) < len(layout.layers):
        out["factor exchange"] += (members - 1) * MANIFEST_BYTES * len(layout.layers)
    return out


def events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run_network(config: str, peers: int, rounds: int, workdir: Path, device: str, timeout: float,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `lte-demo` run (`extra`: more lte-demo flags): every peer's and the coordinator's round events, and the
    wall time."""
    logs = workdir / "logs"
    cmd = [sys.executable, "-m", "coordinator.demo", "--config", config, "--peers", str(peers), "--rounds",
           str(rounds), "--checkpoint-dir", str(workdir / "ck"), "--logs", str(logs), "--timeout", str(timeout),
           "--device", device, *extra]
    t0 = time.perf_counter()
    print(f"lte-demo: {peers} peers, {rounds} rounds ...", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout + 120)
    if done.returncode != 0:
        sys.exit(f"communication: lte-demo with {peers} peers failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    rounds_of = lambda p: [e for e in events(p) if e.get("event") == "round"]  # noqa: E731
    return {"peers": {i: rounds_of(logs / f"peer{i}.events") for i in range(peers)},
            "exchanged": {i: exchanged(events(logs / f"peer{i}.events")) for i in range(peers)},
            "coordinator": rounds_of(logs / "coordinator.events"), "wall_s": time.perf_counter() - t0}


def exchanged(evs: list[dict]) -> set[int]:
    """The rounds a peer merged through its group's exchange (docs/protocol.md's path). A member whose matchmaking
    failed learns of its round from the commit, and one whose dense exchange failed falls back: both fetch the
    factors of the dense-path layers instead, which moves other bytes (CI saw such a round on the dense path)."""
    grouped = {e["round"] for e in evs if e.get("event") == "phase" and e.get("phase") == "fetch"}
    return grouped - {e["round"] for e in evs if e.get("event") == "dense_fallback"}


def grouped(received: dict[str, int]) -> dict[str, int]:
    """Bytes by group, plus INTERRUPTED: transfers that broke off and were fetched again (real bytes on the wire,
    which no formula predicts: a loaded machine's retries, shown apart)."""
    unknown = set(received) - {k for ks in GROUPS.values() for k in ks} - {INTERRUPTED}
    if unknown:
        raise SystemExit(f"communication: the network counts payload kinds this benchmark does not know: {unknown}")
    return {g: sum(received.get(k, 0) for k in ks) for g, ks in GROUPS.items()} | {INTERRUPTED: received.get(INTERRUPTED, 0)}


def steady(run: dict[str, Any], n: int) -> dict[str, Any]:
    """Per-peer-round means over the steady rounds of one run (see the module docstring)."""
    recv, sent, latency = [], [], []
    for i, evs in run["peers"].items():
        by_round = {e["round"]: e for e in evs}
        for r, e in by_round.items():
            prev = by_round.get(r - 1)
            if (e["merged"] and e["peers"] == n and prev and prev["merged"] and prev["peers"] == n
                    and r - 1 in run["exchanged"][i]):  # a "round" event names the base its commit made
                recv.append(grouped(e["bytes_received"]))
                sent.append(sum(e["bytes_sent_total"].values()) - sum(prev["bytes_sent_total"].values()))
                latency.append(e["latency_s"])
    if not recv:
        return {"peer_rounds": 0}
    coord = [(b["bytes_received"] - a["bytes_received"], b["bytes_sent"] - a["bytes_sent"])
             for a, b in zip(run["coordinator"], run["coordinator"][1:]) if a["peers"] == b["peers"] == n]
    return {"peer_rounds": len(recv), "received": {g: statistics.fmean(x[g] for x in recv) for g in GROUPS},
            INTERRUPTED: statistics.fmean(x[INTERRUPTED] for x in recv),
            "sent": statistics.fmean(sent), "latency_s": statistics.median(latency),
            "coordinator_received": statistics.fmean(c[0] for c in coord) if coord else None,
            "coordinator_sent": statistics.fmean(c[1] for c in coord) if coord else None}


def to_target(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first round whose merged base reaches `target` on the coordinator's evaluation, and what each peer had
    received and sent up to it (every round counted, joining rounds and the base download included)."""
    hit = next((e for e in run["coordinator"] if (e.get("test_accuracy") or 0) >= target), None)
    if hit is None:
        return None
    k = hit["round"]
    recv, sent = [], []
    for evs in run["peers"].values():
        upto = [e for e in evs if e["round"] <= k]
        recv.append(sum(sum(e["bytes_received"].values()) for e in upto))
        sent.append(sum(upto[-1]["bytes_sent_total"].values()) if upto else 0)
    return {"round": k, "accuracy": hit["test_accuracy"], "received": statistics.fmean(recv),
            "sent": statistics.fmean(sent), "max_received": max(recv)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--peers", type=int, nargs="+", help="default 2 4 8; quick 3")
    ap.add_argument("--rounds", type=int, help="rounds per network run (default 8; quick 4)")
    ap.add_argument("--round-seconds", type=float, default=3.0,
                    help="the coordinator's shortest round window, at least N seconds for N peers: long enough for N "
                         "peers sharing this machine's cores to merge, train T steps and join, or rounds miss peers "
                         "and are not steady")
    ap.add_argument("--paths", choices=["auto", "factors", "dense"], default="auto",
                    help="how merged layers travel (lte-coordinator start --paths)")
    ap.add_argument("--reference", type=Path, default=RESULTS / "quality.json",
                    help="a quality benchmark's JSON: full's final accuracy (the target is 99 %% of it), the samples "
                         "full and LTE T=10 need to reach it")
    ap.add_argument("--to-target", type=int, metavar="R",
                    help="instead: one run of the first --peers count for up to R rounds, bytes until the target")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per network run, seconds")
    args = parse(ap)
    spec = load_spec(args.config)
    layout, params = layout_of(spec)
    T, batch = spec.lte.merge_every, spec.data.batch_size
    ref = json.loads(args.reference.read_text()) if args.reference.exists() else None
    peers = args.peers or ([3] if args.quick else [2, 4, 8])
    rounds = args.rounds or (4 if args.quick else 8)
    banner(f"Communication over loopback: {args.config}, T = {T}, {len(layout.layers)} LoRA layers of rank "
           f"{spec.lte.rank}, model {params:,} parameters", args.quick)
    tables, verdicts, payload = [], [], {"machine": machine(args.device), "quick": args.quick, "config": args.config,
                                         "T": T, "parameters": params, "reference": str(args.reference)}
    if args.to_target:
        return target_run(args, spec, params, ref, peers[0], payload)

    rows = {}
    for n in peers:
        with tempfile.TemporaryDirectory(prefix=f"lte-comm-{n}-") as tmp:
            run = run_network(args.config, n, rounds, Path(tmp), args.device, args.timeout,
                              ("--paths", args.paths, "--round-seconds", str(max(args.round_seconds, n))))
        dense = choose_dense_layers(layout, n, args.paths)
        rows[n] = {**steady(run, n), "expected": expected_per_peer(layout, n, dense), "dense_layers": len(dense),
                   "wall_s": run["wall_s"]}
        if not rows[n]["peer_rounds"]:
            print(f"{n} peers: no steady round (every peer in two consecutive full rounds); run more --rounds")
    measured = {n: r for n, r in rows.items() if r["peer_rounds"]}
    if not measured:
        sys.exit("communication: no steady round in any run: nothing was measured (run more --rounds)")

    print("\nPayload bytes per peer per steady round (fp32 on the wire), measured by the network layer:\n")
    tables.append(table(
        ["peers", "dense-path layers", "steady peer-rounds", *GROUPS, "received", "formula (protocol.md)", "measured / formula",
         "interrupted (retried)", "sent", "coordinator recv / sent"],
        [[n, f"{r['dense_layers']}/{len(layout.layers)}", r["peer_rounds"], *(f"{r['received'][g]:,.0f}" for g in GROUPS), f"{sum(r['received'].values()):,.0f}",
          f"{sum(r['expected'].values()):,}", f"{sum(r['received'].values()) / sum(r['expected'].values()):.4f}",
          f"{r[INTERRUPTED]:,.0f}",
          f"{r['sent']:,.0f}", "—" if r["coordinator_received"] is None else
          f"{r['coordinator_received']:,.0f} / {r['coordinator_sent']:,.0f}"] for n, r in measured.items()]))
    # The dense formula is the mean over peers (a layer's rows split unevenly when N does not divide them) and
    # rounds down per layer: a byte per layer is the formula's own precision.
    mismatch = {n: g for n, r in measured.items() for g in GROUPS
                if abs(r["received"][g] - r["expected"][g]) > len(layout.layers)}
    verdicts.append("measured bytes equal docs/protocol.md's formulas (to a byte per layer) for every group and N"
                    if not mismatch
                    else f"measured bytes differ from the formulas: {mismatch}")

    print(f"\nPer peer per round against the baselines for the same samples (a round is T = {T} steps of the "
          f"cumulative batch {batch}):\n")
    base_rows = []
    for n, r in measured.items():
        lte = sum(r["received"].values()) + r[INTERRUPTED]  # every byte that crossed the wire, retries included
        dp, diloco = data_parallel_bytes(params, T, n), data_parallel_bytes(params, 1, n)
        r.update(data_parallel=dp, diloco=diloco)
        base_rows.append([n, f"{lte:,.0f}", f"{dp:,}", f"{lte / dp:.4f} (1/{dp / lte:.0f})", f"{diloco:,}",
                          f"{lte / diloco:.3f}"])
    tables.append(table(["peers", "LTE received", "data-parallel (T all-reduces)", "LTE / data-parallel",
                         "DiLoCo (1 all-reduce)", "LTE / DiLoCo"], base_rows))

    if ref:
        s_full = ref["summary"]["full"]["samples_to_target"]
        s_lte = ref["summary"].get("lte T=10", {}).get("samples_to_target")
        print(f"\nTo the accuracy target ({ref['target_accuracy']:.4f} = 99 % of full's final accuracy in "
              f"{args.reference}, {ref['steps']} steps): full needs {s_full:,.0f} samples, LTE T=10 "
              + (f"{s_lte:,.0f}" if s_lte else "does not get there") + ":\n")
        rows_t = []
        for n, r in measured.items():
            dp_total = data_parallel_bytes(params, 1, n) * s_full / batch
            if s_lte:
                lte_total = (sum(r["received"].values()) + r[INTERRUPTED]) * s_lte / (batch * T)
                r.update(to_target={"lte": lte_total, "data_parallel": dp_total})
                rows_t.append([n, f"{lte_total / 2**20:,.1f}", f"{dp_total / 2**20:,.1f}",
                               f"{lte_total / dp_total:.4f} (1/{dp_total / lte_total:.0f})"])
            else:
                rows_t.append([n, "not reached", f"{dp_total / 2**20:,.1f}", "—"])
        tables.append(table(["peers", "LTE MiB per peer", "data-parallel MiB per peer", "ratio (target <= 0.01)"],
                            rows_t))
        met = [r["to_target"]["lte"] / r["to_target"]["data_parallel"] <= 0.01 for r in measured.values()
               if "to_target" in r]
        verdicts.append(f"LTE bytes to the target at most 1/100 of data-parallel's: "
                        + ("not measured (LTE did not reach the target in the reference run)" if not met else
                           f"{'met' if all(met) else 'NOT met'} ({sum(met)}/{len(met)} peer counts)"))
    else:
        verdicts.append(f"bytes to the target: no reference ({args.reference} is missing; run benchmarks/quality.py)")
    for v in verdicts:
        print(v)
    payload.update(rows=measured, tables=tables, verdicts=verdicts, paths=args.paths, formulas_hold=not mismatch)
    write_json(args.out_dir, "communication", payload)
    plot(measured, args.out_dir)


def target_run(args, spec, params: int, ref: dict | None, n: int, payload: dict) -> None:
    if ref is None:
        sys.exit(f"communication: --to-target needs --reference (a quality benchmark's JSON); {args.reference} "
                 "is missing")
    target, batch = ref["target_accuracy"], spec.data.batch_size
    with tempfile.TemporaryDirectory(prefix=f"lte-comm-target-{n}-") as tmp:
        run = run_network(args.config, n, args.to_target, Path(tmp), args.device, args.timeout)
    got = to_target(run, target)
    dp = data_parallel_bytes(params, 1, n) * ref["summary"]["full"]["samples_to_target"] / batch
    curve = [(e["round"], e.get("test_accuracy")) for e in run["coordinator"]]
    if got is None:
        best = max((a for _, a in curve if a is not None), default=float("nan"))
        text = table(["peers", "rounds run", "target", "best test acc", "LTE MiB per peer", "data-parallel MiB"],
                     [[n, len(curve), f"{target:.4f}", f"{best:.4f}", "not reached", f"{dp / 2**20:,.1f}"]])
        verdict = f"LTE bytes to the target: not reached in {len(curve)} rounds"
    else:
        text = table(["peers", "round reaching it", "samples", "test acc", "LTE MiB received per peer (max)",
                      "sent per peer", "data-parallel MiB per peer", "ratio (target <= 0.01)"],
                     [[n, got["round"], f"{got['round'] * batch * spec.lte.merge_every:,}", f"{got['accuracy']:.4f}",
                       f"{got['received'] / 2**20:,.1f} ({got['max_received'] / 2**20:,.1f})",
                       f"{got['sent'] / 2**20:,.1f}", f"{dp / 2**20:,.1f}",
                       f"{got['received'] / dp:.4f} (1/{dp / got['received']:.0f})"]])
        verdict = (f"LTE bytes to the target at most 1/100 of data-parallel's: "
                   f"{'met' if got['received'] / dp <= 0.01 else 'NOT met'} ({got['received'] / dp:.4f})")
    print(verdict)
    payload.update(to_target=got, curve=curve, wall_s=run["wall_s"], tables=[text], verdicts=[verdict],
                   data_parallel=dp, target=target)
    write_json(args.out_dir, "communication_to_target", payload)


def plot(rows: dict[int, dict], out_dir: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ns = list(rows)
    bottom = [0.0] * len(ns)
    for g in GROUPS:
        vals = [rows[n]["received"][g] / 2**20 for n in ns]
        if any(vals):
            ax.bar([str(n) for n in ns], vals, bottom=bottom, label=f"LTE: {g}")
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot([str(n) for n in ns], [rows[n]["data_parallel"] / 2**20 for n in ns], "k--o", label="data-parallel")
    ax.plot([str(n) for n in ns], [rows[n]["diloco"] / 2**20 for n in ns], "k:s", label="DiLoCo, same T")
    ax.set_xlabel("peers")
    ax.set_ylabel("MiB received per peer per round")
    ax.legend(fontsize=8)
    save_figure(fig, out_dir, "communication")


if __name__ == "__main__":
    main()
