"""`lte-peer data`: download a run's data shards into the cache, verified, without training.

For a volunteer who wants the data on disk before joining (a later `lte-peer join` downloads none of it again), and
the proof that the data outlives its coordinator: like `lte-peer download`, it reaches the run through any of its
nodes (`--via`), and fetches each shard from the peers that hold it before asking the coordinator.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lte.config import spec_from_dict
from lte.errors import ConfigError
from lte.net import NetworkError


def fetch_all(args: Any) -> dict[str, Any]:
    """Fetch every shard of the run named by `args.dht` into `args.cache_dir`; returns the summary. Raises
    ConfigError (DataError) when the run ships no data or when some shard could not be had from any node."""
    from lte.net.blobs import BlobService
    from lte.net.node import shutdown_node, start_dht
    from lte.net.rounds import run_prefix
    from lte.shards import DataError
    from peer.cache_dir import default_cache_dir
    from peer.service import find_run
    from peer.shards import RunData

    coordinator = args.dht.rsplit("/p2p/", 1)[-1]
    dht = blobs = None
    sources: Counter[str] = Counter()

    def log(event: dict[str, Any]) -> None:
        if event.get("event") == "shard":
            sources[str(event["source"])] += int(event["bytes"])

    try:
        dht = start_dht([args.dht, *args.via], host=args.host, client_mode=True)
        owner, record = find_run(dht, coordinator, args.timeout)
        spec = spec_from_dict(record.get("spec", {}), "run spec")
        if not isinstance(record.get("data"), dict):
            raise ConfigError(f"run {spec.run} ships no data: its peers train on {spec.data.dataset} data they have")
        blobs = BlobService(dht, namespace=run_prefix(spec.run))
        blobs.learn_addresses({coordinator: [args.dht]})
        data = RunData(dht, blobs, run=spec.run, owner=owner, spec_hash=str(record.get("spec_hash")),
                       record=record["data"], coordinator=coordinator, peer_id=dht.peer_id.to_base58(),
                       cache_dir=Path(args.cache_dir or default_cache_dir()), serve=False, maddrs=[], log=log,
                       progress=args.progress, announce=False)
        missing: list[str] = []
        for entry in data.manifest.shards:
            try:
                data.ensure(entry.index)
            except DataError as err:
                missing.append(f"shard {entry.index}: {err}")
        summary = {"event": "data_fetched", "run": spec.run, "shards": len(data.manifest.shards),
                   "missing": len(missing), "bytes_downloaded": data.downloaded, "data_bytes": data.manifest.bytes,
                   "sources": dict(sources), "cache_dir": str(data.root)}
        if missing:
            raise DataError(f"{len(missing)} of {len(data.manifest.shards)} shards could not be fetched (the others "
                            f"are cached in {data.root}); first: {missing[0]}")
        return summary
    finally:
        shutdown_node(blobs, dht=dht)


def main(args: Any) -> int:
    """`lte-peer data` after argument parsing (peer/cli.py)."""
    try:
        summary = fetch_all(args)
    except (ConfigError, NetworkError, OSError) as err:
        print(f"lte-peer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"run {summary['run']}: all {summary['shards']} shards verified in {summary['cache_dir']} "
              f"({summary['bytes_downloaded']:,} bytes downloaded)", flush=True)
    return 0
