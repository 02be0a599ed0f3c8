"""Averaging-round latency against the number of peers, on loopback, for a ViT-S-sized model.

    .venv/bin/python benchmarks/round_latency.py [--peers 2 4 8] [--rounds R] [--round-seconds S] [--rank 32] [--device cpu|cuda] [--quick]

The model is ViT-S's trunk (embed 384, 12 blocks, 6 heads: 21.3M parameters) on digits' 8x8 images with patch 2, so
each peer's training is cheap and the round is what is measured: every peer takes T = 1 step on 2 samples, then
the round runs as in any run (the coordinator gathers the group, fetches and validates every member's factors,
merges and commits; every peer fetches the others' factors or its dense slices and merges). A peer's latency is
from the round's scheduled close to its holding the merged base (the `latency_s` of its round event); the
coordinator's `commit_s` is the part before the commit, what every peer waits for. Only rounds that merged all N
peers count; the bytes are those of communication.py's steady rounds.

All N peers and the coordinator share this machine's cores, so on a small machine the merge of N peers runs N at a
time on a few cores: the table reports the cores, and `--peers` counts above the core count measure contention as
much as the protocol.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from common import banner, machine, parse, parser, pyplot, save_figure, table, write_json
from communication import GROUPS, expected_per_peer, layout_of, run_network, steady
from validation_cost import mean_seconds, synthetic_members

from lte.checkpoint import state_bytes
from lte.config import load_spec
from lte.merge import apply_update, merge_contributions
from lte.net.rounds import choose_dense_layers
from lte.validate import update_norm

TARGET_S, TARGET_PEERS = 2.0, 8


def vit_s_spec(base: str, peers: int, rank: int) -> dict:
    spec = load_spec(base).model_dump(mode="json")
    spec["run"] = f"latency-vit-s-{peers}"
    spec["model"] = {"name": "vit_small_patch16_224", "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1,
                                                                "num_classes": 10, "embed_dim": 384, "depth": 12,
                                                                "num_heads": 6}}
    spec["data"]["batch_size"] = 2 * peers
    spec["lte"].update(heads=peers, rank=rank, alpha=8 * rank, merge_every=1)
    spec["optim"].update(steps=1000, warmup_steps=10)
    return spec


def mib(row: dict) -> str:
    """Payload per peer per round: measured on steady rounds, else docs/protocol.md's formula (which it equals)."""
    if "received" in row:
        return f"{sum(row['received'][g] for g in GROUPS) / 2**20:.1f}"
    return f"{row['expected'] / 2**20:.1f} (formula)"


def full_rounds(run: dict, n: int) -> list[dict]:
    """The peers' round events that merged all N peers, leaving out each peer's first merged round (it also fetches
    the others' previous factors). Unlike communication.py's steady rounds, the round before may have missed a
    peer: on a machine with fewer cores than peers, one often does."""
    out = []
    for evs in run["peers"].values():
        merged = [e for e in evs if e["merged"]]
        out += [e for e in merged[1:] if e["peers"] == n]
    return out


