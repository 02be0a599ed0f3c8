"""`lte-peer` leaves cleanly on SIGTERM and SIGINT: exit within 10 s, no p2pd or other child left behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_line(log: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in {log} within {timeout} s:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.timeout(240)
# SIGTERM on a pipelined peer: it may have a round in flight on its background thread (peer.service.Flight)
@pytest.mark.parametrize("sig,schedule", [(signal.SIGTERM, "pipelined"), (signal.SIGINT, "sync")])
def test_peer_leaves_cleanly_on_signal(tmp_path, sig, schedule):
    coord = _start(["-m", "coordinator.cli", "start", "--config", "configs/digits.yaml", "--checkpoint-dir",
                    str(tmp_path / "ck"), "--round-seconds", "2"], tmp_path / "coord.log")
    peer = None
    try:
        join = _wait_line(tmp_path / "coord.log", "lte-peer join --dht", 120).split()[-1]
        peer = _start(["-m", "peer.cli", "join", "--dht", join, "--threads", "1", "--no-progress",
                       "--host", "127.0.0.1", "--schedule", schedule], tmp_path / "peer.log")
        _wait_line(tmp_path / "peer.log", "round", 150)  # it has merged at least once: DHT, averager, p2pd all up
        children = psutil.Process(peer.pid).children(recursive=True)
        assert any(c.name() == "p2pd" for c in children), [c.name() for c in children]
        t0 = time.monotonic()
        peer.send_signal(sig)
        peer.wait(timeout=10)
        assert time.monotonic() - t0 < 10
        time.sleep(1.0)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left behind: {[(c.pid, c.name()) for c in alive]}"
        assert "Traceback" not in (tmp_path / "peer.log").read_text()
    finally:
        if peer is not None:
            _stop(peer)
        _stop(coord)
