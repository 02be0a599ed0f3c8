"""Byte counters per traffic kind, read by the caller (e.g. exported to Prometheus).

Kinds are labels chosen by the local caller ("factors", "dense", ...) or, for pushes, by the remote sender;
they are sanitized and capped so that a remote peer cannot blow up the label set.
"""
from __future__ import annotations

import re
import threading
from collections import defaultdict

MAX_KINDS = 32
OTHER_KIND = "other"
# Bytes of a received blob whose transfer broke off or was refused (a stream that ended early, a timeout, an
# oversized push): they crossed the wire, so totals keep them, but apart, so that a kind's bytes are what its
# formula predicts and retries show as what they are.
INTERRUPTED = "interrupted"
_KIND = re.compile(r"[A-Za-z0-9_.:-]{1,40}")


class TrafficCounter:
    """Thread-safe payload byte totals, sent and received, per kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: defaultdict[str, int] = defaultdict(int)
        self._received: defaultdict[str, int] = defaultdict(int)

    def add_sent(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._sent[self._label(kind)] += nbytes

    def add_received(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._received[self._label(kind)] += nbytes

    @property
    def sent(self) -> dict[str, int]:
        """{kind: payload bytes sent} (a copy)."""
        with self._lock:
            return dict(self._sent)

    @property
    def received(self) -> dict[str, int]:
        """{kind: payload bytes received} (a copy)."""
        with self._lock:
            return dict(self._received)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"sent": {kind: bytes}, "received": {kind: bytes}}, taken atomically."""
        with self._lock:
            return {"sent": dict(self._sent), "received": dict(self._received)}

    def _label(self, kind: str) -> str:
        # called with the lock held
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            return OTHER_KIND
        known = self._sent.keys() | self._received.keys()
        if kind not in known and len(known) >= MAX_KINDS:
            return OTHER_KIND
        return kind
