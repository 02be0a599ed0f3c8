"""Fixtures for lte.net tests: real hivemind DHTs and p2pd on 127.0.0.1, and a sweep of leftover processes."""
from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from lte.net.node import shutdown_dht, start_dht, visible_maddrs
from lte.net.procs import use_fork_start_method

use_fork_start_method()  # hivemind's averager cannot be spawned


@pytest.fixture(scope="session", autouse=True)
def sweep_children() -> Iterator[None]:
    """After the session, end whatever descendants of this process are left (by ancestry, never by name)."""
    yield
    gc.collect()
    leftovers = psutil.Process().children(recursive=True)
    for proc in leftovers:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


class Swarm:
    """DHT nodes started by a test; shut down in reverse order of creation."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []

    def start(self, initial_peers: list[str] | None = None, **kwargs: Any) -> Any:
        if initial_peers is None and self.nodes:
            initial_peers = visible_maddrs(self.nodes[0])
        node = start_dht(initial_peers or [], **kwargs)
        self.nodes.append(node)
        return node

    @property
    def maddrs(self) -> list[str]:
        return visible_maddrs(self.nodes[0])

    def close(self) -> None:
        while self.nodes:
            shutdown_dht(self.nodes.pop())


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    s = Swarm()
    try:
        yield s
    finally:
        s.close()


def _worker_main(target: Callable[..., Any], args: tuple, results: Any, index: int) -> None:
    try:
        results.put((index, "ok", target(*args)))
    except BaseException as e:  # report everything, the parent decides
        results.put((index, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_processes(target: Callable[..., Any], arg_lists: list[tuple], timeout: float) -> list[Any]:
    """Run target(*args) in one forked process per args tuple and return their results in order.

    A worker must shut down what it started in its own `finally:` block; processes still alive at the
    deadline are killed (with their descendants) and the test fails.
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(target, args, results, i)) for i, args in enumerate(arg_lists)]
    for proc in procs:
        proc.start()
    collected: dict[int, tuple[str, Any]] = {}
    try:
        while len(collected) < len(procs):
            index, status, value = results.get(timeout=timeout)
            collected[index] = (status, value)
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(15)
        for proc in procs:
            if proc.is_alive():
                _kill_tree(proc.pid)
                proc.join(5)
    errors = [value for status, value in collected.values() if status == "error"]
    assert not errors, "worker failed:\n" + "\n".join(errors)
    assert len(collected) == len(procs), f"only {len(collected)} of {len(procs)} workers answered in {timeout} s"
    return [collected[i][1] for i in range(len(procs))]


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def processes() -> Callable[..., list[Any]]:
    """`run_processes` (forked workers with results and cleanup), as a fixture so tests need no imports."""
    return run_processes
