"""What one head sends in a round: an ordered list of tensors that the transport addresses by content hash.

A head sends two blobs: the LoRA factors (A, B) of every converted layer, and its replica parameters, each in a
fixed order that comes from the model (`Layout`), so every participant of a run packs and unpacks the same way.
Splitting them lets the previous round's factors blob serve as V without the replicas, and lets traffic be
counted per kind. The sender merges its own contribution from the same wire bytes as everyone else (with fp16 on
the wire they differ from its live tensors), so lossy wire formats never make bases diverge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lte.lora import LTEModel
from lte.merge import Factors, HeadContribution

@dataclass(frozen=True)
class Layout:
    """Names and shapes of a run's blob entries, derived from the model so all participants agree."""

    layers: tuple[str, ...]
    factor_shapes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    replicas: tuple[str, ...]
    replica_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: LTEModel) -> "Layout":
        layers = tuple(sorted(model.layers))
        reps = dict(model.replica_parameters())
        names = tuple(sorted(reps))
        return cls(layers, tuple((tuple(model.layers[n].lora_A.shape[1:]), tuple(model.layers[n].lora_B.shape[1:]))
                                 for n in layers), names, tuple(tuple(reps[n].shape[1:]) for n in names))

    @property
    def n_tensors(self) -> int:
        return 2 * len(self.layers) + len(self.replicas)

    def factor_numel(self) -> int:
        return sum(a[0] * a[1] + b[0] * b[1] for a, b in self.factor_shapes)


@torch.no_grad()
def pack_factors(model: LTEModel, layout: Layout, h: int = 0) -> list[Tensor]:
    """(A, B) of every converted layer, in layout order, as fp32 on the CPU (the transport picks the wire dtype)."""
    out: list[Tensor] = []
    for n in layout.layers:
        layer = model.layers[n]
        out += [layer.lora_A[h].detach().to("cpu", torch.float32).contiguous(),
                layer.lora_B[h].detach().to("cpu", torch.float32).contiguous()]
    return out


@torch.no_grad()
def pack_replicas(model: LTEModel, layout: Layout, h: int = 0) -> list[Tensor]:
    reps = dict(model.replica_parameters())
    return [reps[n][h].detach().to("cpu", torch.float32).contiguous() for n in layout.replicas]


def unpack_factors(layout: Layout, tensors: Sequence[Tensor]) -> dict[str, Factors]:
    """Factors (as fp32) from a blob; a blob of the wrong structure raises ValueError."""
    if len(tensors) != 2 * len(layout.layers):
        raise ValueError(f"factor blob has {len(tensors)} tensors, the run's layout needs {2 * len(layout.layers)}")
    factors: dict[str, Factors] = {}
    for i, (n, (sa, sb)) in enumerate(zip(layout.layers, layout.factor_shapes)):
        a, b = tensors[2 * i], tensors[2 * i + 1]
        if tuple(a.shape) != sa or tuple(b.shape) != sb:
            raise ValueError(f"factors of {n} have shapes {tuple(a.shape)}, {tuple(b.shape)}; expected {sa}, {sb}")
        factors[n] = (a.float(), b.float())
    return factors


def unpack_replicas(layout: Layout, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
    if len(tensors) != len(layout.replicas):
        raise ValueError(f"replica blob has {len(tensors)} tensors, the run's layout needs {len(layout.replicas)}")
    out = {}
    for n, shape, t in zip(layout.replicas, layout.replica_shapes, tensors):
        if tuple(t.shape) != shape:
            raise ValueError(f"replica {n} has shape {tuple(t.shape)}; expected {shape}")
        out[n] = t.float()
    return out


def contribution(layout: Layout, head_id: str, samples: float, factors: Sequence[Tensor], replicas: Sequence[Tensor],
                 prev_factors: Sequence[Tensor] | None) -> HeadContribution:
    """A head's merge input from its blobs: current factors, replicas, and the factors it sent at its last merge
    (None: V is zero)."""
    prev = unpack_factors(layout, prev_factors) if prev_factors is not None else None
    return HeadContribution(head_id, samples, unpack_factors(layout, factors), unpack_replicas(layout, replicas), prev)
