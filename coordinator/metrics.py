"""Prometheus metrics of the coordinator, collected from its live state at scrape time (never out of date)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from coordinator.service import Coordinator


class CoordinatorCollector(Collector):
    def __init__(self, coord: "Coordinator"):
        self.coord = coord

    def collect(self) -> Iterator[Metric]:
        c = self.coord
        yield GaugeMetricFamily("lte_round", "Current base version (rounds merged)", value=c.round)
        last = c.history[-1] if c.history else {}
        yield GaugeMetricFamily("lte_round_peers", "Peers merged in the last round", value=last.get("peers", 0))
        if last.get("mean_loss") is not None:
            yield GaugeMetricFamily("lte_local_loss", "Mean local training loss reported in the last round",
                                    value=last["mean_loss"])
        if c.evaluation:
            yield GaugeMetricFamily("lte_eval_accuracy_ratio", "Test accuracy of the base (fraction)",
                                    value=c.evaluation["test_accuracy"])
            yield GaugeMetricFamily("lte_eval_loss", "Test loss of the base", value=c.evaluation["test_loss"])
        yield CounterMetricFamily("lte_samples", "Samples contributed by all peers",
                                  value=sum(p.samples for p in c.peers.values()))
        for name, data in (("lte_received_bytes", c.blobs.traffic.received), ("lte_sent_bytes", c.blobs.traffic.sent)):
            fam = CounterMetricFamily(name, f"Payload bytes {name.split('_')[1]} over p2p, by kind of tensor",
                                      labels=["kind"])
            for kind, v in sorted(data.items()):
                fam.add_metric([kind], v)
            yield fam
        yield CounterMetricFamily("lte_checkpoint_saves", "Checkpoints written", value=c.checkpoints_saved)


def coordinator_registry(coord: "Coordinator") -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(CoordinatorCollector(coord))
    return reg
