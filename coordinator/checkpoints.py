"""The coordinator's checkpoint directory: atomic saves, the `latest` link, retention, and serving what it holds.

Layout of `--checkpoint-dir DIR`:
    DIR/round-NNNNNN/model.safetensors, meta.json   one per saved round (format: lte/checkpoint.py)
    DIR/latest -> round-NNNNNN                      switched atomically, always to a complete directory
    DIR/coordinator.key, DIR/p2p.id, DIR/address    the coordinator's identity and last address (for a resume)

A save writes a hidden temporary directory, fsyncs both files and the directory, renames it into place and only
then switches `latest` (a symlink renamed over the old one), so a crash at any point leaves `latest` on the
previous complete checkpoint; leftovers of an interrupted save are removed when the directory is next opened.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import load_file
from torch import Tensor

from lte.checkpoint import (LATEST, META_FILE, MODEL_FILE, CheckpointError, CheckpointMeta, Signer, read_meta,
                            save_state, sign_meta, verify_meta)
from lte.net.blobs import BlobService
from lte.net.blobstore import file_digest
from lte.net.records import publish_signed
from lte.net.rounds import CHECKPOINT, checkpoints_key

ADDRESS_FILE = "address"  # the coordinator's last join address (a resumed coordinator listens there again)
LISTED_IN_DHT = 64  # newest checkpoints in the DHT record (records must stay far below 64 KiB); HTTP lists all
RECORD_TTL_S = 3600.0
_ROUND_DIR = re.compile(r"round-(\d{6,})")
_TEMP = re.compile(r"\.(round-\d+\.(tmp|trash)|latest\.tmp)-\d+")


@dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint on disk, with the addresses under which it is served as blobs."""

    round: int
    path: Path
    base_hash: str
    created: float
    nbytes: int
    model_blob: str
    meta_blob: str

    def listing(self) -> dict[str, Any]:
        """One entry of /checkpoints/ and of the status page's list."""
        return {"round": self.round, "base_hash": self.base_hash, "created": self.created, "bytes": self.nbytes,
                "model_url": f"/checkpoints/{self.round}/{MODEL_FILE}",
                "meta_url": f"/checkpoints/{self.round}/{META_FILE}"}

    def record(self) -> dict[str, Any]:
        """One entry of the signed DHT record a downloader reads."""
        return {"round": self.round, "hash": self.base_hash, "model": self.model_blob, "meta": self.meta_blob,
                "bytes": self.nbytes}


