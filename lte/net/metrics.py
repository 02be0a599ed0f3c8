"""Prometheus metrics that `lte-peer` and `lte-coordinator` export alike: payload traffic by blob kind, round
timing, rejected contributions, and the run's identity. See docs/metrics.md for every metric.

Each process builds its own `CollectorRegistry` (never prometheus_client's global one): a scrape then shows only
that process's numbers, and tests can run several peers in one process.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily, Metric

from lte.net.counters import TrafficCounter
from lte.net.errors import BlobFetchError, BlobIntegrityError, BlobMalformed, BlobTruncated
from lte.validate import Rejected

# Rounds last from seconds (a tiny model on one machine) to many minutes (large T on slow volunteers).
ROUND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))


def traffic_families(traffic: TrafficCounter | None) -> Iterator[Metric]:
    """`lte_sent_bytes_total` and `lte_received_bytes_total` by blob kind, from one atomic snapshot."""
    snap = traffic.snapshot() if traffic is not None else {"sent": {}, "received": {}}
    for direction in ("sent", "received"):
        fam = CounterMetricFamily(f"lte_{direction}_bytes", f"Payload bytes {direction} over p2p, by blob kind",
                                  labels=["kind"], unit="bytes")
        for kind, nbytes in sorted(snap[direction].items()):
            fam.add_metric([kind], nbytes)
        yield fam


def run_info(run: str, spec_hash: str) -> Metric:
    """`lte_run_info{run, spec_hash} 1`: lets a dashboard show (and filter by) the run a process belongs to."""
    return InfoMetricFamily("lte_run", "The LTE run this process belongs to",
                            value={"run": run, "spec_hash": spec_hash})


def fetch_failure_reason(err: BaseException) -> str:
    """Why a member's blobs could not be used (a `lte.validate.REASONS` label): the content check that failed,
    `blob_truncated` / `blob_hash_mismatch` / `malformed` when the bytes that arrived were broken (a faulty or
    malicious sender), otherwise `fetch_failed` (gone, too slow, blob not found)."""
    if isinstance(err, Rejected):
        return err.reason
    errors = [err, *(err.failures.values() if isinstance(err, BlobFetchError) else ())]
    for cls, reason in ((BlobTruncated, "blob_truncated"), (BlobIntegrityError, "blob_hash_mismatch"),
                        (BlobMalformed, "malformed")):
        if any(isinstance(e, cls) for e in errors):
            return reason
    return "fetch_failed"


class RoundEvents:
    """Event metrics: `lte_round_duration_seconds` (histogram) and `lte_rejected_contributions_total{reason}`.

    A round's duration is the time between two merged bases as this process saw them (the previous merge, or the
    base a peer downloaded), so peers and coordinator measure the same thing from their side."""

    def __init__(self, registry: CollectorRegistry, reasons: Iterable[str]):
        self.duration = Histogram("lte_round_duration_seconds", "Seconds between two successive merged bases",
                                  buckets=ROUND_BUCKETS, registry=registry)
        self.rejected = Counter("lte_rejected_contributions", "Contributions left out of a merge, by reason",
                                ["reason"], registry=registry)
        for reason in reasons:  # known reasons show as 0 from the start, so rate() works from the first scrape
            self.rejected.labels(reason)
        self._since: float | None = None
        self._lock = threading.Lock()

    def base_changed(self, merged: bool) -> None:
        """A new base was adopted: by a merge (`merged`, which ends a round), or by a download (starts one)."""
        now = time.monotonic()
        with self._lock:
            if merged and self._since is not None:
                self.duration.observe(now - self._since)
            self._since = now

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
