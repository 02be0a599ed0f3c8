"""`lte-peer join`: volunteer a machine to an LTE run."""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

# hivemind 1.1.12 calls torch.jit.script when it is imported, and recent torch answers with a two-line
# FutureWarning on stderr; a failing command must print only its own one-line error there.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from lte.cliargs import OneLineParser, device_available, directory_to_create, existing_path, \
    file_in_existing_directory, int_in, ip_address, port_free, seconds, tcp_port
from lte.errors import ConfigError
from lte.net import NetworkError


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N")
    return int(m.group(1)), int(m.group(2))


def data_line(event: dict) -> str | None:
    """The human line for an event about the run's shipped data (peer/shards.py); None for other events."""
    kind = event["event"]
    if kind == "data_manifest":
        return (f"the run ships its data: {event['shards']} shards, {event['samples']} samples, "
                f"{event['bytes'] / 2**20:.1f} MiB (signed manifest {event['sha256'][:12]})")
    if kind == "shard":
        how = "from the cache" if event["source"] == "cache" else f"downloaded {event['bytes']:,} B from {event['source']}"
        return f"shard {event['index']} verified, {how}"
    if kind == "shard_corrupt":
        return f"cached shard {event['index']} failed its hash: deleted, fetching it again"
    if kind == "shard_start":
        return f"training on shard {event['index']} ({event['samples']} samples)"
    if kind == "data_fetch_failed":
        return f"shard {event['index']} skipped for now: {event['error']}"
    if kind == "shard_flag_ignored":
        return f"--shard ignored: {event['reason']}"
    if kind == "data_ready":
        return f"data ready: {event['downloaded_bytes']:,} B downloaded"
    return None


def resolve_device(device: str) -> str:
    """`auto`: CUDA when torch sees a device, else CPU (a volunteer with a GPU should not have to say so)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="lte-peer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="train a LoRA head and take part in the run's merge rounds")
    j.add_argument("--dht", required=True, help="the coordinator's multiaddr, as printed by lte-coordinator")
    j.add_argument("--dataset", choices=["digits", "imagefolder", "cifar10"], help="override the run's data set")
    j.add_argument("--data", help="path to your own data (ImageFolder, or CIFAR-10 files with --dataset cifar10)")
    j.add_argument("--shard", type=_shard,
                   help="with --data or the built-in digits: train on shard I of N (default 0/1, the whole set); a run "
                        "that ships its data deals its shards out itself")
    j.add_argument("--cache-dir", type=Path,
                   help="where the run's data shards are kept between runs (default ~/.cache/lte-network/data)")
    j.add_argument("--batch-size", type=int_in(1), help="local batch (default: the run's batch / heads)")
    j.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default auto: CUDA when present, else CPU)")
    j.add_argument("--base-dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="hold the frozen base weights on --device in this dtype (default fp32); merges and hash "
                        "checks use an fp32 copy in host memory, so the run's bases stay bit-identical")
    j.add_argument("--name", help="a display name for logs")
    j.add_argument("--max-rounds", type=int_in(1), help="leave after this many merged rounds")
    j.add_argument("--client-mode", action="store_true", help="accept no incoming connections (behind NAT); without it, detected by a dial-back")
    j.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs of a port-forwarded host")
    j.add_argument("--upnp", action="store_true",
                   help="let p2pd ask the home router for a port mapping (UPnP/NAT-PMP; off by default: its discovery multicasts to the local network)")
    j.add_argument("--host", type=ip_address, default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0, every interface: other machines must be able to reach "
                        "this peer to fetch its work; it announces only the addresses the coordinator could dial back)")
    j.add_argument("--port", type=tcp_port, default=0, help="DHT/libp2p TCP port (0: any free port)")
    j.add_argument("--metrics-port", type=tcp_port,
                   help="serve Prometheus metrics on this port of --host (0: any free port)")
    j.add_argument("--identity", help="file that keeps this peer's id stable (created if missing)")
    j.add_argument("--threads", type=int_in(1), help="CPU threads for torch (default: torch's choice)")
    j.add_argument("--schedule", choices=["pipelined", "lockstep", "sync"], default="pipelined",
                   help="pipelined: train on while rounds are merged (default); sync: train T steps, then wait for "
                        "the round; lockstep: a snapshot every T steps, each round merged just before the next "
                        "(deterministic: replays, benchmarks)")
    j.add_argument("--no-progress", action="store_true")
    j.add_argument("--json", action="store_true", help="print one JSON object per event")
    d = sub.add_parser("download", help="download a verified checkpoint of the run (no training, no data)")
    d.add_argument("--dht", required=True, help="the coordinator's multiaddr, as printed by lte-coordinator")
    d.add_argument("--round", type=int_in(0), help="the checkpoint of this round (default: the latest)")
    d.add_argument("--out", required=True, type=Path, help="directory to put round-NNNNNN/ in (created if missing)")
    d.add_argument("--host", type=ip_address, default="127.0.0.1", help="address of the local DHT node")
    d.add_argument("--timeout", type=seconds, default=30.0, help="seconds to find the run and its checkpoint list")
    d.add_argument("--via", nargs="*", default=[], metavar="MULTIADDR",
                   help="other nodes of the run to reach it through (a peer's address, which lte-peer join prints): "
                        "peers serve the newest checkpoint too, so a download works when the coordinator is gone")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print one JSON object when done")
    f = sub.add_parser("data", help="download the run's data shards into the cache, verified (no training)")
    f.add_argument("--dht", required=True, help="the coordinator's multiaddr, as printed by lte-coordinator")
    f.add_argument("--cache-dir", type=Path,
                   help="where to keep the shards (default ~/.cache/lte-network/data, where lte-peer join looks)")
    f.add_argument("--host", type=ip_address, default="127.0.0.1", help="address of the local DHT node")
    f.add_argument("--timeout", type=seconds, default=30.0, help="seconds to find the run")
    f.add_argument("--via", nargs="*", default=[], metavar="MULTIADDR",
                   help="other nodes of the run to reach it through (a peer's address): peers serve the shards they "
                        "hold, so the data stays available when the coordinator is gone")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--json", action="store_true", help="print one JSON object when done")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked without joining the run, cheapest first: bad input is
    refused within seconds, before any process or file is created. Raises ConfigError or NetworkError."""
    joining = args.command == "join"
    if args.command == "download":
        directory_to_create(args.out, "--out")
    if getattr(args, "cache_dir", None) is not None:
        from peer.cache_dir import check_cache_dir  # standard library only: stays instant
        check_cache_dir(args.cache_dir)
    if joining:
        if args.data is not None:
            existing_path(args.data, "--data")
        if args.identity is not None:
            file_in_existing_directory(args.identity, "--identity")
        port_free(args.host, args.port, "--port")
        port_free(args.host, args.metrics_port, "--metrics-port")
        device_available(args.device)
    from lte.net.node import check_node_inputs  # hivemind's address parser: seconds to import
    check_node_inputs([args.dht], args.announce_maddrs if joining else (), args.identity if joining else None)


