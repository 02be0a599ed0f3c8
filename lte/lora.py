"""Multi-head LoRA over a frozen base: the model side of LoRA-the-Explorer.

One `LTEModel` holds N heads. Each head owns LoRA factors (A, B) on every converted `nn.Linear` and its own copy
("replica") of every other trainable parameter. The base weights W are shared and frozen. All N heads run in one
pass with `torch.func.vmap`, each on its B/N slice of the batch, so N heads cost about one model's matmuls; a
network peer is the N = 1 case of the same code.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from lte.config import LTESpec
from lte.errors import ConfigError
from lte.merge import Factors, HeadContribution, MergeUpdate, apply_update, merge_contributions, outer_step
from lte.quant import roundtrip


BaseDType = Literal["fp32", "bf16", "int8"]
BASE_DTYPES: tuple[str, ...] = get_args(BaseDType)


def quantize_base(w: Tensor, base_dtype: BaseDType) -> tuple[Tensor, Tensor | None]:
    """A frozen base weight (out x in, fp32) as a low-memory peer stores it: (stored, per-row scale or None).

    int8 is symmetric per-output-row absmax: s = max|W_row| / 127, q = round(W / s). A function of W alone, so
    every peer that holds the same fp32 base holds the same bytes, and re-deriving it after every merge means no
    rounding error ever accumulates. Always returns new tensors.
    """
    if base_dtype == "fp32":
        return w.to(torch.float32, copy=True), None
    if base_dtype == "bf16":
        return w.to(torch.bfloat16), None
    if base_dtype == "int8":
        w = w.to(torch.float32)
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale
    raise ValueError(f"base dtype {base_dtype!r} is not one of {', '.join(BASE_DTYPES)}")


def dequantize_base(stored: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight in `dtype` for one forward. A no-op for an fp32 weight, and for any weight that is not int8
    (eval swaps in the merged fp32 weights through functional_call, and the int8 scale must then be ignored)."""
    if stored.dtype == torch.int8:
        return stored.to(dtype) * scale.to(dtype)[:, None]
    return stored.to(dtype)


