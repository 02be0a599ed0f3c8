"""The run's data on a peer: fetch the signed manifest and the shards this peer trains on, cache them, serve them.

Guarantees, and why:
- A peer trains only on shards whose sha256 is listed by a manifest that the run's coordinator signed and whose
  address and sha256 the signed run record gives: nobody, not a peer that serves shards nor a stale cache, can make
  it train on other data. A shard is checked as it arrives (a file that fails is deleted, never renamed into the
  cache) and again, from the cache, the first time this process uses it (a corrupted file is dropped and fetched
  again).
- A restarted peer downloads nothing it has: shards are cached on disk under their sha256 (`--cache-dir`), and it
  starts on the shards it holds.
- Coverage without a scheduler (design notes §7): every peer records in the DHT which shards it holds or is about
  to fetch; a joining peer starts on a shard that fewest peers have, ties broken by an order seeded by its peer id,
  and peers that chose the same shard at the same moment are separated by peer id. It moves on, shard after shard,
  the same way, so the whole set gets covered over time.
- Peers serve the shards they hold (like checkpoints), and a fetch tries peers that hold the shard before the
  coordinator: the coordinator's upload does not grow with every peer that joins, and a download goes on when the
  coordinator is busy or gone.
- A training sample is read from the shard file when it is drawn: the data set is never loaded into memory.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from lte.net import NetworkError
from lte.net.blobs import BlobService
from lte.net.errors import BlobIntegrityError
from lte.net.records import publish, read
from lte.net.rounds import DATA, data_holders_key
from peer.cache_dir import check_cache_dir
from lte.shards import DataError, Manifest, ShardDataset, ShardEntry, file_sha256, parse_manifest

HOLDERS_TTL_S = 3600.0  # republished at every move to a new shard
CLAIM_SETTLE_S = 1.5  # how long a joining peer lets a simultaneous joiner's claim reach the DHT
PEER_SOURCES_FIRST = 2  # holders asked before the coordinator; the rest after it
STALL_S = 30.0
# Free space a peer leaves on the cache's disk: filling a volunteer's disk to the last byte breaks their machine.
MIN_FREE_BYTES = int(os.environ.get("LTE_MIN_FREE_BYTES", 256 * 2**20))


def _rank(peer_id: str, index: int) -> str:
    return hashlib.sha256(f"{peer_id}|{index}".encode()).hexdigest()


class RunData:
    """This peer's shards of the run: see the module docstring. Thread-safe (the prefetch runs beside training)."""

    def __init__(self, dht: Any, blobs: BlobService, *, run: str, owner: bytes, spec_hash: str,
                 record: dict[str, Any], coordinator: str, peer_id: str, cache_dir: Path, serve: bool,
                 maddrs: list[str], log: Callable[[dict[str, Any]], None], progress: bool = True,
                 announce: bool = True):
        """`announce`: record in the DHT which shards this node holds (False for a node that only downloads: it
        trains on nothing and serves nothing, so it must not count towards any shard's coverage)."""
        self.dht, self.blobs, self.run, self.coordinator, self.peer_id = dht, blobs, run, coordinator, peer_id
        self.serve, self.maddrs, self.log, self.progress, self.announce = serve, maddrs, log, progress, announce
        self.root = check_cache_dir(cache_dir)
        (self.root / "shards").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self.downloaded = 0  # shard and manifest bytes fetched over the network by this process
        self._verified: set[str] = set()
        self.manifest = self._manifest(record, owner, spec_hash)
        self.pre = self.manifest.preprocessing
        self.claim: int | None = None
        self._visited: set[int] = set()  # shards trained on in the current pass over the set
        self._failed: set[int] = set()  # shards that could not be fetched in the current pass
        # set by a background fetch: the training thread announces the new shard at its next batch, so that other
        # peers find it here (a peer fetching from us while the coordinator is gone asked the coordinator instead)
        self._unannounced = threading.Event()
        self._announced: list[int] | None = None
        for entry in self.manifest.shards:
            if self._path(entry).is_file():
                self._offer(entry)
        self._publish()

    # ----- manifest ---------------------------------------------------------------------------------------
    def _manifest(self, record: dict[str, Any], owner: bytes, spec_hash: str) -> Manifest:
        blob, sha = str(record.get("manifest", "")), str(record.get("sha256", ""))
        path = self.root / "manifests" / f"{sha}.json"
        if not path.is_file() or file_sha256(path) != sha:
            path.parent.mkdir(exist_ok=True)
            self._fetch(blob, path, int(record.get("bytes", 0)), "data manifest", self._sources(None), quiet=True)
            if file_sha256(path) != sha:  # its blob address matched, so the run record is inconsistent
                path.unlink()
                raise DataError("data manifest does not match the sha256 in the run record: refusing it")
        manifest = parse_manifest(path.read_bytes(), owner, self.run, spec_hash)
        if self.serve:
            self.blobs.store.put_file(path, kind=DATA, sha=blob)
        self.log({"event": "data_manifest", "shards": len(manifest.shards), "samples": manifest.samples,
                  "bytes": manifest.bytes, "sha256": sha})
        return manifest

    # ----- holders ----------------------------------------------------------------------------------------
    def _path(self, entry: ShardEntry) -> Path:
        return self.root / "shards" / f"{entry.sha256}.tar"

    def held(self) -> list[int]:
        return [e.index for e in self.manifest.shards if self._path(e).is_file()]

    def _publish(self) -> None:
        if not self.announce:
            return
        held = self.held()
        value = {"h": held, "c": self.claim, "s": self.serve, "a": self.maddrs[:4] if self.serve else []}
        try:
            publish(self.dht, data_holders_key(self.run), value, ttl=HOLDERS_TTL_S, subkey=self.peer_id, wait=False)
        except Exception:  # noqa: BLE001 (an announcement only: coverage is a preference, training goes on)
            return
        if held != self._announced:
            self._announced = held
            self.log({"event": "shards_held", "held": held})

    def _holders(self) -> dict[str, dict[str, Any]]:
        try:
            found = read(self.dht, data_holders_key(self.run))
        except Exception:  # noqa: BLE001 (no holders known: fall back to the seeded order and the coordinator)
            return {}
        if not isinstance(found, dict):
            return {}
        return {str(p): v for p, v in found.items() if isinstance(v, dict) and str(p) != self.peer_id}

    def _counts(self, holders: dict[str, dict[str, Any]]) -> dict[int, int]:
        counts = {e.index: 0 for e in self.manifest.shards}
        for v in holders.values():
            for i in {*(v.get("h") or []), v.get("c")}:
                if isinstance(i, int) and i in counts:
                    counts[i] += 1
        return counts

    def _pick(self, exclude: set[int]) -> int | None:
        """The next shard: one we hold first (nothing to download), else one fewest peers have; the peer id's seeded
        order breaks ties, so peers spread out."""
        counts = self._counts(self._holders())
        held = set(self.held())
        left = [e.index for e in self.manifest.shards if e.index not in exclude]
        if not left:
            return None
        return min(left, key=lambda i: (i not in held, counts[i], _rank(self.peer_id, i)))

    def first_shard(self) -> int:
        """Choose the shard to start on and claim it. Two peers joining together may choose the same one: both
        publish their claim, wait for the other's to arrive, and the one with the larger peer id chooses again."""
        first = self._pick(set())
        assert first is not None
        if first not in self.held():
            self.claim = first
            self._publish()
            time.sleep(CLAIM_SETTLE_S)
            holders = self._holders()
            rivals = {p for p, v in holders.items() if v.get("c") == first or first in (v.get("h") or [])}
            if any(p < self.peer_id for p in rivals):
                taken = {v.get("c") for v in holders.values()} | {i for v in holders.values() for i in v.get("h") or []}
                again = self._pick({i for i in taken if isinstance(i, int)})
                if again is not None:
                    first = self.claim = again
                    self._publish()
        return first

    # ----- fetching ---------------------------------------------------------------------------------------
    def _sources(self, index: int | None) -> list[str]:
        """Who to ask for shard `index` (None: the manifest, which every serving holder serves too)."""
        holders = [(p, v) for p, v in self._holders().items()
                   if v.get("s") and (index is None or index in (v.get("h") or []))]
        random.Random(f"{self.peer_id}|{index}").shuffle(holders)  # spread the load over the holders
        self.blobs.learn_addresses({p: [a for a in v.get("a") or [] if isinstance(a, str)] for p, v in holders})
        peers = [p for p, _ in holders]
        return [*peers[:PEER_SOURCES_FIRST], self.coordinator, *peers[PEER_SOURCES_FIRST:]]

    def _fetch(self, blob: str, dest: Path, nbytes: int, what: str, sources: list[str] | None = None,
               quiet: bool = False) -> str:
        """File blob `blob` into `dest` (written under a temporary name, renamed only once it verified) from the
        first source that delivers it whole; returns the source."""
        tmp = dest.with_name(f".partial-{dest.name}-{os.getpid()}-{threading.get_ident()}")
        errors: list[NetworkError] = []
        for source in sources or [self.coordinator]:
            with tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what, leave=False,
                      file=sys.stderr, disable=quiet or not self.progress) as bar:
                try:
                    self.blobs.fetch_file(source, blob, tmp, kind=DATA, stall_timeout=STALL_S, progress=bar.update)
                except NetworkError as err:
                    errors.append(err)
                    continue
                except OSError as err:
                    tmp.unlink(missing_ok=True)
                    raise DataError(f"--cache-dir {self.root}: cannot write {what} ({err.strerror or err})") from None
            self.downloaded += tmp.stat().st_size
            os.replace(tmp, dest)
            return source
        bad = [e for e in errors if isinstance(e, BlobIntegrityError)]
        if bad:
            raise DataError(f"{what} failed verification from every source and was deleted: {bad[0]}")
        raise DataError(f"{what}: no node of the run serves it ({errors[0] if errors else 'no source'})")

    def _check_space(self, entry: ShardEntry) -> None:
        free = shutil.disk_usage(self.root).free
        if free - MIN_FREE_BYTES < entry.bytes:
            raise DataError(f"--cache-dir {self.root}: {free / 2**20:.1f} MiB free, shard {entry.index} needs "
                            f"{entry.bytes / 2**20:.1f} MiB and {MIN_FREE_BYTES / 2**20:.0f} MiB stay free: free some "
                            "space or pass another --cache-dir")

    def ensure(self, index: int, quiet: bool = False, sources: list[str] | None = None) -> Path:
        """The verified path of shard `index`, from the cache or fetched (from `sources`, default: its holders and
        the coordinator). Only the thread that owns the DHT handle may call it without `sources`: hivemind's DHT
        sends every call down one pipe, which two threads must not write at once. Raises DataError."""
        in_background = sources is not None
        entry = self.manifest.shards[index]
        path = self._path(entry)
        with self._lock:
            if path.is_file() and entry.sha256 in self._verified:
                return path
            if path.is_file():
                if file_sha256(path) == entry.sha256:
                    self._verified.add(entry.sha256)
                    self.log({"event": "shard", "index": index, "sha256": entry.sha256, "source": "cache",
                              "bytes": 0})
                    return path
                path.unlink()  # corrupted on disk: never train on it, never serve it
                self.blobs.store.remove(entry.blob)
                self.log({"event": "shard_corrupt", "index": index, "sha256": entry.sha256})
            self._check_space(entry)
            source = self._fetch(entry.blob, path, entry.bytes, f"shard {index}", sources or self._sources(index),
                                 quiet)
            if file_sha256(path) != entry.sha256:  # cannot happen unless the manifest contradicts itself
                path.unlink()
                raise DataError(f"shard {index} does not match its manifest entry: deleted")
            self._verified.add(entry.sha256)
            self._offer(entry)
            self.log({"event": "shard", "index": index, "sha256": entry.sha256, "source": source,
                      "bytes": entry.bytes})
            if in_background:  # announced by the training thread at its next batch (see batches)
                self._unannounced.set()
            else:
                self._publish()
            return path

    def _offer(self, entry: ShardEntry) -> None:
        if self.serve:
            self.blobs.store.put_file(self._path(entry), kind=DATA, sha=entry.blob)

    # ----- training stream ----------------------------------------------------------------------------------
    def dataset(self, index: int) -> ShardDataset:
        return ShardDataset(self.ensure(index), self.pre)

    def _next(self, current: int | None) -> tuple[int, ShardDataset]:
        """The shard after `current`: the best unvisited one of this pass that can be had (one that cannot is
        skipped for this pass: training goes on with the others); a new pass once all were visited."""
        while True:
            index = self._pick(self._visited | self._failed)
            if index is None:
                if not self._visited:
                    raise DataError("no shard of the run's data could be fetched")
                self._visited, self._failed = set(), set()
                continue
            try:
                return index, self.dataset(index)
            except DataError as err:
                self._failed.add(index)
                self.log({"event": "data_fetch_failed", "index": index, "error": str(err)})

    def _prefetch(self, index: int | None) -> None:
        if index is None or index in self.held():
            return
        sources = self._sources(index)  # here, in the thread that owns the DHT handle

        def run() -> None:
            try:
                self.ensure(index, quiet=True, sources=sources)
            except (DataError, NetworkError, OSError):
                pass  # fetched again, or skipped, when training reaches it

        threading.Thread(target=run, name=f"prefetch-shard-{index}", daemon=True).start()

    def batches(self, first: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream of batches: every sample of shard `first` in a seeded shuffled order, then of the next
        shard (see `_next`), and so on. The next shard is fetched in the background while this one trains."""
        gen = torch.Generator().manual_seed(seed)
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        index, ds = first, self.dataset(first)
        while True:
            self._visited.add(index)
            self.claim = index
            self._publish()
            self.log({"event": "shard_start", "index": index, "sha256": self.manifest.shards[index].sha256,
                      "samples": len(ds)})
            self._prefetch(self._pick(self._visited | self._failed))
            for i in torch.randperm(len(ds), generator=gen).tolist():
                x, y = ds[i]
                xs.append(x)
                ys.append(y)
                if len(xs) == batch_size:
                    yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)
                    xs, ys = [], []
                    if self._unannounced.is_set():
                        self._unannounced.clear()
                        self._publish()
            index, ds = self._next(index)
