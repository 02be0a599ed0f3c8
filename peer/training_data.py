"""Where a joining peer's training data comes from: the run itself, unless the volunteer brings a copy.

A run whose record lists data (an image folder or CIFAR-10 run) ships it: without `--data` the peer fetches, caches
and serves the run's shards (peer/shards.py) and trains on their stream. With `--data PATH` (a local copy) or for
the built-in digits, the peer loads the set itself and trains on `--shard I/N` of it, as before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import Dataset

from lte.data import load_datasets, shard
from lte.lora import head_seed


def training_data(peer: Any, record: dict[str, Any], batch: int) -> tuple[Dataset, Iterator[Any] | None, str]:
    """(a data set to check the model against, the batch stream to train on or None for the data set's own, what
    to call the data in errors). `peer` is a peer.service.Peer that has joined the run's DHT."""
    opts, spec = peer.opts, peer.spec
    shipped = record.get("data")
    if opts.data or opts.dataset or not isinstance(shipped, dict):
        train_set = load_datasets(peer._data_spec(), spec.seed)[0]
        idx, count = opts.shard or (0, 1)
        return shard(train_set, idx, count, spec.seed), None, f"this peer's data ({peer._data_spec().dataset})"
    from peer.cache_dir import default_cache_dir
    from peer.shards import RunData

    if opts.shard is not None:  # the run deals its shards out itself
        peer.log({"event": "shard_flag_ignored", "reason": "the run ships its data; peers choose shards themselves"})
    peer.run_data = data = RunData(
        peer.dht, peer.blobs, run=spec.run, owner=peer.owner, spec_hash=spec.spec_hash(), record=shipped,
        coordinator=peer.coordinator, peer_id=peer.peer_id, cache_dir=Path(opts.cache_dir or default_cache_dir()),
        serve=not peer.client_mode, maddrs=peer.maddrs, log=peer.log, progress=opts.progress)
    first = data.first_shard()
    first_set = data.dataset(first)
    peer.log({"event": "data_ready", "first_shard": first, "held": data.held(),
              "downloaded_bytes": data.downloaded, "shard_bytes": data.manifest.shards[first].bytes})
    stream = data.batches(first, batch, head_seed(spec.seed, peer.peer_id))
    return first_set, stream, "the run's data"
