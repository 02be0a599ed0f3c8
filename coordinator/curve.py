"""The run's loss and accuracy curve for the status page: every round while the run is short, evenly thinned as it
grows.

The status page re-fetches /status.json every few seconds, so the curve must stay small however long the run is.
It keeps one point per `stride` rounds; when that reaches 2 x `limit` points, every pair becomes one point and the
stride doubles, so the whole run is always covered at one even resolution, in at most 2 x `limit` + 1 points
(the first point, round 0's evaluation of the untrained model, and the newest one are always shown).
"""
from __future__ import annotations

import threading
from typing import Any

Point = dict[str, Any]


def _pick(points: list[Point]) -> Point:
    """The point that stands for a stretch of rounds: its last evaluated one, else its last. With --eval-every 2,
    picking blindly could drop every accuracy point."""
    evaluated = [p for p in points if p["test_accuracy"] is not None]
    return (evaluated or points)[-1]


class Curve:
    def __init__(self, limit: int = 249):
        self.limit = limit
        self._first: Point | None = None
        self._kept: list[Point] = []  # one point per `stride` rounds after the first, oldest first
        self._window: list[Point] = []  # points since the last kept one (fewer than `stride`)
        self._stride = 1
        self._lock = threading.Lock()  # added to by the round loop, read by HTTP threads

    def add(self, round_id: int, mean_loss: float | None, test_accuracy: float | None,
            test_loss: float | None) -> None:
        point = {"round": round_id, "mean_loss": mean_loss, "test_accuracy": test_accuracy, "test_loss": test_loss}
        with self._lock:
            if self._first is None:
                self._first = point
                return
            self._window.append(point)
            if len(self._window) < self._stride:
                return
            self._kept.append(_pick(self._window))
            self._window = []
            if len(self._kept) >= 2 * self.limit:
                pairs = [self._kept[i:i + 2] for i in range(0, len(self._kept), 2)]
                self._kept = [_pick(pair) for pair in pairs]
                self._stride *= 2

    def points(self) -> list[Point]:
        with self._lock:
            out = ([self._first] if self._first else []) + self._kept + self._window[-1:]
            return [dict(p) for p in out]
