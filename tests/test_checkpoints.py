"""Checkpoints without a network: file format and hashes, signed meta.json, atomic saves (a SIGKILLed saver never
leaves a half-written `latest`), retention, loading into plain timm (lte.load_checkpoint and the README's three
lines), resume refusals, and the coordinator's /checkpoints/ HTTP routes."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lte
from lte.checkpoint import (META_FILE, MODEL_FILE, CheckpointError, file_sha256, read_meta, save_state, state_bytes,
                            state_hash, verify_meta)
from lte.models import create_base_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def key_and_owner(tmp_path_factory):
    from lte.net.records import load_or_create_private_key, owner_tag

    key = load_or_create_private_key(tmp_path_factory.mktemp("key") / "coordinator.key")
    return key, owner_tag(key)


def _fields(spec, state, round_id: int, merges=()) -> dict:
    """What the coordinator passes to CheckpointStore.save for a round."""
    return {"run": spec.run, "spec": spec.model_dump(mode="json"), "spec_hash": spec.spec_hash(), "round": round_id,
            "base_hash": state_hash(state), "arch": spec.model.name, "kwargs": spec.model.kwargs,
            "evaluation": {"round": round_id, "test_accuracy": 0.5, "test_loss": float("nan")},
            "merges": list(merges), "peers": {"QmA": {"samples": 10, "rounds": 1, "last_round": round_id - 1}},
            "history": [{"round": round_id, "mean_loss": 1.0}]}


def _store(path: Path, **kw):
    from coordinator.checkpoints import CheckpointStore

    return CheckpointStore(path, **kw)


def _model_state(spec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_base_model(spec.model).state_dict()


# ----- format -------------------------------------------------------------------------------------------------
def test_file_hash_is_the_state_hash_and_the_file_blob_address_is_the_blob_address(tiny_spec, tmp_path):
    from lte.net.blobstore import digest, encode, file_digest

    state = _model_state(tiny_spec, 0)
    path = tmp_path / MODEL_FILE
    assert save_state(state, path) == state_hash(state) == file_sha256(path)
    assert path.read_bytes() == state_bytes(state)  # the bytes peers hash each round are the bytes users download
    both = file_digest(path)
    assert both.file_sha() == state_hash(state)
    as_tensor = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    assert both.blob_sha() == digest(encode([as_tensor]))  # served from disk under the in-memory blob's address


def test_meta_has_every_field_and_its_signature_verifies(tiny_spec, tmp_path, key_and_owner):
    key, owner = key_and_owner
    store = _store(tmp_path / "ck")
    s1, s2 = _model_state(tiny_spec, 1), _model_state(tiny_spec, 2)
    store.save(s1, _fields(tiny_spec, s1, 3, [{"round": 3, "samples": {"QmA": 40}}]), key, owner)
    t0 = time.time()
    merges = [{"round": 4, "samples": {"QmA": 40, "QmB": 20}}, {"round": 5, "samples": {"QmB": 60}}]
    saved = store.save(s2, _fields(tiny_spec, s2, 5, merges), key, owner)

    meta, raw = read_meta(saved.path)
    assert saved.path == tmp_path / "ck" / "round-000005" and (tmp_path / "ck" / "latest").resolve() == saved.path
    assert (meta.run, meta.round, meta.spec_hash) == (tiny_spec.run, 5, tiny_spec.spec_hash())
    assert meta.spec == tiny_spec.model_dump(mode="json")
    assert meta.base_hash == file_sha256(saved.path / MODEL_FILE) == state_hash(s2)
    assert (meta.parent_round, meta.parent_hash) == (3, state_hash(s1))
    assert {pid: (c.samples, c.rounds) for pid, c in meta.contributors.items()} == {"QmA": (40, 1), "QmB": (80, 2)}
    assert [m.model_dump() for m in meta.merges] == merges
    assert t0 - 1 <= meta.created <= time.time() + 1
    assert (meta.arch, meta.kwargs) == (tiny_spec.model.name, tiny_spec.model.kwargs)
    assert meta.evaluation == {"round": 5, "test_accuracy": 0.5, "test_loss": None}  # NaN: strict JSON has none
    assert raw["peers"]["QmA"]["samples"] == 10 and raw["history"][0]["round"] == 5
    assert meta.owner == owner.decode()
    verify_meta(raw, owner)


@pytest.mark.parametrize("field, value", [("round", 6), ("base_hash", "0" * 64), ("kwargs", {"depth": 1}),
                                          ("contributors", {"QmX": {"samples": 1, "rounds": 1}}), ("created", 1.0)])
def test_a_tampered_meta_field_fails_the_signature(tiny_spec, tmp_path, key_and_owner, field, value):
    key, owner = key_and_owner
    state = _model_state(tiny_spec, 1)
    saved = _store(tmp_path / "ck").save(state, _fields(tiny_spec, state, 2), key, owner)
    _, raw = read_meta(saved.path)
    verify_meta(raw, owner)
    with pytest.raises(CheckpointError, match="signature does not verify"):
        verify_meta({**raw, field: value}, owner)


def test_a_meta_signed_by_another_key_is_refused(tiny_spec, tmp_path, key_and_owner):
    from lte.checkpoint import sign_meta
    from lte.net.records import load_or_create_private_key, owner_tag

    key, owner = key_and_owner
    mallory = load_or_create_private_key(tmp_path / "mallory.key")
    state = _model_state(tiny_spec, 1)
    saved = _store(tmp_path / "ck").save(state, _fields(tiny_spec, state, 2), key, owner)
    _, raw = read_meta(saved.path)
    forged = sign_meta({k: v for k, v in raw.items() if k not in ("owner", "signature")}, mallory, owner_tag(mallory))
    verify_meta(forged, owner_tag(mallory))  # well signed, by mallory...
    with pytest.raises(CheckpointError, match="another owner key"):
        verify_meta(forged, owner)  # ...which is not the run's coordinator
    with pytest.raises(CheckpointError, match="signature does not verify"):
        verify_meta({**forged, "owner": owner.decode()}, owner)  # claiming the coordinator's tag does not help


# ----- retention and atomicity --------------------------------------------------------------------------------
def test_retention_keeps_the_last_k_every_m_th_and_latest(tiny_spec, tmp_path, key_and_owner):
    key, owner = key_and_owner
    state = _model_state(tiny_spec, 0)
    store = _store(tmp_path / "ck", keep_last=2, keep_every=3)
    for r in range(1, 11):
        store.save(state, _fields(tiny_spec, state, r), key, owner)
    expected = [10, 9, 6, 3]
    assert [c.round for c in store.saved()] == expected
    on_disk = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert on_disk == ["latest"] + [f"round-{r:06d}" for r in sorted(expected)]
    reopened = _store(tmp_path / "ck", keep_last=2, keep_every=3)
    assert [c.round for c in reopened.saved()] == expected and reopened.latest().round == 10
    assert [e["round"] for e in reopened.listing()] == expected
    assert reopened.listing()[0] == {"round": 10, "base_hash": state_hash(state), "created": reopened.latest().created,
                                     "bytes": len(state_bytes(state)), "model_url": "/checkpoints/10/model.safetensors",
                                     "meta_url": "/checkpoints/10/meta.json"}
    with pytest.raises(CheckpointError, match="keep-last"):
        _store(tmp_path / "other", keep_last=0)


def test_a_model_two_rounds_share_is_served_from_the_round_still_listed(tiny_spec, tmp_path, key_and_owner):
    """A round that merged nobody leaves the base as it was: two checkpoints with one model blob. When retention
    deletes the one the blob was first served from, it must be served from the other's file (it pointed at the
    deleted file before)."""
    from coordinator.checkpoints import CheckpointPublisher
    from lte.net.blobs import BlobService
    from lte.net.blobstore import FileBlob
    from lte.net.node import shutdown_node, start_dht
    from lte.net.records import default_validators

    key, owner = key_and_owner
    state = _model_state(tiny_spec, 0)
    store = _store(tmp_path / "ck", keep_last=1, keep_every=2)
    dht = start_dht(validators=default_validators(key))
    try:
        blobs = BlobService(dht, namespace="t")
        publisher = CheckpointPublisher(dht, blobs, "t", owner)
        for r in (1, 2, 3):  # rounds 1 and 2 hold the same model; round 1 goes when round 3 comes
            store.save(state if r < 3 else _model_state(tiny_spec, 1), _fields(tiny_spec, state, r) if r < 3 else
                       _fields(tiny_spec, _model_state(tiny_spec, 1), r), key, owner)
            publisher.publish(store)
        assert [c.round for c in store.saved()] == [3, 2]
        served = blobs.store.get(store.saved()[1].model_blob)
        assert isinstance(served, FileBlob) and served.path.exists(), served
        assert served.path.read_bytes() == (store.saved()[1].path / MODEL_FILE).read_bytes()
    finally:
        shutdown_node(blobs, dht=dht)


_SAVER = """
import sys, torch
from pathlib import Path
from coordinator.checkpoints import CheckpointStore
from lte.checkpoint import state_hash
from lte.net.records import load_or_create_private_key, owner_tag
directory, keyfile = Path(sys.argv[1]), sys.argv[2]
key = load_or_create_private_key(keyfile)
store = CheckpointStore(directory, keep_last=3, keep_every=0)
start = store.latest().round + 1 if store.latest() else 1
for r in range(start, start + 10000):
    state = {"w": torch.full((1024, 1024), float(r)), "b": torch.arange(r, r + 8, dtype=torch.float32)}  # 4 MiB
    print(f"saving {r}", flush=True)
    store.save(state, {"run": "crash", "spec": {}, "spec_hash": "s", "round": r, "base_hash": state_hash(state),
                       "arch": "none", "kwargs": {}}, key, owner_tag(key))
