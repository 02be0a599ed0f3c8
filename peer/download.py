"""`lte-peer download`: fetch a checkpoint of a run over the p2p network and verify it (no training, no data).

Trust comes from the DHT, as for a joining peer: the run record signed by the coordinator named in --dht gives
its owner key; the checkpoint list signed with that key gives each round's file blob addresses and base hash;
the model streams from the coordinator straight into `OUT/.partial-XXXX/` (never held whole in memory), is
checked against its blob address and meta.json's base hash, and meta.json against the coordinator's signature.
Only then is that directory renamed to `OUT/round-NNNNNN/`. Anything that fails verification is deleted.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from lte.checkpoint import META_FILE, MODEL_FILE, CheckpointError, parse_meta, verify_meta
from lte.errors import ConfigError
from lte.net import BlobIntegrityError, NetworkError
from lte.net.node import shutdown_node, start_dht
from lte.net.blobs import BlobService
from lte.net.records import read, read_signed
from lte.net.rounds import CHECKPOINT, checkpoints_key, providers_key, run_prefix
from peer.service import find_run

PARTIAL = ".partial-"


@dataclass
class DownloadOptions:
    dht: str
    out: Path
    round: int | None = None  # None: the latest
    host: str = "127.0.0.1"
    timeout: float = 30.0  # to find the run and its checkpoint list
    stall_timeout: float = 60.0  # no byte of the model for this long: give up
    progress: bool = True
    via: tuple[str, ...] = ()  # other nodes of the run to reach the DHT through (when the coordinator is gone)


def _checkpoint_list(dht: Any, run: str, owner: bytes, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec = read_signed(dht, checkpoints_key(run), owner)
        if rec is not None and isinstance(rec.value, dict) and isinstance(rec.value.get("checkpoints"), list):
            return rec.value
        if time.monotonic() > deadline:
            raise CheckpointError(f"run {run} lists no checkpoints (none saved yet?)")
        time.sleep(0.5)


def _pick(listing: dict[str, Any], wanted: int | None, run: str) -> dict[str, Any]:
    entries = {int(e["round"]): e for e in listing["checkpoints"] if isinstance(e, dict) and "round" in e}
    target = listing.get("latest") if wanted is None else wanted
    if not entries:
        raise CheckpointError(f"run {run} has no checkpoint yet")
    if target not in entries:
        have = ", ".join(map(str, sorted(entries))) or "none"
        raise CheckpointError(f"round {target} is not available from run {run}; available rounds: {have}")
    return entries[target]


def _providers(dht: Any, run: str, round_id: int, coordinator: str, entry: dict[str, Any]) -> list[str]:
    """Who serves checkpoint `round_id`: the coordinator first, then every peer that announced its model blob."""
    announced = read(dht, providers_key(run, round_id))
    peers = sorted(p for p, v in (announced or {}).items() if isinstance(p, str) and isinstance(v, dict)
                   and v.get("m") == entry["model"] and p != coordinator) if isinstance(announced, dict) else []
    return [coordinator, *peers]


def _fetch_file(blobs: BlobService, sources: list[str], sha: str, dest: Path, stall: float, bar: Any = None) -> str:
    """File blob `sha` from the first source that delivers it whole and verified (nothing from a source that fails
    is kept, and the progress bar starts again with the next one); the sha256 of its bytes."""
    errors: list[NetworkError] = []
    for source in sources:
        if bar is not None:
            bar.reset()
        try:
            return blobs.fetch_file(source, sha, dest, kind=CHECKPOINT, stall_timeout=stall,
                                    progress=bar.update if bar is not None else None)
        except NetworkError as err:
            errors.append(err)
    # bytes that failed verification say more than a node that no longer has them
    bad = [e for e in errors if isinstance(e, BlobIntegrityError)]
    raise (bad or errors or [NetworkError("no node serves the checkpoint")])[0]


def download(opts: DownloadOptions, log: Callable[[str], None] = lambda line: None) -> tuple[Path, dict[str, Any]]:
    """Download and verify a checkpoint into `opts.out/round-NNNNNN/`; returns that directory and the list entry."""
    coordinator = opts.dht.rsplit("/p2p/", 1)[-1]
    dht = blobs = partial = None
    try:
        dht = start_dht([opts.dht, *opts.via], host=opts.host, client_mode=True)
        owner, record = find_run(dht, coordinator, opts.timeout)
        run = str(record.get("spec", {}).get("run", ""))
        entry = _pick(_checkpoint_list(dht, run, owner, opts.timeout), opts.round, run)
        round_id = int(entry["round"])
        blobs = BlobService(dht, namespace=run_prefix(run))
        sources = _providers(dht, run, round_id, coordinator, entry)
        log(f"run {run}: fetching checkpoint round {round_id} ({entry.get('bytes', 0):,} bytes); "
            f"{len(sources)} node(s) serve it")
        opts.out.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=opts.out))  # one per download: several may run at once
        partial.chmod(0o755)  # mkdtemp's 0700 would stay on round-NNNNNN/

        _fetch_file(blobs, sources, entry["meta"], partial / META_FILE, opts.stall_timeout)
        meta, raw = parse_meta((partial / META_FILE).read_bytes(), f"round {round_id} {META_FILE}")
        verify_meta(raw, owner)
        if (meta.round, meta.base_hash, meta.spec_hash) != (round_id, entry["hash"], record.get("spec_hash")):
            raise CheckpointError(f"round {round_id}: meta.json describes another checkpoint (round {meta.round})")
        with tqdm(total=int(entry.get("bytes", 0)), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"round {round_id}", disable=not opts.progress, file=sys.stderr) as bar:
            sha = _fetch_file(blobs, sources, entry["model"], partial / MODEL_FILE, opts.stall_timeout, bar)
        if sha != meta.base_hash:
            raise CheckpointError(f"round {round_id}: model sha256 {sha[:12]} is not the signed base hash "
                                  f"{meta.base_hash[:12]}")

        final = opts.out / f"round-{round_id:06d}"
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        return final, entry
    except BlobIntegrityError as err:
        raise CheckpointError(f"checkpoint failed verification and was deleted: {err}") from None
    except CheckpointError as err:
        if partial is not None:  # verification failed after bytes arrived: say that nothing was kept
            raise CheckpointError(f"{err}; the download was deleted") from None
        raise
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        shutdown_node(blobs, dht=dht)


def main(args: Any) -> int:
    """`lte-peer download` after argument parsing (peer/cli.py)."""
    opts = DownloadOptions(dht=args.dht, out=args.out, round=args.round, host=args.host, timeout=args.timeout,
                           progress=not args.no_progress and not args.json, via=tuple(args.via))
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    try:
        path, entry = download(opts, say)
    except (ConfigError, NetworkError, OSError) as err:
        print(f"lte-peer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    model = path / MODEL_FILE
    if args.json:
        print(json.dumps({"event": "downloaded", "round": entry["round"], "path": str(path), "model": str(model),
                          "base_hash": entry["hash"], "bytes": model.stat().st_size}), flush=True)
    else:
        print(f"verified checkpoint round {entry['round']} (sha256 {entry['hash'][:16]}…, signed by the run's "
              f"coordinator) saved to {path}", flush=True)
        print(f"load it: lte.load_checkpoint({str(path)!r})", flush=True)
    return 0
