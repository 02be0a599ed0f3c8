"""What one head sends in a round: an ordered list of tensors that the transport addresses by content hash.

A blob holds, in a fixed order, the LoRA factors (A, B) of every converted layer and then every replica parameter.
The order comes from the model (`Layout`), so every participant of a run packs and unpacks the same way. Factors may
travel in fp16; replicas always travel in fp32 (they are few, and averaging them is where precision matters). The
sender merges its own contribution from the same wire bytes as everyone else, so lossy wire formats never make
bases diverge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lte.lora import LTEModel
from lte.merge import Factors, HeadContribution

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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
def pack_head(model: LTEModel, layout: Layout, h: int = 0, wire: str = "fp32") -> list[Tensor]:
    dtype = WIRE_DTYPES[wire]
    out: list[Tensor] = []
    for n in layout.layers:
        layer = model.layers[n]
        out += [layer.lora_A[h].detach().to("cpu", dtype).contiguous(), layer.lora_B[h].detach().to("cpu", dtype).contiguous()]
    reps = dict(model.replica_parameters())
    out += [reps[n][h].detach().to("cpu", torch.float32).contiguous() for n in layout.replicas]
    return out


def unpack_head(layout: Layout, tensors: Sequence[Tensor]) -> tuple[dict[str, Factors], dict[str, Tensor]]:
    """Split a blob back into factors (as fp32) and replicas; a blob of the wrong structure raises ValueError."""
    if len(tensors) != layout.n_tensors:
        raise ValueError(f"blob has {len(tensors)} tensors, the run's layout needs {layout.n_tensors}")
    factors: dict[str, Factors] = {}
    for i, (n, (sa, sb)) in enumerate(zip(layout.layers, layout.factor_shapes)):
        a, b = tensors[2 * i], tensors[2 * i + 1]
        if tuple(a.shape) != sa or tuple(b.shape) != sb:
            raise ValueError(f"factors of {n} have shapes {tuple(a.shape)}, {tuple(b.shape)}; expected {sa}, {sb}")
        factors[n] = (a.float(), b.float())
    replicas = {}
    for n, shape, t in zip(layout.replicas, layout.replica_shapes, tensors[2 * len(layout.layers):]):
        if tuple(t.shape) != shape:
            raise ValueError(f"replica {n} has shape {tuple(t.shape)}; expected {shape}")
        replicas[n] = t.float()
    return factors, replicas


def contribution(layout: Layout, head_id: str, samples: float, blob: Sequence[Tensor],
                 prev_blob: Sequence[Tensor] | None) -> HeadContribution:
    """A head's merge input from its current blob and the blob it sent at its last merge (None: V is zero)."""
    factors, replicas = unpack_head(layout, blob)
    prev = unpack_head(layout, prev_blob)[0] if prev_blob is not None else None
    return HeadContribution(head_id, samples, factors, replicas, prev)
