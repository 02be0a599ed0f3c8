"""Prometheus metrics of a peer (`lte-peer join --metrics-port P`; see docs/metrics.md).

The service reports what happened (trained, merged, resynced, rejected) and never touches prometheus_client
itself. Each scrape reads one consistent snapshot, taken under a lock: `lte_samples_total` always equals
`lte_contributed_samples_total + lte_dropped_samples_total + lte_pending_samples`, whenever it is scraped.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lte.net.counters import TrafficCounter
from lte.net.http import serve_metrics
from lte.net.metrics import RoundEvents, fetch_failure_reason, run_info, traffic_families

# What a peer refuses: a merged base that differs from the committed hash (it then downloads the base), a fetched
# blob whose bytes do not hash to their address, and a commit that lists a contribution its own checks reject.
REJECT_REASONS = ("hash_mismatch", "blob_hash_mismatch", "commit_invalid")


class PeerMetrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # per peer: never the process-global default registry
        self.rounds = RoundEvents(self.registry, REJECT_REASONS)
        self._lock = threading.Lock()
        self._run: tuple[str, str] | None = None
        self._traffic: Callable[[], TrafficCounter | None] = lambda: None
        self._round = -1
        self._samples = self._contributed = self._dropped = self._pending = 0
        self._resyncs = 0
        self._busy = 0.0
        self._loss: float | None = None
        self._steps_per_s: float | None = None
        self._round_peers = 0
        self.registry.register(self)

    # ----- what the service reports ------------------------------------------------------------------------
    def joined(self, run: str, spec_hash: str, traffic: Callable[[], TrafficCounter | None]) -> None:
        """The run was found; `traffic` returns the live blob service's counters (the service may replace it)."""
        with self._lock:
            self._run, self._traffic = (run, spec_hash), traffic

    def trained(self, samples: int, steps: int, seconds: float, loss: float) -> None:
        with self._lock:
            self._samples += samples
            self._pending += samples
            self._loss = loss
            self._steps_per_s = steps / seconds if seconds > 0 else None

    def busy(self, seconds: float) -> None:
        """`seconds` more were spent inside training steps (utilization: their rate)."""
        with self._lock:
            self._busy += seconds

    def merged(self, round_id: int, peers: int, contributed: bool, samples: int | None = None) -> None:
        """Round `round_id - 1` was merged. Without `samples`, all our pending samples went into the base if we were
        a committed member and are lost otherwise (a rejected contribution drops all of them); with it (a peer that
        keeps its progress), exactly `samples` went in (none when it was left out), and the rest stay pending."""
        self.rounds.base_changed(merged=True)
        with self._lock:
            if samples is not None:
                settled = min(samples, self._pending)
                if contributed:
                    self._contributed += settled
                else:
                    self._dropped += settled
                self._pending -= settled
            elif contributed:
                self._contributed += self._pending
                self._pending = 0
            else:
                self._dropped += self._pending
                self._pending = 0
            self._round, self._round_peers = round_id, peers

    def resynced(self, round_id: int) -> None:
        """The base was downloaded: progress not yet merged is lost."""
        self.rounds.base_changed(merged=False)
        with self._lock:
            self._dropped += self._pending
            self._pending, self._round = 0, round_id
            self._resyncs += 1

    def reject(self, reason: str) -> None:
        self.rounds.reject(reason)

    def network_error(self, err: BaseException) -> None:
        """A round failed on the network; a blob that arrived but did not match its hash counts as rejected."""
        if fetch_failure_reason(err) == "blob_hash_mismatch":
            self.reject("blob_hash_mismatch")

    # ----- what a scrape reads -----------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self._lock:
            run, traffic = self._run, self._traffic()
            rnd, samples, contributed, dropped = self._round, self._samples, self._contributed, self._dropped
            pending, resyncs, loss, speed, peers = (self._pending, self._resyncs, self._loss, self._steps_per_s,
                                                    self._round_peers)
            busy = self._busy
        if run is not None:
            yield run_info(*run)
        yield GaugeMetricFamily("lte_round", "Round (base version) this peer trains on; -1 before it has a base",
                                value=rnd)
        yield GaugeMetricFamily("lte_round_peers", "Peers merged in the last round this peer merged", value=peers)
        yield CounterMetricFamily("lte_samples", "Training samples processed by this peer", value=samples)
        yield CounterMetricFamily("lte_contributed_samples", "Samples of this peer that went into a merged base",
                                  value=contributed)
        yield CounterMetricFamily("lte_dropped_samples",
                                  "Samples trained on a base this peer then had to replace (missed round or resync)",
                                  value=dropped)
        yield GaugeMetricFamily("lte_pending_samples", "Samples trained since the last merge, not merged yet",
                                value=pending)
        yield CounterMetricFamily("lte_train_seconds", "Seconds spent inside training steps (utilization: its rate)",
                                  value=busy)
        yield CounterMetricFamily("lte_resyncs", "Times this peer downloaded the base from the coordinator",
                                  value=resyncs)
        if loss is not None:
            yield GaugeMetricFamily("lte_local_loss", "Mean training loss of this peer's last T local steps",
                                    value=loss)
        if speed is not None:
            yield GaugeMetricFamily("lte_steps_per_second", "Local optimizer steps per second (last T steps)",
                                    value=speed)
        yield from traffic_families(traffic)

    def serve(self, host: str, port: int) -> "MetricsServer":
        return MetricsServer(self.registry, host, port)


class MetricsServer:
    """prometheus_client's HTTP exporter on `host:port` (any path answers with the metrics), for one registry."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        try:
            self._server, self._thread = serve_metrics(registry, host, port)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