"""


@pytest.mark.timeout(300)
def test_a_saver_killed_mid_save_leaves_latest_on_a_complete_checkpoint(tmp_path, key_and_owner):
    """SIGKILL a process while it writes checkpoints, at a different point of a save each time: whatever it left,
    `latest` is a complete checkpoint whose model matches its hash, and a reopened store sweeps the leftovers."""
    directory = tmp_path / "ck"
    keyfile = tmp_path / "k.key"
    seen_partial = 0
    # Where a kill lands depends on the machine's speed: try more points of a save until one landed inside one.
    for attempt, delay in enumerate((0.0, 0.02, 0.06, 0.01, 0.03, 0.045, 0.08, 0.005, 0.015, 0.1)):
        if seen_partial and attempt >= 3:
            break
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory), str(keyfile)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            lines = []
            while len(lines) < 3:  # two saves done, the third under way
                line = proc.stdout.readline()
                assert line, "the saver ended early"
                lines.append(line)
            time.sleep(delay)
            proc.kill()
            proc.wait(30)
            lines += proc.stdout.readlines()  # a fast machine may have begun more saves during the delay
        finally:
            proc.kill()
            proc.wait(30)
            proc.stdout.close()
        seen_partial += any(p.name.startswith(".") for p in directory.iterdir())
        meta, _ = read_meta(directory / "latest")  # `latest` resolves...
        attempted = int(lines[-1].split()[1])
        assert meta.round in (attempted - 1, attempted)  # ...to the last save that completed
        assert file_sha256(directory / "latest" / MODEL_FILE) == meta.base_hash
        state = lte.checkpoint.state_from_bytes((directory / "latest" / MODEL_FILE).read_bytes())
        assert torch.equal(state["w"], torch.full((1024, 1024), float(meta.round)))
        store = _store(directory, keep_last=3, keep_every=0)
        assert store.latest().round == meta.round
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # leftovers swept
    assert seen_partial, "no kill landed inside a save: the test did not test anything"


def test_stray_temporary_and_incomplete_directories_are_never_latest(tiny_spec, tmp_path, key_and_owner):
    key, owner = key_and_owner
    state = _model_state(tiny_spec, 0)
    directory = tmp_path / "ck"
    _store(directory).save(state, _fields(tiny_spec, state, 4), key, owner)
    stray = directory / ".round-000005.tmp-12345"  # a crash between writing the model and renaming
    stray.mkdir()
    (stray / MODEL_FILE).write_bytes(state_bytes(state)[:100])
    incomplete = directory / "round-000006"  # a round directory without meta.json (copied by hand, half)
    incomplete.mkdir()
    (incomplete / MODEL_FILE).write_bytes(state_bytes(state))
    os.unlink(directory / "latest")  # and no link at all: the newest complete checkpoint is taken
    store = _store(directory)
    assert store.latest().round == 4 and [c.round for c in store.saved()] == [4]
    assert not stray.exists()
    assert isinstance(lte.load_checkpoint(directory / "round-000004"), torch.nn.Module)


# ----- loading ------------------------------------------------------------------------------------------------
def test_load_checkpoint_gives_the_saved_model_in_plain_timm(tiny_spec, tmp_path, key_and_owner):
    key, owner = key_and_owner
    torch.manual_seed(5)
    original = create_base_model(tiny_spec.model).eval()
    state = original.state_dict()
    saved = _store(tmp_path / "ck").save(state, _fields(tiny_spec, state, 7), key, owner)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = original(x)
        for path in (tmp_path / "ck", saved.path, saved.path / MODEL_FILE, tmp_path / "ck" / "latest"):
            model = lte.load_checkpoint(path)
            assert type(model).__module__.startswith("timm.") and not model.training
            assert torch.equal(model(x), want), path


def test_the_readme_lines_load_a_checkpoint_into_timm(tiny_spec, tmp_path, key_and_owner, monkeypatch):
    """Runs the README's code block as written, in a directory where its checkpoint path exists."""
    key, owner = key_and_owner
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Load a checkpoint in timm"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "timm.create_model(" in code and "load_file(" in code and "strict=True" in code
    path = re.search(r'open\("([^"]+)/meta\.json"\)', code).group(1)
    torch.manual_seed(6)
    original = create_base_model(tiny_spec.model).eval()
    _store(tmp_path / Path(path).parent).save(original.state_dict(), _fields(tiny_spec, original.state_dict(), 2),
                                              key, owner)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the documented lines, verbatim)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(scope["model"].eval()(x), original(x))


def test_a_corrupt_model_file_is_refused(tiny_spec, tmp_path, key_and_owner):
    key, owner = key_and_owner
    state = _model_state(tiny_spec, 0)
    saved = _store(tmp_path / "ck").save(state, _fields(tiny_spec, state, 1), key, owner)
    data = bytearray((saved.path / MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (saved.path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match meta.json's base_hash"):
        lte.load_checkpoint(saved.path)
    assert _store(tmp_path / "ck").latest() is None  # and the coordinator will neither serve nor resume from it
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        lte.load_checkpoint(tmp_path)


def test_resume_refuses_another_spec_or_another_key(tiny_spec, tmp_path, key_and_owner):
    from coordinator.checkpoints import resume_fields
    from lte.net.records import load_or_create_private_key, owner_tag

    key, owner = key_and_owner
    state = _model_state(tiny_spec, 0)
    store = _store(tmp_path / "ck")
    assert resume_fields(store, tiny_spec.spec_hash(), owner) is None  # a fresh directory: a new run
    store.save(state, _fields(tiny_spec, state, 9), key, owner)
    latest, meta, loaded = resume_fields(store, tiny_spec.spec_hash(), owner)
    assert latest.round == meta.round == 9 and state_hash(loaded) == state_hash(state)
    with pytest.raises(CheckpointError, match=r"with spec .* but --config gives spec .*another --checkpoint-dir"):
        resume_fields(store, "f" * 64, owner)
    other = owner_tag(load_or_create_private_key(tmp_path / "other.key"))
    with pytest.raises(CheckpointError, match="not signed by this coordinator's key"):
        resume_fields(store, tiny_spec.spec_hash(), other)


def test_signals_are_held_while_a_round_commits():
    from lte.net.procs import signals_deferred

    got = []
    old = signal.signal(signal.SIGTERM, lambda n, f: got.append("handled"))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            got.append("block ended")
        assert got == ["block ended", "handled"]
    finally:
        signal.signal(signal.SIGTERM, old)


# ----- HTTP ---------------------------------------------------------------------------------------------------
def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET from 127.0.0.1:`port`; also used by test_download_resume."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)  # sent as is: no client-side normalization of "..", so traversal is tried for real
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_http_serves_the_checkpoint_files_and_nothing_else(tiny_spec, tmp_path, key_and_owner):
    from prometheus_client import CollectorRegistry

    from coordinator.http import StatusServer

    key, owner = key_and_owner
    store = _store(tmp_path / "ck", keep_last=5)
    states = {r: _model_state(tiny_spec, r) for r in (2, 4)}
    for r, s in states.items():
        store.save(s, _fields(tiny_spec, s, r), key, owner)
    (tmp_path / "ck" / "secret.txt").write_text("not for download")
    server = StatusServer("127.0.0.1", 0, lambda: {}, CollectorRegistry(), checkpoints=store)
    try:
        status, body = http_get(server.port, "/checkpoints/")
        assert status == 200 and json.loads(body) == store.listing()
        assert [e["round"] for e in json.loads(body)] == [4, 2]
        for r in (2, 4):
            assert http_get(server.port, f"/checkpoints/{r}/model.safetensors") == (200, state_bytes(states[r]))
            assert http_get(server.port, f"/checkpoints/{r}/meta.json") == (200, store.file(r, META_FILE).read_bytes())
        for bad in ("/checkpoints/3/model.safetensors", "/checkpoints/4/coordinator.key", "/checkpoints/../secret.txt",
                    "/checkpoints/4/../../secret.txt", "/checkpoints/4/..%2F..%2Fsecret.txt", "/checkpoints/4",
                    "/checkpoints/-1/meta.json", "/checkpoints/99999999999999999999/meta.json"):
            assert http_get(server.port, bad)[0] == 404, bad
    finally:
        server.close()