def main(argv: list[str] | None = None, peer_class: type | None = None) -> int:
    """`peer_class` replaces peer.service.Peer (tests run hostile peers through the same command)."""
    args = parse_args(argv)
    try:
        check_args(args)
    except (ConfigError, NetworkError) as err:
        print(f"lte-peer: error: {err}", file=sys.stderr)
        return 2
    from lte.net.node import prepare_process
    prepare_process()
    if args.command == "download":
        from peer import download
        return download.main(args)
    if args.command == "data":
        from peer import fetch_data
        args.progress = not args.no_progress and not args.json
        return fetch_data.main(args)
    from peer.service import Peer, PeerOptions

    name = args.name or "peer"

    def log(event: dict) -> None:
        if args.json:
            print(json.dumps({"name": name, **event}), flush=True)
        elif event["event"] == "round":
            loss = "-" if event["loss"] is None else f"{event['loss']:.4f}"  # None: followed the round, no training
            print(f"[{name}] round {event['round']:4d}  peers {event['peers']}  loss {loss}  "
                  f"base {event['base_hash'][:12]}  received {sum(event['bytes_received'].values())} B", flush=True)
        elif event["event"] == "joined":
            found = " (no CUDA device found)" if args.device == "auto" and event.get("device") == "cpu" else ""
            print(f"[{name}] joined at round {event['round']} as {event['peer_id']}, training on "
                  f"{event.get('device')}{found}"
                  + (f"; reachable at {' '.join(event['maddrs'])}" if event["maddrs"] else " (client mode)"), flush=True)
        elif event["event"] == "contribution_rejected":
            print(f"[{name}] our contribution to round {event['round']} was rejected: {event['reason']}", flush=True)
        elif data_line(event) is not None:
            print(f"[{name}] {data_line(event)}", flush=True)
        elif event["event"] != "phase":  # four a round: for --json readers (tools, tests), too chatty for people
            print(f"[{name}] {event['event']} at round {event.get('round')}", flush=True)

    peer = server = None
    try:
        from peer.metrics import PeerMetrics
        metrics = PeerMetrics()
        if args.metrics_port is not None:
            server = metrics.serve(args.host, args.metrics_port)
            url = f"http://{args.host}:{server.port}/metrics"
            print(json.dumps({"name": name, "event": "metrics", "url": url}) if args.json
                  else f"[{name}] metrics: {url}", flush=True)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)  # said in the `joined` event
        opts = PeerOptions(dht=args.dht, dataset=args.dataset, data=args.data, shard=args.shard,
                           cache_dir=str(args.cache_dir) if args.cache_dir else None,
                           batch_size=args.batch_size, device=device, base_dtype=args.base_dtype,
                           name=args.name, max_rounds=args.max_rounds,
                           client_mode=args.client_mode, announce_maddrs=tuple(args.announce_maddrs),
                           identity=args.identity, host=args.host, port=args.port, upnp=args.upnp,
                           progress=not args.no_progress, schedule=args.schedule)
        peer = (peer_class or Peer)(opts, log, metrics)
        peer.run_forever()
        return 0
    except (ConfigError, NetworkError, OSError) as err:
        print(f"lte-peer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if peer is not None:
            peer.close()
        if server is not None:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