def cpu_parts(spec, n: int) -> dict[str, float]:
    """Seconds, in this process on one thread as a peer runs, of a round's CPU work outside the network: the merge
    of N members' factors into the base and the update norms of the N - 1 others (both grow with N on the factor
    path), and serializing and hashing the new base (does not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, base, members = synthetic_members(spec, n)
        return {"merge_s": mean_seconds(lambda: apply_update(dict(base), merge_contributions(members, spec.lte.scale)),
                                        repeat=2),
                "norms_s": mean_seconds(lambda: [update_norm(c, base) for c in members[1:]], repeat=2),
                "hash_s": mean_seconds(lambda: hashlib.sha256(state_bytes(base)).hexdigest(), repeat=2)}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml", help="the spec the ViT-S variant is derived from")
    ap.add_argument("--peers", type=int, nargs="+", help="default 2 4 8; quick 2")
    ap.add_argument("--rounds", type=int, help="rounds per network run (default 4: the first is the joining round, "
                                               "every later one merges all N; 3 left 8 peers one full round)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--round-seconds", type=float,
                    help="the coordinator's round window (default max(8, 4 N) s): long enough that all N peers, "
                         "sharing this machine's cores, finish merging the last round and their step, and join each "
                         "round. The coordinator sizes windows by the peers' training time only, so on 2 cores 8 "
                         "peers that take 25 s to merge would miss every other round (the latency is counted from "
                         "the close, so the window does not add to it)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per network run, seconds")
    args = parse(ap)
    peers = args.peers or ([2] if args.quick else [2, 4, 8])
    rounds_at = lambda n: args.rounds or 4  # noqa: E731
    window_at = lambda n: args.round_seconds or max(8.0, 4.0 * n)  # noqa: E731
    cores = len(os.sched_getaffinity(0))
    rows, tables = {}, []
    with tempfile.TemporaryDirectory(prefix="lte-latency-") as tmp:
        for n in peers:
            path = Path(tmp) / f"vit-s-{n}.yaml"
            path.write_text(yaml.safe_dump(vit_s_spec(args.config, n, args.rank)))
            spec = load_spec(path)
            layout, params = layout_of(spec)
            if n == peers[0]:
                banner(f"Round latency on loopback: ViT-S-sized model ({params:,} parameters, {len(layout.layers)} LoRA "
                       f"layers of rank {args.rank}), {', '.join(f'{rounds_at(m)} rounds of {window_at(m):g} s at N = {m}' for m in peers)}, "
                       f"{cores} cores", args.quick)
            run = run_network(str(path), n, rounds_at(n), Path(tmp) / f"run{n}", args.device, args.timeout,
                              ("--eval-every", str(10 * rounds_at(n)), "--round-seconds", str(window_at(n))))
            st = steady(run, n)
            full = full_rounds(run, n)
            if not full:
                print(f"{n} peers: no round merged all {n} peers after they joined; run more --rounds or a longer "
                      "--round-seconds", file=sys.stderr)
                continue
            coord = [e for e in run["coordinator"] if e["peers"] == n]
            st.update(peer_rounds=len(full), latency_s=statistics.median(e["latency_s"] for e in full),
                      apply_s={k: statistics.median(e["apply_s"][k] for e in full) for k in full[0]["apply_s"]})
            dense = choose_dense_layers(layout, n, "auto")
            rows[n] = {**st, "commit_s": statistics.median(e["commit_s"] for e in coord),
                       "merge_s": statistics.median(e["merge_s"] for e in coord), "dense_layers": len(dense),
                       "expected": sum(expected_per_peer(layout, n, dense).values()), "parameters": params}
            rows[n]["cpu"] = cpu_parts(spec, n)
    if not rows:
        sys.exit("round_latency: no steady round in any run")
    lo = min(rows)
    tables.append(table(
        ["peers", "peer-rounds with all N", "round latency s (median)", "coordinator: close to commit s",
         "coordinator merge s", "peer: commit to merged s", "of which fetch+merge / set base / hash s",
         "MiB received per peer", "dense-path layers",
         "1 thread: merge / norms / hash s", f"latency / latency at {lo}", "linear growth would be"],
        [[n, r["peer_rounds"], f"{r['latency_s']:.2f}", f"{r['commit_s']:.2f}", f"{r['merge_s']:.2f}",
          f"{r['latency_s'] - r['commit_s']:.2f}", " / ".join(f"{v:.2f}" for v in r["apply_s"].values()), mib(r),
          r["dense_layers"], " / ".join(f"{r['cpu'][k]:.2f}" for k in ("merge_s", "norms_s", "hash_s")),
          f"{r['latency_s'] / rows[lo]['latency_s']:.2f}", f"{n / lo:.2f}"]
         for n, r in rows.items()]))
    verdicts = []
    if TARGET_PEERS in rows:
        lat = rows[TARGET_PEERS]["latency_s"]
        verdicts.append(f"{TARGET_PEERS} peers: {lat:.2f} s per round (target <= {TARGET_S} s): "
                        f"{'met' if lat <= TARGET_S else 'NOT met'} on {cores} cores shared by "
                        f"{TARGET_PEERS + 1} processes")
    growth = [rows[n]["latency_s"] / rows[lo]["latency_s"] <= n / lo for n in rows if n != lo]
    if growth:
        verdicts.append(f"growth at most linear in the peers: {'met' if all(growth) else 'NOT met'}")
    for v in verdicts:
        print(v)
    write_json(args.out_dir, "round_latency", {"machine": {**machine(args.device), "cores": cores},
                                               "quick": args.quick, "rank": args.rank, "rows": rows,
                                               "tables": tables, "verdicts": verdicts})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ns = list(rows)
        ax.plot(ns, [rows[n]["latency_s"] for n in ns], "o-", label="round latency (peer)")
        ax.plot(ns, [rows[n]["commit_s"] for n in ns], "s--", label="close to commit (coordinator)")
        ax.plot(ns, [rows[lo]["latency_s"] * n / lo for n in ns], "k:", label="linear growth")
        ax.axhline(TARGET_S, color="r", lw=0.8, label=f"target {TARGET_S} s at {TARGET_PEERS} peers")
        ax.set_xlabel("peers")
        ax.set_ylabel("seconds")
        ax.set_xticks(ns)
        ax.legend(fontsize=8)
        save_figure(fig, args.out_dir, "round_latency")


if __name__ == "__main__":
    main()