class _LowPrecisionLinear(torch.autograd.Function):
    """x dequant(W)^T that keeps the stored low-precision W for backward, not its fp32 dequantization: with plain
    F.linear autograd would hold every layer's fp32 temporary until backward, giving back the memory just saved.
    W is frozen, so backward needs dequant(W) only for the input's gradient, and rebuilds it one layer at a time."""

    generate_vmap_rule = True  # N heads share W under vmap

    @staticmethod
    def forward(x: Tensor, stored: Tensor, scale: Tensor | None) -> Tensor:
        return F.linear(x, dequantize_base(stored, scale, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, stored, scale = inputs
        ctx.save_for_backward(stored, scale)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        stored, scale = ctx.saved_tensors
        return (grad @ dequantize_base(stored, scale, grad.dtype)).to(ctx.x_dtype), None, None


def head_seed(run_seed: int, head_id: str) -> int:
    """A head's init seed: distinct per head, and reproducible from the run seed and the head's id alone."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{head_id}".encode()).digest()[:8], "little") >> 1


def init_lora_a(rank: int, in_features: int, seed: int, mode: str) -> Tensor:
    """Semi-orthogonal A (orthonormal rows) so that different heads start in different subspaces."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, in_features)
    nn.init.orthogonal_(a, generator=gen)
    gain = {"sqrt_in_over_r": math.sqrt(in_features / rank), "sqrt_r_over_in": math.sqrt(rank / in_features)}
    return a * gain.get(mode, 1.0)


class LoRALinear(nn.Module):
    """`nn.Linear` with a frozen base weight and LoRA heads; run per head under vmap.

    Every tensor but `weight` carries a leading head dimension. With `folded`, the head's forward uses its local
    copy W - s V (design notes §1) and runs the low-rank path once; otherwise it runs W x + s (B A x - V x).
    The names `weight` and `bias` are timm's, so a merged state dict loads into the unconverted model.
    With `base_dtype` bf16 or int8, `weight` is stored in that dtype (int8 with the per-row `weight_scale`) and
    dequantized for each forward; the fp32 original is kept by `LTEModel`, off the device.
    """

    def __init__(self, linear: nn.Linear, heads: int, rank: int, scale: float, fold: bool,
                 base_dtype: BaseDType = "fp32"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.scale, self.merged_view, self.base_dtype = rank, scale, False, base_dtype
        weight, weight_scale = quantize_base(linear.weight.detach(), base_dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)  # None (no buffer) unless int8
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone().unsqueeze(0).repeat(heads, 1))
        self.lora_A = nn.Parameter(torch.zeros(heads, rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(heads, self.out_features, rank))
        self.register_buffer("v_A", torch.zeros(heads, rank, self.in_features))
        self.register_buffer("v_B", torch.zeros(heads, self.out_features, rank))
        self.register_buffer("folded", self.dense_weight().unsqueeze(0).repeat(heads, 1, 1) if fold else None)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W in `dtype`; for a low-precision base a temporary, so only the small stored copy stays resident."""
        return dequantize_base(self.weight, self.weight_scale, dtype)

    @torch.no_grad()
    def load_weight(self, w: Tensor) -> None:
        """Set W from the full-precision base `w` (stored as is in fp32, else quantized where `w` lives)."""
        if self.base_dtype == "fp32":
            self.weight.copy_(w)
            return
        stored, weight_scale = quantize_base(w, self.base_dtype)
        self.weight.copy_(stored)
        if weight_scale is not None:
            self.weight_scale.copy_(weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_view:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        if self.folded is not None:
            y = F.linear(x, self.folded, self.bias)
        elif self.weight.dtype == x.dtype:  # an fp32 base
            y = F.linear(x, self.weight, self.bias)
        else:  # a low-precision base, dequantized per call
            y = _LowPrecisionLinear.apply(x, self.weight, self.weight_scale)
            y = y if self.bias is None else y + self.bias
        # The scale multiplies B (out x r), the smallest tensor on the path, rather than the activations: one small
        # elementwise op instead of one per output element, forward and backward (benchmarks/compute.py).
        y = y + F.linear(F.linear(x, self.lora_A), self.lora_B * self.scale)
        if self.folded is None:
            y = y - F.linear(F.linear(x, self.v_A), self.v_B * self.scale)
        return y

    def refold(self) -> None:
        if self.folded is not None:
            self.folded.copy_(self.dense_weight() - self.scale * torch.bmm(self.v_B, self.v_A))


@dataclass(frozen=True)
class Snapshot:
    """One head's contribution frozen at the end of its round, so that the head can go on training while the round
    is in flight (pipelined rounds, design notes §5) and the commit still accounts for exactly these values.

    `factors` are (A, B) per converted layer as the base will account for them: the live factors in the simulator,
    the decoded wire bytes on a network peer (replace them with `dataclasses.replace`). `prev_factors` is V at the
    snapshot, which no training changes; `replicas` are the head's replica values, likewise as sent.
    """

    head_id: str
    samples: float
    factors: Mapping[str, Factors]
    prev_factors: Mapping[str, Factors]
    replicas: Mapping[str, Tensor]

    def contribution(self) -> HeadContribution:
        """What this snapshot brings to a merge: B A - V and the replica values, weighted by `samples`."""
        return HeadContribution(self.head_id, self.samples, self.factors, self.replicas, self.prev_factors)


def _turn_off_fused_attention(model: nn.Module) -> None:
    # vmap has no batching rule for the fused CPU attention kernel and falls back to a slow per-head loop;
    # timm's explicit attention path is the same math and batches well.
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


class LTEModel(nn.Module):
    """N LoRA heads over one frozen base. `forward` in train mode returns per-head logits (N, B/N, ...).

    In eval mode the model is the merged base (what a merge with equal weights would give now), so evaluating it is
    evaluating the checkpoint users download.

    `base_dtype` bf16 or int8 (a low-memory peer): the converted layers' frozen weights are held in that dtype on
    the training device, and the authoritative fp32 copy of them (`master`) in host memory. Merges and hashes only
    ever read the master (`base_state_dict`, `apply_merge`); `load_base` writes it and re-derives the device copy.
    """

    def __init__(self, model: nn.Module, spec: LTESpec, head_ids: Sequence[str], run_seed: int,
                 rank: int | None = None, scale: float | None = None, base_dtype: BaseDType = "fp32"):
        super().__init__()
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ConfigError("model: BatchNorm running statistics cannot be split across heads; use a model without BatchNorm")
        if base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base dtype {base_dtype!r} is not one of {', '.join(BASE_DTYPES)}")
        self.base_dtype = base_dtype
        # A plain dict, not buffers: `.to(device)` must leave it in host memory.
        self.master: dict[str, Tensor] | None = None if base_dtype == "fp32" else {}
        self.spec, self.head_ids, self.run_seed = spec, list(head_ids), run_seed
        self.heads = len(self.head_ids)
        self.rank = rank or spec.rank
        self.scale = spec.scale if scale is None else scale
        self.state_keys = list(model.state_dict().keys())
        self.net = model
        _turn_off_fused_attention(self.net)
        self.layers: dict[str, LoRALinear] = {}
        self._convert()
        self._per_head = {n for n, _ in self.net.named_parameters()} | {
            f"{name}.{b}" for name, layer in self.layers.items() for b in ("v_A", "v_B", "folded")
            if getattr(layer, b) is not None}
        self._merged_cache: dict[str, Tensor] | None = None
        # The outer step's momentum (lte.outer_momentum; float64, keyed like the state dict), in host memory like the
        # master: one model's worth, needed only at a merge.
        self.momentum: dict[str, Tensor] = {}
        # The base's replica values. Synchronous LTE could read them off any head right after a merge; with pipelined
        # rounds every head has moved on by then, and a head left out of a commit keeps its offset from these.
        # Non-persistent buffers: they follow `.to(device)` and stay out of state_dict().
        self._base_replica_keys: dict[str, str] = {}
        for n, p in self.replica_parameters():
            self._base_replica_keys[n] = "base_replica__" + n.replace(".", "__")
            self.register_buffer(self._base_replica_keys[n], p[0].detach().clone(), persistent=False)
        with torch.no_grad():
            for name, layer in self.layers.items():
                for h, hid in enumerate(self.head_ids):
                    # The seed covers the layer name too, so the layers of one head are not initialised alike.
                    seed = head_seed(run_seed, f"{hid}/{name}")
                    layer.lora_A[h] = init_lora_a(layer.rank, layer.in_features, seed, spec.a_init)

    def _convert(self) -> None:
        targets = [(n, m) for n, m in self.net.named_modules()
                   if isinstance(m, nn.Linear) and not any(fnmatch.fnmatch(n, p) for p in self.spec.dense_modules)]
        if not targets:
            raise ConfigError("lte: the model has no nn.Linear layer to convert")
        for name, lin in targets:
            if self.rank > min(lin.in_features, lin.out_features):
                raise ConfigError(
                    f"lte.rank={self.rank} is larger than layer {name} ({lin.out_features}x{lin.in_features}); "
                    f"use a rank <= {min(lin.in_features, lin.out_features)} or list the layer in lte.dense_modules")
        # The folded copy W - sV is a dense fp32 matrix per head, as large as the fp32 base: a peer that asks for a
        # low-precision base wants that memory back, so it runs unfolded (the same math; merges never read it).
        fold = self.spec.fold and self.master is None
        for name, lin in targets:
            parent, _, child = name.rpartition(".")
            layer = LoRALinear(lin, self.heads, self.rank, self.scale, fold, self.base_dtype)
            if self.master is not None:
                self.master[f"{name}.weight"] = lin.weight.detach().to("cpu", torch.float32, copy=True)
            setattr(self.net.get_submodule(parent) if parent else self.net, child, layer)
            self.layers[name] = layer
        # Every remaining trainable parameter becomes a replica: one copy per head.
        for mod_name, mod in self.net.named_modules():
            if isinstance(mod, LoRALinear):
                continue
            for pname, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, pname, nn.Parameter(p.detach().clone().unsqueeze(0).repeat(self.heads, *[1] * p.dim())))
        for p in self.net.parameters():
            p.requires_grad_(True)

    # ----- parameters -------------------------------------------------------------------------------------------
    def factor_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.lora_A
            yield layer.lora_B

    def replica_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.net.named_parameters():
            if not n.endswith((".lora_A", ".lora_B")):
                yield n, p

    # ----- forward ----------------------------------------------------------------------------------------------
    def _split_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        per_head, shared = {}, {}
        for n, t in list(self.net.named_parameters()) + list(self.net.named_buffers()):
            (per_head if n in self._per_head else shared)[n] = t
        return per_head, shared

    def forward(self, x: Tensor, split: bool = True) -> Tensor:
        if not self.training:
            return functional_call(self.net, self.merged_state_dict(), (x,), strict=False)
        per_head, shared = self._split_state()
        if self.heads == 1:
            return functional_call(self.net, {**shared, **{k: v[0] for k, v in per_head.items()}}, (x,)).unsqueeze(0)
        if split:
            if x.shape[0] % self.heads:
                raise ValueError(f"batch of {x.shape[0]} does not split across {self.heads} heads")
            x = x.reshape(self.heads, x.shape[0] // self.heads, *x.shape[1:])

        def one_head(params: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.net, {**shared, **params}, (xi,))

        return vmap(one_head, in_dims=(0, 0 if split else None), randomness="different")(per_head, x)

    def train(self, mode: bool = True) -> "LTEModel":
        super().train(mode)
        self._merged_cache = None
        for layer in self.layers.values():
            layer.merged_view = not mode
        return self

    # ----- merging ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def head_contribution(self, h: int, samples: float = 1.0) -> HeadContribution:
        factors = {n: (l.lora_A[h], l.lora_B[h]) for n, l in self.layers.items()}
        prev = None if self.spec.reset else {n: (l.v_A[h], l.v_B[h]) for n, l in self.layers.items()}
        replicas = {n: p[h] for n, p in self.replica_parameters()}
        return HeadContribution(self.head_ids[h], samples, factors, replicas, prev)

    def contributions(self, samples: Sequence[float] | None = None) -> list[HeadContribution]:
        samples = samples or [1.0] * self.heads
        return [self.head_contribution(h, s) for h, s in enumerate(samples)]

    @torch.no_grad()
    def snapshot(self, h: int, samples: float = 1.0) -> Snapshot:
        """Head h's contribution as it stands now, as copies: training on afterwards does not change it. Its factors
        are what receivers decode in the run's wire format (`lte.wire`), as a network peer's are."""
        if self.spec.reset:
            # Reset zeroes B at a merge, which would also erase the progress made since the snapshot.
            raise ValueError("pipelined rounds need the reset-less rule (lte.reset: false)")
        wire = self.spec.wire
        return Snapshot(
            self.head_ids[h], samples,
            {n: (roundtrip(l.lora_A[h], wire), roundtrip(l.lora_B[h], wire)) for n, l in self.layers.items()},
            {n: (l.v_A[h].clone(), l.v_B[h].clone()) for n, l in self.layers.items()},
            {n: p[h].detach().clone() for n, p in self.replica_parameters()})

    def snapshots(self, samples: Sequence[float] | None = None) -> list[Snapshot]:
        samples = samples or [1.0] * self.heads
        return [self.snapshot(h, s) for h, s in enumerate(samples)]

    def base_replicas(self) -> dict[str, Tensor]:
        """The base's replica values (the last loaded or merged ones), whatever the heads have trained since."""
        return {n: getattr(self, k) for n, k in self._base_replica_keys.items()}

    def _base_weights(self) -> dict[str, Tensor]:
        """The authoritative frozen weights (`<layer>.weight`): the host master when the device copy is low-precision."""
        if self.master is not None:
            return dict(self.master)
        return {f"{n}.weight": l.weight for n, l in self.layers.items()}

    @torch.no_grad()
    def base_state_dict(self) -> dict[str, Tensor]:
        """The shared base as a timm state dict. Replicas are head 0's copy: equal on all heads right after a merge.
        The converted layers' weights are the fp32 master's (in host memory) when the device copy is low-precision."""
        per_head, shared = self._split_state()
        weights = self._base_weights()
        out = {}
        for key in self.state_keys:
            if key in weights:
                out[key] = weights[key].detach().clone()
            else:
                out[key] = per_head[key][0].detach().clone() if key in per_head else shared[key].detach().clone()
        return out

    @torch.no_grad()
    def merged_state_dict(self, samples: Sequence[float] | None = None) -> dict[str, Tensor]:
        """What the base would be after merging all heads now: a plain state dict for the unconverted timm model."""
        if samples is None and self._merged_cache is not None:
            return self._merged_cache
        state = self.base_state_dict()
        update = merge_contributions(self.contributions(samples), self.scale)
        # as the merge would be applied, without moving the momentum
        apply_update(state, self._outer(update, dict(self.momentum)))
        if self.master is not None:  # the master's weights are in host memory; eval runs on the training device
            device = next(iter(self.layers.values())).weight.device
            state = {k: v.to(device) for k, v in state.items()}
        if samples is None and not self.training:
            self._merged_cache = state
        return state

    @torch.no_grad()
    def merge(self, samples: Sequence[float] | None = None) -> MergeUpdate:
        """Merge all N heads into the base (emulation: the network does the same through `apply_merge`)."""
        update = merge_contributions(self.contributions(samples), self.scale)
        self.apply_merge(update)
        return update

    @torch.no_grad()
    def merge_snapshots(self, snapshots: Sequence[Snapshot], denominator: float = 0.0) -> MergeUpdate:
        """Merge the heads of `snapshots` into the base and keep every head's progress since (pipelined rounds).

        Heads without a snapshot here are left out of the merge: see `load_base`. `denominator`: the fixed one of
        the merge weights (`lte.round_samples`, lte/merge.py).
        """
        update = merge_contributions([s.contribution() for s in snapshots], self.scale, denominator,
                                     self.base_replicas())
        self.apply_merge(update, snapshots=snapshots)
        return update

    @torch.no_grad()
    def apply_merge(self, update: MergeUpdate, sent: Mapping[str, Factors] | None = None,
                    snapshots: Sequence[Snapshot] | None = None) -> None:
        """Apply a merged update and move every head to its post-merge state (`load_base` says which).

        `sent` (single-head peers) are the factors as they went over the wire, which is what the base now
        accounts for; with fp16 on the wire they differ slightly from the live factors.
        """
        state = self._base_weights()
        state.update(self.base_replicas())
        apply_update(state, self._outer(update, self.momentum))
        self.load_base(state, sent, snapshots)

    def _outer(self, update: MergeUpdate, momentum: dict[str, Tensor]) -> MergeUpdate:
        """`update` through the run's outer step (lte/merge.py `outer_step`; itself when there is none)."""
        return outer_step(update, momentum, self.base_replicas(), self.spec.outer_lr, self.spec.outer_momentum)

    @torch.no_grad()
    def load_base(self, state: Mapping[str, Tensor], sent: Mapping[str, Factors] | None = None,
                  snapshots: Sequence[Snapshot] | None = None) -> None:
        """Set the base (weights and replicas) from a state dict, and set what each head has left to contribute.

        `snapshots` None (synchronous LTE, or a resync): every head's unmerged progress is dropped. V <- B A (or
        V <- `sent`, the factors a single-head peer sent) makes each head's pending delta zero while keeping A, B and
        the optimizer state, which the paper found better than resetting them; replicas <- the base's.

        `snapshots` given, even empty (pipelined rounds, design notes §5): every head keeps exactly the progress it
        has not contributed yet, so nothing it learned while the round was in flight is lost or counted twice.
        - A head with a snapshot here was merged from it: V <- the snapshot's factors, and each replica <- new base
          value + (live value - snapshot value). Its effective weights W + s(B A - V) and replicas are the new base
          plus exactly its progress since the snapshot, which goes into its next contribution.
        - A head without one was left out: V stays, and each replica <- new base value + (live value - old base
          value). Its next contribution B A - V then carries both rounds' progress (its samples should too).
        Both hold only if every snapshot merged was taken against the base being replaced here (one base version
        per round: apply commit k before taking snapshot k+1).
        """
        if sent is not None and self.heads != 1:
            raise ValueError("`sent` factors are for single-head peers")
        if snapshots is not None and (sent is not None or self.spec.reset):
            raise ValueError("pipelined bookkeeping takes the sent factors from the snapshots, and needs lte.reset: false")
        merged = {s.head_id: s for s in snapshots or ()}
        if unknown := set(merged) - set(self.head_ids):
            raise ValueError(f"snapshots of heads this model does not hold: {sorted(unknown)}")
        for n, layer in self.layers.items():
            w = state[f"{n}.weight"]
            if self.master is not None:  # merges apply to the master; the device copy is always derived from it
                w = self.master[f"{n}.weight"]
                w.copy_(state[f"{n}.weight"])
            layer.load_weight(w)
            if self.spec.reset:
                layer.lora_B.zero_()
                layer.v_A.zero_()
                layer.v_B.zero_()
            elif snapshots is not None:
                for h, hid in enumerate(self.head_ids):
                    if hid in merged:  # a left-out head keeps its V: its delta still holds the unmerged round
                        layer.v_A[h].copy_(merged[hid].factors[n][0])
                        layer.v_B[h].copy_(merged[hid].factors[n][1])
            elif sent is not None:
                layer.v_A[0].copy_(sent[n][0])
                layer.v_B[0].copy_(sent[n][1])
            else:
                layer.v_A.copy_(layer.lora_A)
                layer.v_B.copy_(layer.lora_B)
            layer.refold()
        for n, p in self.replica_parameters():
            new, old = state[n].to(p.device, p.dtype), self.base_replicas()[n]
            if snapshots is None:
                p.copy_(new.unsqueeze(0).expand_as(p))
            else:
                for h, hid in enumerate(self.head_ids):
                    ref = merged[hid].replicas[n].to(p.device, p.dtype) if hid in merged else old
                    p[h].copy_(new + (p[h] - ref))
            old.copy_(new)
        self._merged_cache = None


def prepare_model(model: nn.Module, spec: LTESpec, run_seed: int = 0, head_ids: Sequence[str] | None = None,
                  base_dtype: BaseDType = "fp32") -> LTEModel:
    """Convert any nn.Module (tested on timm ViTs) into an LTE model with `spec.heads` heads."""
    ids = list(head_ids) if head_ids is not None else [f"head{h:03d}" for h in range(spec.heads)]
    return LTEModel(model, spec, ids, run_seed, base_dtype=base_dtype)


def mhlora_model(model: nn.Module, spec: LTESpec, run_seed: int = 0, base_dtype: BaseDType = "fp32") -> LTEModel:
    """Multi-head LoRA baseline: W + (s/N) sum_n B_n A_n on one model, never merged.

    N rank-r heads summed are exactly one rank-N*r LoRA with scale s/N whose A is the heads' A stacked, so it is
    built as that, with the same per-head A init as LTE (which makes the T = 1 equivalence testable).
    """
    n, r = spec.heads, spec.rank
    one = spec.model_copy(update={"heads": 1, "fold": False})
    m = LTEModel(model, one, ["mhlora"], run_seed, rank=n * r, scale=spec.scale / n, base_dtype=base_dtype)
    with torch.no_grad():
        for name, layer in m.layers.items():
            blocks = [init_lora_a(r, layer.in_features, head_seed(run_seed, f"head{h:03d}/{name}"), spec.a_init)
                      for h in range(n)]
            layer.lora_A[0].copy_(torch.cat(blocks, 0))
    return m
