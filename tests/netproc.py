"""Run `lte-coordinator` and `lte-peer` as real processes for integration tests.

`Network` starts processes with `subprocess.Popen`, reads their stdout in threads (JSON lines become events,
anything else stays a text line), lets a test wait for an event with a deadline, and on exit stops exactly the
processes it started: SIGTERM, then SIGKILL after a grace period, by pid, never by name. It also records every
descendant those processes had (DHT, averager, p2pd), and fails the test if any of them is still alive at the
end (after killing it: it is ours, the test must not leave it behind).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

import lte.net  # noqa: F401  (first, before hivemind: it picks a tensor sharing strategy that needs no daemon)

ROOT = Path(__file__).resolve().parents[1]
TERM_GRACE_S = 15.0  # the CLIs shut hivemind down on SIGTERM; give them this long before SIGKILL

# A copy of configs/digits.yaml with a model small enough for 2 CPU cores, and a learning rate and merge
# interval under which test accuracy clearly rises within a handful of rounds.
SMALL_SPEC = """\
run: digits-vit-tiny
seed: 0
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 4}
data:
  dataset: digits
  batch_size: 64
lte:
  heads: 4
  rank: 8
  alpha: 64
  merge_every: 20
  reset: false
  fold: true
  dense_modules: [head]
  a_init: sqrt_in_over_r
optim:
  lr: 1.0e-3
  replica_lr: 3.0e-3
  full_lr: 1.0e-3
  weight_decay: 0.05
  warmup_steps: 5
  steps: 1500
