"""Bytes a merge round moves per peer, per layer, for each way of moving it (design notes §2, docs/protocol.md).

The network uses this to report what it sends and which path is cheaper for the group that actually formed.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    factors: int  # all-gather of (A, B): what each peer receives
    factors_no_cache: int  # the same when receivers lack the senders' previous factors (joiners, resyncs)
    dense: int  # owner-computes reduce, then all-gather of the reduced slices

    @property
    def cheaper(self) -> str:
        return "factors" if self.factors <= self.dense else "dense"


def layer_cost(in_features: int, out_features: int, rank: int, members: int, bytes_per_elem: int = 4) -> LayerCost:
    """Payload bytes one peer receives for one layer in a round of `members` participants."""
    others = members - 1
    factors = others * rank * (in_features + out_features) * bytes_per_elem
    dense = int(2 * in_features * out_features * others / members * bytes_per_elem)
    return LayerCost(factors, 2 * factors, dense)


def data_parallel_bytes(parameters: int, steps: int, members: int, bytes_per_elem: int = 4) -> int:
    """What per-step gradient all-reduce (DDP, ring or butterfly) makes each peer receive over `steps` steps."""
    return int(2 * parameters * (members - 1) / members * bytes_per_elem) * steps