def _index(path: Path) -> SavedCheckpoint | None:
    """A round directory as a SavedCheckpoint, or None when it is incomplete or its model fails its hash."""
    try:
        meta, _ = read_meta(path)
        model = file_digest(path / MODEL_FILE)
        meta_blob = file_digest(path / META_FILE).blob_sha()
    except (CheckpointError, OSError):
        return None
    if model.file_sha() != meta.base_hash:
        return None
    return SavedCheckpoint(meta.round, path, meta.base_hash, meta.created, model.nbytes, model.blob_sha(), meta_blob)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null: meta.json is strict JSON (a diverged loss must not make a save fail)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def contributors(merges: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per peer: samples and merged rounds over `merges` ([{"round", "samples": {peer: n}}])."""
    out: dict[str, dict[str, int]] = {}
    for merge in merges:
        for pid, n in merge["samples"].items():
            c = out.setdefault(pid, {"samples": 0, "rounds": 0})
            c["samples"] += int(n)
            c["rounds"] += 1
    return out


class CheckpointStore:
    """The checkpoints in one directory. Thread-safe: the HTTP server lists and reads while rounds save."""

    def __init__(self, directory: Path, keep_last: int = 5, keep_every: int = 100):
        if keep_last < 1 or keep_every < 0:
            raise CheckpointError("--keep-last must be at least 1 and --keep-every at least 0")
        self.directory, self.keep_last, self.keep_every = Path(directory), keep_last, keep_every
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for entry in self.directory.iterdir():  # leftovers of a save that was interrupted
            if _TEMP.fullmatch(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._saved: dict[int, SavedCheckpoint] = {}
        for entry in self.directory.iterdir():
            if _ROUND_DIR.fullmatch(entry.name) and entry.is_dir() and (found := _index(entry)) is not None:
                if entry.name == f"round-{found.round:06d}":
                    self._saved[found.round] = found
        self._latest = self._find_latest()

    def _find_latest(self) -> SavedCheckpoint | None:
        link = self.directory / LATEST
        if link.is_symlink():
            for c in self._saved.values():
                if c.path.name == os.readlink(link):
                    return c
        # no link (or a dangling one: its target was removed by hand): the newest complete checkpoint
        return self._saved[max(self._saved)] if self._saved else None

    # ----- reading --------------------------------------------------------------------------------------------
    def latest(self) -> SavedCheckpoint | None:
        with self._lock:
            return self._latest

    def saved(self) -> list[SavedCheckpoint]:
        """Newest first."""
        with self._lock:
            return [self._saved[r] for r in sorted(self._saved, reverse=True)]

    def listing(self) -> list[dict[str, Any]]:
        return [c.listing() for c in self.saved()]

    def file(self, round_id: int, name: str) -> Path | None:
        """The path of `name` (model.safetensors or meta.json) of a held round; None for anything else."""
        with self._lock:
            c = self._saved.get(round_id)
        return c.path / name if c is not None and name in (MODEL_FILE, META_FILE) else None

    # ----- writing --------------------------------------------------------------------------------------------
    def save(self, state: Mapping[str, Tensor], fields: dict[str, Any], key: Signer, owner: bytes) -> SavedCheckpoint:
        """Write round `fields["round"]` (state + signed meta.json), switch `latest` to it, apply retention.

        `fields`: the meta.json fields the caller knows (run, spec, spec_hash, round, base_hash, arch, kwargs,
        evaluation, merges, peers, history); parent, contributors and created time are added here.
        """
        round_id, base_hash = int(fields["round"]), str(fields["base_hash"])
        final = self.directory / f"round-{round_id:06d}"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            if save_state(state, tmp / MODEL_FILE) != base_hash:
                raise CheckpointError(f"round {round_id}: the written model does not hash to the base hash")
            parent = self.latest()
            if parent is not None and parent.round >= round_id:  # re-saving a round: its own parent stays
                parent = next((c for c in self.saved() if c.round < round_id), None)
            meta = _json_safe({**fields, "format": CheckpointMeta.model_fields["format"].default,
                               "parent_round": parent.round if parent else None,
                               "parent_hash": parent.base_hash if parent else None,
                               "contributors": contributors(fields.get("merges", [])), "created": time.time()})
            CheckpointMeta.model_validate(meta)  # a bug here must fail the save, not the downloads
            _write_synced(tmp / META_FILE, json.dumps(sign_meta(meta, key, owner), indent=1).encode())
            _fsync_dir(tmp)
            if final.exists():  # the same round saved again: move the old one aside, never leave a gap in it
                trash = self.directory / f".{final.name}.trash-{os.getpid()}"
                final.rename(trash)
                tmp.rename(final)
                shutil.rmtree(trash)
            else:
                tmp.rename(final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        saved = _index(final)
        if saved is None:
            raise CheckpointError(f"{final}: the checkpoint just written does not verify")
        self._switch_latest(final)
        with self._lock:
            self._saved[round_id] = saved
            self._latest = saved
        self._apply_retention()
        return saved

    def _switch_latest(self, target: Path) -> None:
        link = self.directory / f".{LATEST}.tmp-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(target.name)
        os.replace(link, self.directory / LATEST)
        _fsync_dir(self.directory)

    def _keep(self, rounds: list[int], latest: int | None) -> set[int]:
        keep = set(sorted(rounds)[-self.keep_last:])
        if self.keep_every:
            keep |= {r for r in rounds if r % self.keep_every == 0}
        if latest is not None:
            keep.add(latest)
        return keep

    def _apply_retention(self) -> None:
        with self._lock:
            latest = self._latest.round if self._latest else None
            drop = [self._saved.pop(r) for r in sorted(set(self._saved) - self._keep(list(self._saved), latest))]
        for c in drop:  # a download in flight keeps its open file; nobody starts a new one on a listed-out round
            shutil.rmtree(c.path, ignore_errors=True)


def resume_fields(store: CheckpointStore, spec_hash: str, owner: bytes) -> tuple[SavedCheckpoint, CheckpointMeta,
                                                                                  dict[str, Tensor]] | None:
    """The latest checkpoint to resume from, its meta and its state, or None in a fresh directory.

    Refuses (CheckpointError, one line) a checkpoint of another spec, one signed by another key (a different
    --identity would be another coordinator to the peers), or one whose model no longer matches its hash.
    """
    latest = store.latest()
    if latest is None:
        return None
    meta, raw = read_meta(latest.path)
    if meta.spec_hash != spec_hash:
        raise CheckpointError(f"{store.directory} holds run {meta.run!r} with spec {meta.spec_hash[:12]}, but --config "
                              f"gives spec {spec_hash[:12]}: resume with the same config, or use another "
                              "--checkpoint-dir")
    try:
        verify_meta(raw, owner)
    except CheckpointError:
        raise CheckpointError(f"{latest.path / META_FILE} is not signed by this coordinator's key: resume with the "
                              "same --identity (default: the coordinator.key in the checkpoint directory)") from None
    return latest, meta, load_file(latest.path / MODEL_FILE)  # its hash was checked when the store indexed it


class CheckpointPublisher:
    """Serves the store's checkpoints as file blobs (from disk) and keeps the signed DHT record listing them."""

    def __init__(self, dht: Any, blobs: BlobService, run: str, owner: bytes):
        self.dht, self.blobs, self.run, self.owner = dht, blobs, run, owner
        self._served: dict[str, Path] = {}  # blob address -> the file it is served from
        self._published_at = -math.inf

    def publish(self, store: CheckpointStore) -> None:
        saved = store.saved()
        wanted = {}
        for c in saved:
            wanted[c.model_blob] = c.path / MODEL_FILE
            wanted[c.meta_blob] = c.path / META_FILE
        for sha in set(self._served) - set(wanted):
            self.blobs.store.remove(sha)
        # Two rounds hold the same bytes when the later merged nobody: serve them from the file of the round that
        # stays listed, not from one retention has deleted.
        for sha, path in wanted.items():
            if self._served.get(sha) != path:
                self.blobs.store.put_file(path, kind=CHECKPOINT, sha=sha)
        self._served = wanted
        latest = store.latest()
        publish_signed(self.dht, checkpoints_key(self.run), {
            "latest": latest.round if latest else None, "checkpoints": [c.record() for c in saved[:LISTED_IN_DHT]],
        }, self.owner, ttl=RECORD_TTL_S)
        self._published_at = time.monotonic()

    def refresh(self, store: CheckpointStore) -> None:
        """Republish before the record expires (a run may go long without a new checkpoint)."""
        if time.monotonic() - self._published_at > RECORD_TTL_S / 3:
            self.publish(store)
