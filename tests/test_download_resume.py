"""Checkpoints over a real network: `lte-peer download`, the coordinator's HTTP routes, and a coordinator restart.

One run on 127.0.0.1 (a coordinator checkpointing every round, one peer), in this order:
1. three downloads at once: the latest, `--round 2`, and a round that does not exist;
2. the HTTP routes, compared byte for byte with what was downloaded;
3. the coordinator's round-2 model corrupted on disk, then downloaded again: refused, nothing kept;
4. the coordinator SIGTERMed (it checkpoints its current round and leaves), started once with another config
   (refused: one line, exit 2), then with the same one on the same directory: it resumes at the round where it
   stopped, at the same address, and the peer, which kept running, merges with it again.
Every process is started and stopped by pid through `netproc.Network`.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import time

import pytest

from netproc import SMALL_SPEC, Network, Proc, new_identity, write_spec
from test_checkpoints import http_get

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

FAST = ["--round-seconds", "2", "--fetch-timeout", "5"]
# 4 kept: the peer serves a checkpoint a round or two after the coordinator lists it, and the coordinator's stop adds
# one more; with 3 kept, an odd round a peer served 3 rounds late was already retired when the download asked for it
CKPT = ["--checkpoint-every", "1", "--keep-last", "4", "--keep-every", "2", "--http-port", "0"]
SPEC = SMALL_SPEC.replace("merge_every: 20", "merge_every: 5")  # a round every few seconds on a busy machine
assert SPEC != SMALL_SPEC
ROUNDS_BEFORE_DOWNLOAD = 2


@dataclass
class Story:
    workdir: Path
    ck: Path
    join: str
    rejoin: str = ""
    downloads: dict[str, Proc] = field(default_factory=dict)
    http: dict[str, Any] = field(default_factory=dict)
    first: Proc | None = None  # the coordinator's first life
    second: Proc | None = None  # its resumed life
    bad_config: Proc | None = None
    peer: Proc | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, printed for tuning
    stopped: dict[str, Any] = field(default_factory=dict)
    stopped_meta: dict[str, Any] = field(default_factory=dict)  # meta.json of the checkpoint written on SIGTERM
    peer_stayed: bool = False
    latest_before_stop: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)  # the peer's `serving_checkpoint` event


def _http_port(proc: Proc) -> int:
    line = next(l for l in proc.lines if l.startswith("status: http://"))
    return int(re.search(r":(\d+)/status\.json", line).group(1))


def _download(net: Network, name: str, join: str, out: Path, *extra: str) -> Proc:
    return net.start(name, ["-m", "peer.cli", "download", "--dht", join, "--out", str(out), "--json",
                            "--timeout", "60", *extra])


def _rounds(proc: Proc) -> dict[int, dict[str, Any]]:
    return {e["round"]: e for e in proc.of("round")}


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    wd = tmp_path_factory.mktemp("ckrun")
    spec = write_spec(wd, SPEC)
    ck = wd / "ck"
    t0 = time.monotonic()
    with Network(wd / "logs") as net:
        new_identity(wd / "p0.id")
        peer = net.peer("p0", None, "0/1", "--identity", str(wd / "p0.id"), "--schedule", "pipelined")
        coord, join = net.coordinator(spec, ck, *CKPT, *FAST)
        net.release(peer, join)
        s = Story(wd, ck, join, first=coord, peer=peer)
        net.wait_for(coord, lambda e: e.get("event") == "round" and e["round"] >= ROUNDS_BEFORE_DOWNLOAD
                     and e["peers"] == 1, 240, f"round {ROUNDS_BEFORE_DOWNLOAD}")

        phases = {"run up to round 2": time.monotonic() - t0}
        # 1. downloads (three at once: each is mostly interpreter start-up)
        s.downloads = {"latest": _download(net, "dl_latest", join, wd / "out"),
                       "round2": _download(net, "dl_round2", join, wd / "out", "--round", "2"),
                       "unknown": _download(net, "dl_unknown", join, wd / "out_unknown", "--round", "999")}
        for p in s.downloads.values():
            net.wait_exit(p, 150)

        phases["downloads"] = time.monotonic() - t0 - sum(phases.values())
        # 2. HTTP, while the run goes on (the coordinator keeps saving and retiring checkpoints meanwhile)
        port = _http_port(coord)
        s.http["port"] = port
        got = s.downloads["latest"].of("downloaded")
        r = got[0]["round"] if got else 2
        s.http["list"] = http_get(port, "/checkpoints/")
        s.http["status"] = http_get(port, "/status.json")
        s.http["model2"] = http_get(port, "/checkpoints/2/model.safetensors")
        s.http["meta2"] = http_get(port, "/checkpoints/2/meta.json")
        s.http["latest_round"] = r
        s.http["unknown"] = http_get(port, "/checkpoints/999/model.safetensors")
        s.http["traversal"] = http_get(port, "/checkpoints/../coordinator.key")

        # 3. a checkpoint corrupted on the coordinator's disk: same size, one byte flipped
        model2 = ck / "round-000002" / "model.safetensors"
        data = bytearray(model2.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model2.write_bytes(bytes(data))
        s.downloads["tampered"] = _download(net, "dl_tampered", join, wd / "out_tampered", "--round", "2")
        net.wait_exit(s.downloads["tampered"], 150)

        phases["tampered download"] = time.monotonic() - t0 - sum(phases.values())
        # 4. SIGTERM, a download from the peer while the coordinator is gone, a refused restart with another
        #    config, then the resume
        s.served = net.wait_for(peer, lambda e: e.get("event") == "serving_checkpoint", 120, "a served checkpoint")
        s.latest_before_stop = net.wait_for(coord, lambda e: e.get("event") == "round", 60, "a round")
        net.kill(coord, signal.SIGTERM)
        net.wait_exit(coord, 60)
        via = peer.of("joined")[0]["maddrs"][0]
        s.served = peer.of("serving_checkpoint")[-1]  # the newest the peer serves (older ones are retired)
        s.downloads["from_peer"] = _download(net, "dl_from_peer", join, wd / "out_from_peer", "--round",
                                             str(s.served["round"]), "--via", via)
        net.wait_exit(s.downloads["from_peer"], 150)
        stopped = coord.of("stopped")
        s.stopped = stopped[0] if stopped else {}
        if s.stopped:  # read now: once the run goes on, retention may retire it
            s.stopped_meta = json.loads((Path(s.stopped["checkpoint"]) / "meta.json").read_text())
        (wd / "other").mkdir()
        other = write_spec(wd / "other", SPEC.replace("lr: 1.0e-3", "lr: 2.0e-3"))
        s.bad_config = net.start("coord_bad", ["-m", "coordinator.cli", "start", "--config", str(other),
                                               "--checkpoint-dir", str(ck), "--json", *CKPT, *FAST])
        net.wait_exit(s.bad_config, 120)
        phases["stop, refused start"] = time.monotonic() - t0 - sum(phases.values())
        second, s.rejoin = net.coordinator(spec, ck, *CKPT, *FAST, name="coordinator2")
        s.second = second
        resumed_at = s.stopped.get("round", 0)
        # the peer merges with the resumed coordinator, twice
        net.wait_for(peer, lambda e: e.get("event") == "round" and e["round"] >= resumed_at + 2 and e["merged"],
                     180, f"the peer's round {resumed_at + 2} after the restart")
        net.wait_for(second, lambda e: e.get("event") == "round" and e["round"] >= resumed_at + 2, 60,
                     f"the coordinator's round {resumed_at + 2}")
        s.peer_stayed = peer.alive()
        s.http["after_restart"] = http_get(_http_port(second), "/checkpoints/")
        phases["resume, 2 rounds"] = time.monotonic() - t0 - sum(phases.values())
    s.phases = {**phases, "shutdown": time.monotonic() - t0 - sum(phases.values())}
    print("phases (s):", {k: round(v) for k, v in s.phases.items()})
    return s


def _one_error_line(proc: Proc) -> str:
    lines = [l for l in proc.stderr_text().splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.timeout(600)
def test_download_latest_and_a_given_round_verify_and_load_in_timm(story):
    import timm
    from safetensors.torch import load_file

    import lte
    from lte.checkpoint import verify_meta

    from lte.net.records import load_or_create_private_key, owner_tag

    owner = owner_tag(load_or_create_private_key(story.ck / "coordinator.key"))
    for name, want_round in (("latest", None), ("round2", 2)):
        proc = story.downloads[name]
        assert proc.popen.returncode == 0, proc.tail()
        done = proc.of("downloaded")[0]
        path = Path(done["path"])
        assert path.parent == story.workdir / "out" and path.name == f"round-{done['round']:06d}"
        if want_round is not None:
            assert done["round"] == want_round
        else:
            assert done["round"] >= ROUNDS_BEFORE_DOWNLOAD
        model_bytes = (path / "model.safetensors").read_bytes()
        assert hashlib.sha256(model_bytes).hexdigest() == done["base_hash"]
        # the base the coordinator had at that round, as it reported it
        assert _rounds(story.first)[done["round"]]["base_hash"] == done["base_hash"]
        meta = json.loads((path / "meta.json").read_text())
        verify_meta(meta, owner)  # signed with the coordinator's own key
        # the README's three lines, and lte.load_checkpoint
        model = timm.create_model(meta["arch"], pretrained=False, **meta["kwargs"])
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        assert isinstance(lte.load_checkpoint(path), type(model))
    assert not (story.workdir / "out" / ".partial").exists()


@pytest.mark.timeout(600)
def test_download_of_an_unknown_round_is_one_line_listing_the_rounds(story):
    proc = story.downloads["unknown"]
    assert proc.popen.returncode == 2
    line = _one_error_line(proc)
    pattern = r"lte-peer: error: round 999 is not available from run \S+; available rounds: [\d, ]+"
    assert re.fullmatch(pattern, line), line
    assert "2" in line.split("available rounds: ")[1].split(", ")
    assert not any((story.workdir / "out_unknown").glob("*"))


@pytest.mark.timeout(600)
def test_peers_serve_the_newest_checkpoint_when_the_coordinator_is_gone(story):
    """The peer served the checkpoint of its round; with the coordinator stopped, a download through the peer's
    address gets it verified (signature, hash) and it loads in timm."""
    import lte
    import torch

    proc = story.downloads["from_peer"]
    assert proc.popen.returncode == 0, proc.tail()
    got = proc.of("downloaded")[0]
    assert got["round"] == story.served["round"]
    meta = json.loads((Path(got["path"]) / "meta.json").read_text())
    assert hashlib.sha256(Path(got["model"]).read_bytes()).hexdigest() == meta["base_hash"] == got["base_hash"]
    assert isinstance(lte.load_checkpoint(got["path"]), torch.nn.Module)


@pytest.mark.timeout(600)
def test_a_corrupted_checkpoint_is_refused_and_deleted(story):
    proc = story.downloads["tampered"]
    assert proc.popen.returncode == 2, proc.tail()
    line = _one_error_line(proc)
    assert "failed verification" in line and "deleted" in line, line
    out = story.workdir / "out_tampered"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.timeout(600)
def test_http_routes_serve_the_same_bytes(story):
    h = story.http
    status, body = h["list"]
    assert status == 200
    listing = json.loads(body)
    rounds = [e["round"] for e in listing]
    assert rounds == sorted(rounds, reverse=True) and 2 in rounds
    for e in listing:
        assert set(e) >= {"round", "base_hash", "created", "model_url", "meta_url"}
        assert e["model_url"] == f"/checkpoints/{e['round']}/model.safetensors"
    # /status.json lists them the same way (read a moment later: the run went on, older ones may have gone)
    in_status = {e["round"]: e for e in json.loads(h["status"][1])["checkpoints"]}
    assert list(in_status) == sorted(in_status, reverse=True)
    common = set(in_status) & set(rounds)
    assert 2 in common and all(in_status[r] == next(e for e in listing if e["round"] == r) for r in common)
    round2 = story.workdir / "out" / "round-000002"
    assert h["model2"] == (200, (round2 / "model.safetensors").read_bytes())
    assert h["meta2"] == (200, (round2 / "meta.json").read_bytes())
    assert h["unknown"][0] == 404 and h["traversal"][0] == 404


@pytest.mark.timeout(600)
def test_coordinator_restart_resumes_the_round_and_the_peer_keeps_merging(story):
    first, second, peer = story.first, story.second, story.peer
    # SIGTERM: a final checkpoint of the round it was at, then a clean exit
    assert story.stopped, first.tail()
    stop_round = story.stopped["round"]
    assert stop_round >= story.latest_before_stop["round"]
    assert Path(story.stopped["checkpoint"]) == story.ck / f"round-{stop_round:06d}"

    # another config on the same directory: refused in one line, nothing changed
    assert story.bad_config.popen.returncode == 2
    line = _one_error_line(story.bad_config)
    assert "but --config gives spec" in line and "another --checkpoint-dir" in line, line

    # the same config: same identity and address, round continues from where it stopped
    assert story.rejoin == story.join
    assert f"resumed run digits-vit-tiny at round {stop_round} " in " ".join(second.lines)
    after = _rounds(second)
    assert min(after) == stop_round + 1, sorted(after)
    before = _rounds(first)
    # the final checkpoint holds the base the first life ended with (round 0 cannot be: a round was merged)
    assert story.stopped_meta["round"] == stop_round
    assert story.stopped_meta["base_hash"] == before[stop_round]["base_hash"]

    # the peer never left; it merged with both lives, and its base is the coordinator's in every round
    assert story.peer_stayed, peer.tail()
    truth = {**before, **after}
    mine = _rounds(peer)
    assert any(r > stop_round and e["merged"] for r, e in mine.items()), sorted(mine)
    wrong = {r: (e["base_hash"][:12], truth[r]["base_hash"][:12]) for r, e in mine.items()
             if r in truth and e["base_hash"] != truth[r]["base_hash"]}
    assert not wrong, wrong
    assert not peer.of("hash_mismatch")

    # the resumed coordinator serves what it saved since, and no longer the checkpoint corrupted on its disk
    status, body = story.http["after_restart"]
    served = [e["round"] for e in json.loads(body)]
    assert status == 200 and served[0] > stop_round and 2 not in served, served