eval_every: 100
"""


def new_identity(path: Path) -> str:
    """Create a libp2p identity file for `--identity` and return the peer id (base58) it gives."""
    from hivemind.p2p import P2P, PeerID

    P2P.generate_identity(str(path))
    return PeerID.from_identity(Path(path).read_bytes()).to_base58()


def write_spec(directory: Path, text: str = SMALL_SPEC) -> Path:
    path = Path(directory) / "spec.yaml"
    path.write_text(text)
    return path


# Runs `lte-peer` (peer.cli.main, what the console script calls) once the file argv[1] gives its --dht address.
_PRESTART = """\
import os, sys, time
import peer.cli, peer.service  # the slow imports happen before the start signal
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.05)
join = open(go).read().strip()
sys.argv = ["lte-peer"] + sys.argv[2:]
sys.exit(peer.cli.main([join if a == "{join}" else a for a in sys.argv[1:]]))
"""


@dataclass
class Proc:
    """One started process: its events (parsed JSON lines), other stdout lines, and its stderr file."""

    name: str
    popen: subprocess.Popen
    log: Path
    err: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    eof: bool = False
    go: Path | None = None  # start signal of a pre-started peer

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def stderr_text(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def tail(self, n: int = 15) -> str:
        out = self.log.read_text(errors="replace").splitlines()[-n:] if self.log.exists() else []
        err = self.stderr_text().splitlines()[-n:]
        return f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}) stdout:\n" + "\n".join(out) + \
            "\n--- stderr:\n" + "\n".join(err)


class Network:
    """Context manager owning every process a test starts; see the module docstring."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self._cond = threading.Condition()
        self._descendants: dict[tuple[int, float], str] = {}  # (pid, create_time) -> owner name
        self._lock = threading.Lock()  # for _descendants (the watcher thread records, tests read)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="netproc-watch", daemon=True)
        self._watcher.start()

    # ----- starting ---------------------------------------------------------------------------------------
    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, exe: str | None = None) -> Proc:
        """Run `python args...` (or `exe args...`) from the repository root; stdout is read line by line, stderr
        goes to a file."""
        log, err = self.workdir / f"{name}.log", self.workdir / f"{name}.err"
        with open(err, "w") as err_file:
            popen = subprocess.Popen([exe or sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=err_file, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        proc = Proc(name, popen, log, err)
        with self._cond:
            self.procs.append(proc)
        threading.Thread(target=self._read, args=(proc,), name=f"netproc-{name}", daemon=True).start()
        return proc

    def coordinator(self, config: Path, checkpoint_dir: Path, *extra: str, name: str = "coordinator",
                    timeout: float = 90.0) -> tuple[Proc, str]:
        """Start `lte-coordinator start --json` and return it with the multiaddr peers join through."""
        proc = self.start(name, ["-m", "coordinator.cli", "start", "--config", str(config), "--checkpoint-dir",
                                 str(checkpoint_dir), "--json", *extra])
        line = self.wait_line(proc, lambda l: l.startswith("lte-peer join --dht "), timeout, "the join line")
        return proc, line.split()[-1]

    def peer(self, name: str, join: str | None, shard: str, *extra: str) -> Proc:
        """Start `lte-peer join --json` with one torch thread and no progress bars.

        With `join=None` the peer is pre-started: its interpreter imports the program (torch, timm, hivemind: the
        slow part of a start on a busy machine) and then waits; `release(proc, join)` runs `lte-peer join` in it.
        """
        args = ["join", "--dht", join or "{join}", "--shard", shard, "--threads", "1", "--no-progress", "--json",
                "--name", name, "--host", "127.0.0.1", *extra]
        if join is not None:
            return self.start(name, ["-m", "peer.cli", *args])
        go = self.workdir / f"{name}.go"
        proc = self.start(name, ["-c", _PRESTART, str(go), *args])
        proc.go = go
        return proc

    def volunteer(self, name: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
        """A pre-started (see `peer`) `lte-peer join --dht ADDR --json` with no other flag but `extra`: what a volunteer
        types (JSON output aside). Give it a cache directory through XDG_CACHE_HOME in `env`."""
        go = self.workdir / f"{name}.go"
        proc = self.start(name, ["-c", _PRESTART, str(go), "join", "--dht", "{join}", "--json", *extra],
                          env={"OMP_NUM_THREADS": "1", **(env or {})})
        proc.go = go
        return proc

    def release(self, proc: Proc, join: str) -> None:
        """Let a pre-started peer join through `join` now."""
        assert proc.go is not None and not proc.go.exists(), f"{proc.name} is not a waiting pre-started peer"
        tmp = proc.go.with_suffix(".tmp")
        tmp.write_text(join)
        tmp.rename(proc.go)

    # ----- reading ----------------------------------------------------------------------------------------
    def _read(self, proc: Proc) -> None:
        with open(proc.log, "w") as log:
            for raw in proc.popen.stdout:
                log.write(raw)
                log.flush()
                line = raw.strip()
                event = None
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        event = None
                with self._cond:
                    if isinstance(event, dict):
                        event["_t"] = time.monotonic()  # when the test saw it
                        event["_i"] = len(proc.events)  # its index: pass _i + 1 as `start` to wait for the next
                        proc.events.append(event)
                    else:
                        proc.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            proc.eof = True
            self._cond.notify_all()

    def wait_for(self, proc: Proc, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                 start: int = 0) -> dict[str, Any]:
        """The first event of `proc` (from index `start`) that satisfies `pred`; fails the test after `timeout` s
        or when the process has ended without one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in proc.events[start:]:
                    if pred(event):
                        return event
                if proc.eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        why = "exited" if proc.eof else f"nothing within {timeout:.0f} s"
        raise AssertionError(f"{proc.name}: waiting for {what}: {why}\n{self.tails()}")

    def wait_until(self, fn: Callable[[], Any], timeout: float, what: str) -> Any:
        """Re-evaluate `fn` whenever a process prints, until it returns something other than None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = fn()
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        raise AssertionError(f"waiting for {what}: nothing within {timeout:.0f} s\n{self.tails()}")

    def wait_line(self, proc: Proc, pred: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in proc.lines:
                    if pred(line):
                        return line
                if proc.eof or time.monotonic() > deadline:
                    break
                self._cond.wait(1.0)
        why = "exited" if proc.eof else f"nothing within {timeout:.0f} s"
        raise AssertionError(f"{proc.name}: waiting for {what}: {why}\n{self.tails()}")

    def wait_exit(self, proc: Proc, timeout: float) -> int:
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.name} did not exit within {timeout:.0f} s\n{self.tails()}") from None

    def tails(self, n: int = 15) -> str:
        return "\n".join(p.tail(n) for p in self.procs)

    # ----- stopping ---------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._snapshot()

    def _snapshot(self) -> None:
        for proc in list(self.procs):
            if proc.popen.poll() is not None:  # reaped: its pid may belong to someone else by now
                continue
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    key = (child.pid, child.create_time())
                except psutil.NoSuchProcess:
                    continue
                with self._lock:
                    self._descendants[key] = proc.name

    def descendants(self, proc: Proc) -> list[psutil.Process]:
        """The recorded descendants of `proc` (DHT, averager, p2pd) that are still running."""
        self._snapshot()
        return [p for p, owner in self._leftovers() if owner == proc.name]

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Signal one started process (by pid); its recorded descendants are checked at exit like all others."""
        self._snapshot()
        if proc.alive():
            proc.popen.send_signal(sig)

    def _leftovers(self) -> list[tuple[psutil.Process, str]]:
        left = []
        with self._lock:
            recorded = list(self._descendants.items())
        for (pid, created), owner in recorded:
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append((p, owner))
            except psutil.NoSuchProcess:
                pass
        return left

    def close(self) -> None:
        """SIGTERM every started process that still runs, SIGKILL after the grace period; then make sure none of
        their descendants is left (killing any that are, and failing)."""
        self._snapshot()
        running = [p for p in self.procs if p.alive()]
        for proc in running:
            proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in running:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(10)
        self._stop.set()
        self._watcher.join(5)
        # Orphaned hivemind children end themselves within about a second of their parent (procs.py watchdog).
        deadline = time.monotonic() + 10.0
        left = self._leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self._leftovers()
        names = []
        for p, owner in left:
            try:
                names.append(f"{p.pid} ({p.name()}, child of {owner})")
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if left:
            raise AssertionError("processes left behind: " + ", ".join(names))

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except AssertionError:
            if exc_type is None:
                raise  # do not mask the test's own failure with this one


class Observer:
    """A client-mode DHT node in the test process that reads what a run publishes: base hashes and commits."""

    def __init__(self, join: str, coordinator: str | None = None):
        """Join the swarm through `join`: the coordinator's address, or any node's when `coordinator` (its peer id)
        is given."""
        from lte.net.node import start_dht, use_fork_start_method
        from lte.net.procs import restore_sigint

        use_fork_start_method()  # hivemind's processes cannot be spawned
        self.coordinator = coordinator or join.rsplit("/p2p/", 1)[-1]
        self.dht = start_dht([join], client_mode=True)
        restore_sigint()  # hivemind ignores Ctrl+C in the process that starts a DHT; keep pytest interruptible
        self._owner: bytes | None = None

    def base_hashes(self, run: str, round_id: int) -> dict[str, str]:
        from lte.net.records import read_base_hashes

        return read_base_hashes(self.dht, run, round_id)

    def _run_records(self) -> list[Any]:
        from lte.net.records import read_signed_all
        from lte.net.rounds import spec_key

        return [r for r in read_signed_all(self.dht, spec_key(self.coordinator)).values()
                if isinstance(r.value, dict) and r.value.get("coordinator") == self.coordinator]

    def run_record(self) -> dict[str, Any] | None:
        """The run record the coordinator signed (spec, versions, settings), or None if not readable yet."""
        found = self._run_records()
        return found[0].value if len(found) == 1 else None

    def owner(self) -> bytes:
        if self._owner is None:
            found = self._run_records()
            assert len(found) == 1, f"expected one run record from {self.coordinator}, found {len(found)}"
            self._owner = found[0].owner
        return self._owner

    def base_record(self, run: str) -> dict[str, Any] | None:
        """The coordinator's signed base record: current round, base hash, and `close`, the DHT time (this
        machine's clock) at which the round's group closes."""
        from lte.net.records import read_signed
        from lte.net.rounds import base_key

        rec = read_signed(self.dht, base_key(run), self.owner())
        return rec.value if rec is not None and isinstance(rec.value, dict) else None

    def commit(self, run: str, round_id: int) -> dict[str, Any] | None:
        from lte.net.records import read_signed
        from lte.net.rounds import commit_key

        rec = read_signed(self.dht, commit_key(run, round_id), self.owner())
        return rec.value if rec is not None and isinstance(rec.value, dict) else None

    def poll(self, fn: Callable[[], Any], ok: Callable[[Any], bool], timeout: float) -> Any:
        """Call `fn` until `ok(result)` or `timeout` seconds have passed; returns the last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = fn()
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.3)

    def close(self) -> None:
        from lte.net.node import shutdown_dht

        shutdown_dht(self.dht)

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----- reading a run's events ----------------------------------------------------------------------------------
def coordinator_id(join: str) -> str:
    return join.rsplit("/p2p/", 1)[-1]


def rounds_of(proc: Proc) -> dict[int, dict[str, Any]]:
    return {e["round"]: e for e in proc.of("round")}


def base_hashes(proc: Proc) -> list[tuple[int, str, str]]:
    """(round, base hash, event) for every event that reports a base: merged rounds and resyncs."""
    return [(e["round"], e["base_hash"], e["event"]) for e in proc.events if "base_hash" in e and "round" in e]


def disagreements(coord: Proc, peers: list[Proc]) -> list[str]:
    """Every reported base that differs from the coordinator's base of the same round, and every merge whose
    result a peer found to differ from the committed hash (it then resyncs, which would hide the divergence)."""
    truth = {r: e["base_hash"] for r, e in rounds_of(coord).items()}
    bad = [f"{p.name}: {e}" for p in peers for e in p.of("hash_mismatch")]
    for p in peers:
        for r, h, kind in base_hashes(p):
            if r in truth and h != truth[r]:
                bad.append(f"{p.name} {kind} round {r}: {h[:12]} != coordinator {truth[r][:12]}")
    return bad


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    """Every process these tests start (and the observer's DHT in this process) must be gone at the end."""
    before = {(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)}
    yield
    time.sleep(1.0)
    left = [p for p in psutil.Process().children(recursive=True) if (p.pid, p.create_time()) not in before
            and p.status() != psutil.STATUS_ZOMBIE]
    # torch's shared-memory manager exits by itself once its last client is gone, which can take a few seconds; and
    # one serving this pytest process itself (started when it first shares a tensor, as its observer DHT does) stays
    # until pytest exits: it is not a process these tests started
    left = [p for p in psutil.wait_procs(left, timeout=10.0)[1] if not p.name().startswith("torch_shm_manag")]
    for p in left:
        p.kill()
    assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
