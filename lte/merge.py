"""The LTE merge, independent of where contributions come from (emulated heads or network peers).

Reset-less rule (design notes §1): for every converted layer
    W <- W + s * sum_n w_n (B_n A_n - V_n),   V_n = B_n' A_n' (the head's factors at its last merge),
and every replica parameter (norms, biases, embeddings, dense modules) becomes the weighted mean of the heads'
copies. w_n are sample counts normalised to sum to one, or, with a fixed denominator D (`lte.round_samples`, the
samples a full round brings), w_n = n_n / max(sum n, D): a round that brings fewer samples than a full one moves
the base by that fraction of its update, and replicas by the same fraction towards the members' mean,
R <- R + sum_n w_n (R_n - R), so that a round merged from one member out of four does not apply that head's whole
update (design notes §5).

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


def normalized_weights(samples: Sequence[float], denominator: float = 0.0) -> list[float]:
    """n_n / max(sum n, denominator): they sum to one unless the round brought fewer samples than `denominator`."""
    total = float(sum(float(s) for s in samples))
    if total <= 0:
        raise ValueError("a merge needs at least one contribution with samples > 0")
    total = max(total, float(denominator))
    return [float(s) / total for s in samples]


def merge_contributions(contributions: Sequence[HeadContribution], scale: float, denominator: float = 0.0,
                        base_replicas: Mapping[str, Tensor] | None = None) -> MergeUpdate:
    """Combine heads into one update. The result depends only on the set of contributions, not their order.

    `denominator` (0: none) is the fixed denominator of the weights; a round whose samples fall short of it needs
    `base_replicas`, the values its replicas move from. A round that reaches it merges exactly as without one."""
    if not contributions:
        raise ValueError("nothing to merge")
    ids = [c.head_id for c in contributions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate head ids in merge: {sorted(ids)}")
    ordered = sorted(contributions, key=lambda c: c.head_id)
    weights = normalized_weights([c.samples for c in ordered], denominator)
    short = sum(float(c.samples) for c in ordered) < denominator
    if short and base_replicas is None:
        raise ValueError("a round short of the fixed denominator needs the base replicas it moves from")
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
        base = base_replicas[name].to(torch.float64) if short else None
        acc = None
        for w, c in zip(weights, ordered):
            value = c.replicas[name].to(torch.float64)
            term = w * (value - base) if short else w * value
            acc = term if acc is None else acc + term
        replicas[name] = base + acc if short else acc
    return MergeUpdate(deltas=deltas, replicas=replicas, head_ids=[c.head_id for c in ordered], weights=weights)


def outer_step(update: MergeUpdate, momentum: MutableMapping[str, Tensor], base_replicas: Mapping[str, Tensor],
               lr: float, mu: float) -> MergeUpdate:
    """The update after a Nesterov outer step (design notes §6): per state key, with U the merged update,
    m <- mu m + U and the base moves by lr (U + mu m). `momentum` (float64, keyed like the state dict) is updated in
    place; it is the run's state, like the base. lr = 1 and mu = 0 return `update` itself: plain LTE, bit for bit.

    Why: a merged update taken every T steps is a pseudo-gradient step, and DiLoCo showed that Nesterov momentum on
    it lets T grow to hundreds of steps; the same holds when the update is a sum of low-rank heads. Sorted keys and
    float64 keep every participant's base and momentum bit for bit identical."""
    if lr == 1.0 and mu == 0.0:
        return update

    def step(key: str, u: Tensor) -> Tensor:
        m = momentum.get(key)
        m = u.clone() if m is None else mu * m.to(u.device) + u
        momentum[key] = m
        return lr * (u + mu * m)

    deltas = {layer: step(f"{layer}.weight", update.deltas[layer]) for layer in sorted(update.deltas)}
    replicas = {}
    for name in sorted(update.replicas):
        base = base_replicas[name].to(torch.float64)
        replicas[name] = base + step(name, update.replicas[name] - base)
    return MergeUpdate(deltas=deltas, replicas=replicas, head_ids=update.head_ids, weights=update.weights)


def apply_update(base: MutableMapping[str, Tensor], update: MergeUpdate) -> None:
    """Apply a merge to a base state dict in place (keys are timm's: `<layer>.weight` and replica names)."""
    for layer, delta in update.deltas.items():
        key = f"{layer}.weight"
        w = base[key]
        base[key] = (w.to(torch.float64) + delta.to(w.device)).to(w.dtype)
    for name, value in update.replicas.items():
        base[name] = value.to(device=base[name].device, dtype=base[name].dtype)
