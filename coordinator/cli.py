"""`lte-coordinator start`: start a public LTE run and keep its authoritative base."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
import warnings

# hivemind 1.1.12 calls torch.jit.script when it is imported, and recent torch answers with a two-line
# FutureWarning on stderr; a failing command must print only its own one-line error there.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from lte.cliargs import OneLineParser, directory_to_create, file_in_existing_directory, int_in, ip_address, \
    port_free, positive_number, seconds, tcp_port
from lte.config import load_spec
from lte.errors import ConfigError
from lte.net import NetworkError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="lte-coordinator", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a run: first DHT node, spec publisher, round commit point")
    s.add_argument("--config", required=True, help="run spec YAML (see configs/)")
    s.add_argument("--checkpoint-dir", required=True, type=Path)
    s.add_argument("--host", type=ip_address, default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for a public run)")
    s.add_argument("--port", type=tcp_port, default=0, help="DHT/libp2p TCP port (0: any free port)")
    s.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MULTIADDR",
                   help="the addresses peers reach this host at, when they differ from --host (a cloud VM's public "
                        "address behind port forwarding, e.g. /ip4/203.0.113.7/tcp/31337); the join line shows the first")
    s.add_argument("--upnp", action="store_true",
                   help="let p2pd ask the home router for a port mapping (UPnP/NAT-PMP; off by default: its discovery multicasts to the local network)")
    s.add_argument("--http-port", type=tcp_port, help="serve /status.json and /metrics on this port (0: any free)")
    s.add_argument("--identity", type=Path, help="RSA key file that signs the run's records (created if missing)")
    s.add_argument("--round-seconds", type=seconds, default=4.0, help="time between round closes")
    s.add_argument("--fetch-timeout", type=seconds, default=20.0, help="deadline for a member's blobs")
    s.add_argument("--eval-every", type=int_in(1), default=1, help="evaluate every K rounds")
    s.add_argument("--checkpoint-every", type=int_in(1), default=5, help="write a checkpoint every K rounds")
    s.add_argument("--keep-last", type=int_in(1), default=5,
                   help="keep the last K checkpoints (and those of --keep-every)")
    s.add_argument("--keep-every", type=int_in(0), default=100,
                   help="also keep the checkpoint of every M-th round for good (0: none)")
    s.add_argument("--wire", choices=["raw", "fp16", "int8"],
                   help="wire format of LoRA factors (default: the spec's lte.wire; another value overrides it on the "
                        "network only, so the simulator no longer replays the run)")
    s.add_argument("--paths", choices=["auto", "factors", "dense"], default="auto",
                   help="how merged layers travel between peers: the cheaper per layer (auto), or one forced")
    s.add_argument("--max-rounds", type=int_in(1), help="stop after this many merged rounds")
    s.add_argument("--min-peers", type=int_in(1), default=1,
                   help="merge a round only when at least this many peers join")
    s.add_argument("--allow-peers", type=Path,
                   help="a closed run: file of the peer ids (one per line) whose contributions are merged")
    s.add_argument("--score-size", type=int_in(0),
                   help="examples in the private scoring set that every contribution is scored on (default 256; "
                        "0: no scoring, only the format and norm checks)")
    s.add_argument("--shard-mib", type=positive_number, default=16.0,
                   help="size of the training data shards peers download, in MiB (default 16; image folder and "
                        "CIFAR-10 runs: peers fetch the data from the run)")
    s.add_argument("--json", action="store_true", help="print one JSON object per round")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coord = server = reported = None
    try:
        # Every check that needs no model and no network first: bad input is refused in a second, before any
        # file, directory or process is created.
        spec = load_spec(args.config)
        directory_to_create(args.checkpoint_dir, "--checkpoint-dir")
        if args.identity is not None:
            file_in_existing_directory(args.identity, "--identity")
        allow = None
        if args.allow_peers is not None:
            from lte.net.access import load_allowlist  # imports hivemind (seconds): not for the checks above
            allow = load_allowlist(args.allow_peers)
        port_free(args.host, args.port, "--port")
        port_free(args.host, args.http_port, "--http-port")
        from lte.net.node import check_node_inputs, prepare_process
        announce = check_node_inputs((), args.announce_maddrs)[1]
        prepare_process()
        from coordinator.http import StatusServer
        from coordinator.service import Coordinator, CoordinatorOptions

        opts = CoordinatorOptions(checkpoint_dir=args.checkpoint_dir, host=args.host, port=args.port,
                                  announce_maddrs=tuple(announce), upnp=args.upnp,
                                  http_port=args.http_port, identity=args.identity, round_seconds=args.round_seconds,
                                  fetch_timeout=args.fetch_timeout, eval_every=args.eval_every,
                                  checkpoint_every=args.checkpoint_every, wire=args.wire, max_rounds=args.max_rounds,
                                  min_peers=args.min_peers, paths=args.paths, keep_last=args.keep_last,
                                  keep_every=args.keep_every, allow=allow,
                                  shard_bytes=max(1, int(args.shard_mib * 2**20)))
        if args.score_size is not None:
            opts.score_size = args.score_size
        coord = Coordinator(spec, opts)
        if args.http_port is not None:
            from coordinator.metrics import coordinator_registry
            server = StatusServer(args.host, args.http_port, coord.status, coordinator_registry(coord),
                                  checkpoints=coord.checkpoints)
            base = f"http://{args.host}:{server.port}"
            print(f"status: {base}/status.json  page: {base}/  metrics: {base}/metrics",
                  flush=True)
        print(f"run {spec.run} (spec {coord.spec_hash[:12]}) coordinator {coord.peer_id}", flush=True)
        print("volunteers join with:", flush=True)
        print(f"lte-peer join --dht {coord.join_addr()}", flush=True)
        reported = len(coord.history)  # a resumed run's earlier rounds were reported by the process before
        merged = 0
        while args.max_rounds is None or merged < args.max_rounds:
            summary = coord.run_round()
            if summary is None:
                continue
            merged += summary["peers"] > 0
            reported = report(coord.history, reported, args.json)
        final = coord.save_checkpoint()
        coord.finish()
        coord.drain(args.fetch_timeout + 10.0)  # peers may still be fetching the last round's blobs from us
        print(json.dumps({"event": "done", "checkpoint": str(final), "evaluation": coord.evaluation}) if args.json
              else f"final checkpoint {final}", flush=True)
        return 0
    except (ConfigError, NetworkError, OSError) as err:
        print(f"lte-coordinator: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as stop:  # SIGINT, or SIGTERM (lte.net.procs): leave nothing unsaved
        if coord is not None:
            # a signal is deferred until a commit ends, and may land before that round was printed
            if reported is not None:
                report(coord.history, reported, args.json)
            stopped_at(coord, args.json)
        return 130 if isinstance(stop, KeyboardInterrupt) else stop.code
    finally:
        if server is not None:
            server.close()
        if coord is not None:
            coord.close()


def report(history: list[dict[str, Any]], reported: int, as_json: bool) -> int:
    """Print every round of `history` after the first `reported`, so each committed round is printed once, also
    when a stop arrives between its commit and its print; returns the new count."""
    for summary in history[reported:]:
        if as_json:
            print(json.dumps({"event": "round", **summary}), flush=True)
        else:
            acc, loss = summary.get("test_accuracy"), summary["mean_loss"]
            print(f"round {summary['round']:4d}  peers {summary['peers']}  "
                  f"loss {loss if loss is None else f'{loss:.4f}'}  "
                  f"test_acc {acc if acc is None else f'{acc:.4f}'}  base {summary['base_hash'][:12]}", flush=True)
    return len(history)


def stopped_at(coord, as_json: bool) -> None:
    """Checkpoint the current round before leaving, so that `start` on the same directory loses nothing."""
    try:
        final = coord.save_checkpoint()
    except Exception as err:  # noqa: BLE001 (leaving anyway: say why nothing was saved, in one line)
        print(f"lte-coordinator: error: final checkpoint not saved: {err}", file=sys.stderr, flush=True)
        return
    print(json.dumps({"event": "stopped", "round": coord.round, "checkpoint": str(final)}) if as_json
          else f"stopped at round {coord.round}; checkpoint {final}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
