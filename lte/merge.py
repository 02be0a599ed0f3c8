"""The LTE merge, independent of where contributions come from (emulated heads or network peers).

Reset-less rule (design notes §1): for every converted layer
    W <- W + s * sum_n w_n (B_n A_n - V_n),   V_n = B_n' A_n' (the head's factors at its last merge),
and every replica parameter (norms, biases, embeddings, dense modules) becomes the weighted mean of the heads'
copies. w_n are sample counts normalised to sum to one.

Determinism is the point of this module: contributions are sorted by head id and everything is summed in float64
before one cast back to the base dtype, so every participant that merges the same bytes gets the same base bit for
bit, whatever order the contributions arrived in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (A: r x in, B: out x r)


@dataclass(frozen=True)
class HeadContribution:
    """What one head brings to a merge.

    `prev_factors` is None when V_n is zero (a fresh head, or the reset variant). A sender that has a dense delta
    instead of factors (the network's dense path) puts it in `deltas`; a layer present there is taken from there.
    """

    head_id: str
    samples: float
    factors: Mapping[str, Factors]
    replicas: Mapping[str, Tensor]
    prev_factors: Mapping[str, Factors] | None = None
    deltas: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass
class MergeUpdate:
    """The merged change: `deltas` are added to the base weights, `replicas` replace the base replicas."""

    deltas: dict[str, Tensor]  # layer -> float64 (out x in), already multiplied by s and the weights
    replicas: dict[str, Tensor]  # name -> float64 weighted mean
    head_ids: list[str]
    weights: list[float]


def head_delta(c: HeadContribution, layer: str) -> Tensor:
    """B A - B' A' of one head for one layer, in float64 (exact enough that the order of terms never matters)."""
    if layer in c.deltas:
        return c.deltas[layer].to(torch.float64)
    a, b = c.factors[layer]
    d = b.to(torch.float64) @ a.to(torch.float64)
    if c.prev_factors is not None:
        pa, pb = c.prev_factors[layer]
        d = d - pb.to(torch.float64) @ pa.to(torch.float64)
    return d


def normalized_weights(samples: Sequence[float]) -> list[float]:
    total = float(sum(float(s) for s in samples))
    if total <= 0:
        raise ValueError("a merge needs at least one contribution with samples > 0")
    return [float(s) / total for s in samples]


def merge_contributions(contributions: Sequence[HeadContribution], scale: float) -> MergeUpdate:
    """Combine heads into one update. The result depends only on the set of contributions, not their order."""
    if not contributions:
        raise ValueError("nothing to merge")
    ids = [c.head_id for c in contributions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate head ids in merge: {sorted(ids)}")
    ordered = sorted(contributions, key=lambda c: c.head_id)
    weights = normalized_weights([c.samples for c in ordered])
    layers = sorted(set(ordered[0].factors) | set(ordered[0].deltas))
    deltas: dict[str, Tensor] = {}
    for layer in layers:
        acc = None
        for w, c in zip(weights, ordered):
            term = w * head_delta(c, layer)
            acc = term if acc is None else acc + term
        deltas[layer] = scale * acc
    replicas: dict[str, Tensor] = {}
    for name in sorted(ordered[0].replicas):
        acc = None
        for w, c in zip(weights, ordered):
            term = w * c.replicas[name].to(torch.float64)
            acc = term if acc is None else acc + term
        replicas[name] = acc
    return MergeUpdate(deltas=deltas, replicas=replicas, head_ids=[c.head_id for c in ordered], weights=weights)


def apply_update(base: MutableMapping[str, Tensor], update: MergeUpdate) -> None:
    """Apply a merge to a base state dict in place (keys are timm's: `<layer>.weight` and replica names)."""
    for layer, delta in update.deltas.items():
        key = f"{layer}.weight"
        w = base[key]
        base[key] = (w.to(torch.float64) + delta.to(w.device)).to(w.dtype)
    for name, value in update.replicas.items():
        base[name] = value.to(device=base[name].device, dtype=base[name].dtype)
