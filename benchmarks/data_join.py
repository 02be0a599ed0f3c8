"""Joining a run that ships its data: time from `lte-peer join` to the first training step, and the data bytes each
peer downloads against the size of its shards; the coordinator's data upload when N peers join at once.

    .venv/bin/python benchmarks/data_join.py [--peers 3] [--sets digits large] [--quick]

Each set runs the real `lte-coordinator` and N `lte-peer join --dht ADDR` processes on 127.0.0.1 (loopback: this
measures the software, not a link), started together with empty caches and leaving after 2 merged rounds:
- `digits`: scikit-learn's 1,797 digits drawn at 32x32 as PNG (tests/digitfolder.py), 0.25 MiB shards;
- `large`: generated 64x64 RGB noise images as PNG (incompressible, ~12 KiB each; tens of MB), 4 MiB shards.
Per peer: seconds from its `lte-peer join` (the start signal of a pre-started process, so imports do not count) to
its first training step (its first `shard_start` event), the bytes it downloaded before that step against the size of
its first shard (the manifest is the rest), and every data byte it fetched by the end, by source (the coordinator or
other peers). The coordinator's upload is its `lte_sent_bytes_total{kind="data"}`; without peers re-serving it would
be the sum of every peer's downloads (each shard fetched from the coordinator alone).
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import ROOT, banner, machine, parse, parser, table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from digitfolder import make_digit_folder, write_folder_spec  # noqa: E402
from netproc import Network  # noqa: E402

ROUNDS = 2


def make_noise_folder(root: Path, images: int, classes: int = 10) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return root


def run_set(name: str, folder: Path, shard_mib: float, peers: int, wd: Path) -> dict[str, Any]:
    spec = write_folder_spec(wd, folder)
    with Network(wd / "logs") as net:
        procs = [net.volunteer(f"p{i}", "--host", "127.0.0.1", "--no-progress", "--max-rounds", str(ROUNDS),
                               env={"XDG_CACHE_HOME": str(wd / f"cache{i}")}) for i in range(peers)]
        coord, join = net.coordinator(spec, wd / "ck", "--shard-mib", str(shard_mib), "--round-seconds", "2",
                                      "--score-size", "0", "--checkpoint-every", "1000", "--http-port", "0",
                                      timeout=600)
        url = next(re.search(r"metrics: (\S+)", l).group(1) for l in coord.lines if "metrics: " in l)
        t0 = {}
        for p in procs:
            net.release(p, join)
            t0[p.name] = time.monotonic()
        for p in procs:
            net.wait_for(p, lambda e: e.get("event") == "shard_start", 600, "the first training step")
        for p in procs:
            net.wait_exit(p, 600)
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        m = re.search(r'lte_sent_bytes_total\{kind="data"\} (\S+)', metrics)
        upload = float(m.group(1)) if m else 0.0
        coord_id = join.rsplit("/p2p/", 1)[-1]
        rows = []
        for p in procs:
            ready = p.of("data_ready")[0]
            first = p.of("shard_start")[0]
            fetched = [e for e in p.of("shard") if e["source"] != "cache"]
            rows.append({"peer": p.name, "join_to_first_step_s": first["_t"] - t0[p.name],
                         "bytes_before_first_step": ready["downloaded_bytes"], "first_shard_bytes": ready["shard_bytes"],
                         "shards_fetched": len(fetched),
                         "bytes_from_coordinator": sum(e["bytes"] for e in fetched if e["source"] == coord_id),
                         "bytes_from_peers": sum(e["bytes"] for e in fetched if e["source"] != coord_id)})
    manifest = json.loads((wd / "ck" / "data" / "manifest.json").read_text())
    return {"set": name, "peers": peers, "shards": len(manifest["shards"]), "data_bytes": manifest["bytes"],
            "coordinator_upload": upload, "per_peer": rows}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--sets", nargs="+", default=["digits", "large"], choices=["digits", "large"])
    args = parse(ap, argv)
    banner("joining a run that ships its data", args.quick)
    results = []
    with tempfile.TemporaryDirectory(prefix="lte-data-join-") as tmp:
        for name in args.sets:
            wd = Path(tmp) / name
            if name == "digits":
                folder, mib = make_digit_folder(wd / "images"), 0.25
            else:
                folder, mib = make_noise_folder(wd / "images", 800 if args.quick else 3000), 4.0
            results.append(run_set(name, folder, mib, args.peers, wd))
    rows = []
    for r in results:
        for p in r["per_peer"]:
            rows.append([r["set"], f"{r['data_bytes'] / 2**20:.1f} MiB / {r['shards']}", p["peer"],
                         f"{p['join_to_first_step_s']:.1f}", f"{p['bytes_before_first_step'] / 2**10:.0f} KiB",
                         f"{p['first_shard_bytes'] / 2**10:.0f} KiB", p["shards_fetched"],
                         f"{p['bytes_from_coordinator'] / 2**20:.2f} / {p['bytes_from_peers'] / 2**20:.2f}"])
    table(["set", "data / shards", "peer", "join → first step (s)", "downloaded before it", "first shard",
           "shards fetched", "MiB from coordinator / peers"], rows)
    print()
    table(["set", "peers", "coordinator data upload (MiB)", "peers' downloads (MiB, = upload without re-serving)"],
           [[r["set"], r["peers"], f"{r['coordinator_upload'] / 2**20:.2f}",
             f"{sum(p['bytes_from_coordinator'] + p['bytes_from_peers'] for p in r['per_peer']) / 2**20:.2f}"]
            for r in results])
    write_json(args.out_dir, "data_join", {"machine": machine("cpu"), "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
