"""Process hygiene for programs that run hivemind.

hivemind runs each DHT and each averager as a child process, and each DHT owns a `p2pd` child. Left alone,
these outlive a parent that is killed, and hivemind also disables Ctrl+C in the parent. The helpers here
make shutdown dependable: call `use_fork_start_method()` and `install_signal_handlers()` first thing in
`main()`, and shut things down in a `finally:` block (averagers before DHTs).
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (registers its exit hook now, so that ours runs before it)
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

ORPHAN_POLL_S = 1.0


def use_fork_start_method() -> None:
    """Make multiprocessing fork, as hivemind's averager cannot be pickled for spawn/forkserver.

    Linux defaults to fork up to Python 3.13 and macOS does not; Python 3.14 changes the Linux default.
    """
    if mp.get_start_method(allow_none=True) != "fork":
        mp.set_start_method("fork", force=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM raises SystemExit so `finally:` blocks shut hivemind down; SIGINT raises KeyboardInterrupt again.

    Must run in the main thread. Without the SIGTERM handler a `kill` leaves DHT, averager and p2pd running
    for a minute or more; creating a hivemind averager sets SIGINT to SIG_IGN in the parent, so call
    `restore_sigint()` (or this function) again after creating one.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    restore_sigint()


def restore_sigint() -> None:
    """Undo hivemind's `signal(SIGINT, SIG_IGN)` in the parent (no-op off the main thread, where it is illegal)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while the block runs, then act on the first that came (as if it came just now).

    For a state change that must not stop halfway (a merge applied to the base, its round and its checkpoint):
    the handlers above raise wherever the main thread is, which would leave it half done. Only in the main
    thread, where Python runs signal handlers; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def prepare_hivemind_child(own_process_group: bool) -> None:
    """First thing to run inside a hivemind child process (DHT or averager) that this package starts.

    - SIGTERM goes back to its default action: the parent's SystemExit handler is inherited through fork and
      would make `terminate()` unreliable in a child whose main thread sits in an event loop. SIGINT is
      ignored: Ctrl+C reaches every process of the terminal's group, and the parent shuts its children down.
    - With `own_process_group`, the child leads a new process group that its p2pd inherits, so one
      `killpg` removes both even after the child itself has died (see `kill_process_group`).
    - A watchdog thread ends the child (and its group) once its parent is gone, so a SIGKILLed parent
      leaves nothing behind. It polls getppid() rather than using PR_SET_PDEATHSIG, which fires when the
      parent *thread* exits and so would kill a DHT started from a worker thread.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl+C reaches the whole foreground process group; the parent decides how its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if own_process_group:
        os.setpgid(0, 0)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        if own_process_group:
            with suppress(ProcessLookupError):
                os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


def kill_process_group(pgid: int | None) -> None:
    """SIGKILL whatever is left of a process group that a child made with `prepare_hivemind_child(True)`.

    Call it only right after that child has ended (a group id stays valid while any member lives).
    """
    if pgid is None or pgid <= 1 or pgid == os.getpgid(0):
        return
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_exit_hooks: list[tuple[weakref.ref, Callable[[Any], None], int]] = []
_exit_hooks_lock = threading.Lock()


def stop_at_exit(obj: Any, stop: Callable[[Any], None]) -> None:
    """Call `stop(obj)` at interpreter exit if `obj` still exists; the latest registered stops first.

    Without this, multiprocessing's own exit hook SIGTERMs hivemind children mid-flight (no graceful p2pd
    shutdown). Last-in-first-out order stops blob services and averagers before the DHT they use.
    """
    with _exit_hooks_lock:
        _exit_hooks.append((weakref.ref(obj), stop, os.getpid()))


def forget_at_exit(obj: Any) -> None:
    """Undo `stop_at_exit` for `obj` (call when it was stopped explicitly, so it is not stopped twice)."""
    with _exit_hooks_lock:
        _exit_hooks[:] = [hook for hook in _exit_hooks if hook[0]() is not None and hook[0]() is not obj]


@atexit.register
def _stop_all_at_exit() -> None:
    with _exit_hooks_lock:
        hooks = list(reversed(_exit_hooks))
        _exit_hooks.clear()
    for ref, stop, pid in hooks:
        obj = ref()
        if obj is not None and pid == os.getpid():  # a forked child must not stop its parent's objects
            with suppress(Exception):
                stop(obj)
