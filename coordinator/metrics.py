"""Prometheus metrics of the coordinator (served at /metrics on its HTTP port; see docs/metrics.md).

Gauges and totals are collected from the coordinator's live state at scrape time, so they are never out of date;
what only exists as an event (a round's duration, a rejected contribution) is recorded by `CoordinatorMetrics`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lte.net.metrics import RoundEvents, run_info, traffic_families
from lte.validate import REASONS

if TYPE_CHECKING:
    from coordinator.service import Coordinator

# Why the coordinator leaves a member out of a round (see Coordinator.run_round and lte/validate.py).
REJECT_REASONS = REASONS
MERGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
SCORING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
# Loss improvement of one contribution alone (lte/score.py): negative makes the loss worse.
SCORE_BUCKETS = (-1.0, -0.1, -0.03, -0.01, -0.003, 0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, float("inf"))


class CoordinatorCollector(Collector):
    def __init__(self, coord: "Coordinator"):
        self.coord = coord

    def collect(self) -> Iterator[Metric]:
        c = self.coord
        yield run_info(c.run, c.spec_hash)
        yield GaugeMetricFamily("lte_round", "Current base version (rounds merged)", value=c.round)
        last = c.history[-1] if c.history else {}
        yield GaugeMetricFamily("lte_round_peers", "Peers merged in the last round", value=last.get("peers", 0))
        peers = list(c.peers.values())  # one C-level copy: run_round may add peers while we read
        yield GaugeMetricFamily("lte_live_peers", "Peers merged in any of the last 3 rounds",
                                value=sum(p.last_round >= c.round - 3 for p in peers))
        if last.get("mean_loss") is not None:
            yield GaugeMetricFamily("lte_local_loss", "Mean local training loss reported in the last round",
                                    value=last["mean_loss"])
        evaluation = c.evaluation
        if evaluation:
            yield GaugeMetricFamily("lte_eval_round", "Round of the base the last evaluation ran on",
                                    value=evaluation["round"])
            yield GaugeMetricFamily("lte_eval_accuracy_ratio", "Test accuracy of the base (fraction)",
                                    value=evaluation["test_accuracy"], unit="ratio")
            yield GaugeMetricFamily("lte_eval_loss", "Test loss (cross-entropy) of the base",
                                    value=evaluation["test_loss"])
        if last.get("score_floor") is not None:
            yield GaugeMetricFamily("lte_score_floor", "Lowest loss improvement accepted in the last scored round",
                                    value=last["score_floor"])
        yield CounterMetricFamily("lte_samples", "Training samples merged into the base, all peers",
                                  value=sum(p.samples for p in peers))
        yield from traffic_families(c.blobs.traffic if c.blobs is not None else None)
        yield CounterMetricFamily("lte_checkpoint_saves", "Checkpoints written", value=c.checkpoints_saved)


class CoordinatorMetrics:
    """The coordinator's registry: live state (`CoordinatorCollector`) plus round events."""

    def __init__(self, coord: "Coordinator"):
        self.registry = CollectorRegistry()
        self.rounds = RoundEvents(self.registry, REJECT_REASONS)
        self.merge_duration = Histogram("lte_merge_duration_seconds",
                                        "Seconds from a round's membership agreement to its commit (fetch + merge)",
                                        buckets=MERGE_BUCKETS, registry=self.registry)
        self.scoring_duration = Histogram("lte_scoring_duration_seconds",
                                          "Seconds to score a round's contributions on the private scoring set",
                                          buckets=SCORING_BUCKETS, registry=self.registry)
        self.score = Histogram("lte_contribution_score", "Loss improvement of each scored contribution alone "
                               "(nats on the scoring set; negative: it makes the loss worse)",
                               buckets=SCORE_BUCKETS, registry=self.registry)
        self.registry.register(CoordinatorCollector(coord))

    def committed(self, merge_seconds: float) -> None:
        self.merge_duration.observe(merge_seconds)
        self.rounds.base_changed(merged=True)

    def scored(self, seconds: float, scores: Iterable[float]) -> None:
        self.scoring_duration.observe(seconds)
        for s in scores:
            self.score.observe(s)

    def reject(self, reason: str) -> None:
        self.rounds.reject(reason)


def coordinator_registry(coord: "Coordinator") -> CollectorRegistry:
    return coord.metrics.registry
