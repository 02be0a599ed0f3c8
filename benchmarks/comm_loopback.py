"""Communication of real LTE runs on loopback: payload bytes per peer per round, by kind of tensor, measured by
the network layer, checked against the formulas of docs/protocol.md and compared with what data-parallel training
(per-step gradient all-reduce) and a DiLoCo-style run (dense delta all-reduce every T steps) move for the same
samples. Also the round latency: from a round's close to each peer holding the merged base.

    .venv/bin/python benchmarks/comm_loopback.py [--peers 2 4 8] [--rounds 5] [--config configs/digits.yaml]

Each N runs `lte-demo` (a coordinator and N peer processes on 127.0.0.1) and reads the peers' JSON events.
Steady rounds only: every peer merged it and the round before (so everyone already holds the others' previous
factors, as docs/protocol.md assumes); joining rounds, which also move the base, are reported apart.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lte.config import load_spec
from lte.costs import data_parallel_bytes, layer_cost
from lte.lora import prepare_model
from lte.models import create_base_model
from lte.net.rounds import choose_dense_layers
from lte.wire import Layout


def layout_of(spec) -> tuple[Layout, int]:
    """The run's blob layout and the parameter count of the full model (what data-parallel all-reduces)."""
    model = create_base_model(spec.model)
    params = sum(p.numel() for p in model.parameters())
    return Layout.of(prepare_model(model, spec.lte.model_copy(update={"heads": 1}), spec.seed)), params


def expected_per_peer(layout: Layout, members: int, dense: list[str], replica_bytes: int) -> int:
    """Payload bytes a peer receives in a steady round (docs/protocol.md): other members' factors of the
    factor-path layers and their manifests, dense slices and reduced rows of the dense-path layers, replicas."""
    total = (members - 1) * replica_bytes
    factor_layers = 0
    for layer, ((r, fan_in), (fan_out, _)) in zip(layout.layers, layout.factor_shapes):
        cost = layer_cost(fan_in, fan_out, r, members)
        if layer in dense:
            total += cost.dense
        else:
            total += cost.factors
            factor_layers += 1
    if factor_layers:
        total += (members - 1) * 64 * len(layout.layers)  # manifests
    return total


def events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run_network(config: str, peers: int, rounds: int, workdir: Path, timeout: float) -> dict[int, list[dict]]:
    """Round events of every peer of one `lte-demo` run: {peer index: [events]}."""
    logs = workdir / "logs"
    cmd = [sys.executable, "-m", "coordinator.demo", "--config", config, "--peers", str(peers), "--rounds",
           str(rounds), "--checkpoint-dir", str(workdir / "ck"), "--logs", str(logs), "--timeout", str(timeout)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout + 60)
    if done.returncode != 0:
        raise SystemExit(f"comm_loopback: lte-demo with {peers} peers failed:\n{done.stdout[-2000:]}")
    return {i: [e for e in events(logs / f"peer{i}.events") if e.get("event") == "round"] for i in range(peers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900.0, help="per network run")
    ap.add_argument("--out", default="results/comm_loopback.json")
    args = ap.parse_args()
    spec = load_spec(args.config)
    layout, params = layout_of(spec)
    T = spec.lte.merge_every
    replica_bytes = 4 * sum(math.prod(s) for s in layout.replica_shapes)
    rows = []
    for n in args.peers:
        with tempfile.TemporaryDirectory(prefix=f"lte-comm-{n}-") as tmp:
            per_peer = run_network(args.config, n, args.rounds, Path(tmp), args.timeout)
        steady, latency, sent = [], [], []
        for evs in per_peer.values():
            by_round = {e["round"]: e for e in evs}
            for r, e in by_round.items():
                prev = by_round.get(r - 1)
                if e["merged"] and e["peers"] == n and prev and prev["merged"] and prev["peers"] == n:
                    steady.append(e["bytes_received"])
                    sent.append(sum(e["bytes_sent_total"].values()) - sum(prev["bytes_sent_total"].values()))
                    if e.get("latency_s") is not None:
                        latency.append(e["latency_s"])
        if not steady:
            rows.append({"peers": n, "steady_rounds": 0})
            print(f"{n} peers: no steady round (every peer in two consecutive rounds); run more --rounds", flush=True)
            continue
        kinds = sorted({k for s in steady for k in s})
        mean = {k: statistics.mean(s.get(k, 0) for s in steady) for k in kinds}
        dense = choose_dense_layers(layout, n, "auto")
        expect = expected_per_peer(layout, n, dense, replica_bytes)
        measured = sum(mean.values())
        dp = data_parallel_bytes(params, T, n)
        diloco = data_parallel_bytes(params, 1, n)
        rows.append({"peers": n, "steady_rounds": len(steady), "received_by_kind": mean, "received": measured,
                     "sent": statistics.mean(sent), "expected": expect, "dense_layers": len(dense),
                     "data_parallel": dp, "diloco": diloco, "latency_s": statistics.median(latency) if latency else None})
        print(f"{n} peers: {len(steady)} steady peer-rounds, received {measured:,.0f} B/round "
              f"(formula {expect:,}), by kind {json.dumps({k: round(v) for k, v in mean.items()})}", flush=True)
    print(f"\nT = {T} steps per round, model {params:,} parameters, {len(layout.layers)} LoRA layers of rank "
          f"{spec.lte.rank}; bytes are payload received per peer per round (fp32 wire)")
    print(f"{'peers':>5} {'LTE measured':>13} {'formula':>13} {'dense layers':>12} {'data-parallel':>14} "
          f"{'LTE / DP':>9} {'DiLoCo':>12} {'LTE / DiLoCo':>12} {'latency s':>9}")
    for r in rows:
        if not r.get("steady_rounds"):
            continue
        lat = "-" if r["latency_s"] is None else f"{r['latency_s']:.2f}"
        print(f"{r['peers']:>5} {r['received']:>13,.0f} {r['expected']:>13,} {r['dense_layers']:>12} "
              f"{r['data_parallel']:>14,} {r['received'] / r['data_parallel']:>9.4f} {r['diloco']:>12,} "
              f"{r['received'] / r['diloco']:>12.3f} {lat:>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "T": T, "parameters": params, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
