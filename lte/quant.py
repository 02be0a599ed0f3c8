"""Wire precisions of LoRA factors: what a receiver decodes from what a head sends (design notes §6).

A round's update is merged from the *decoded* factors, and the sender's V becomes those decoded values, so a lossy
code never makes bases diverge and its error is not lost: B A - V still holds it, and it goes out again in the next
round (error feedback without a buffer). The simulator applies the same functions to its snapshots, so a network
run and its replay see the same values bit for bit.

int8 is blockwise absmax: the flattened tensor in blocks of `INT8_BLOCK` values, each block coded as
round(x / s) with s = max|x| / 127 (one fp32 scale per block). Blocks, not rows: B is (out x rank) and a per-row
scale would cost 4 bytes per `rank` bytes; a block costs 4 per 64 (1.06 bytes per value, 3.8x fewer than fp32).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

WireFormat = Literal["raw", "fp16", "int8"]
WIRE_FORMATS: tuple[str, ...] = ("raw", "fp16", "int8")
INT8_BLOCK = 64
FP16_MIN, FP16_MAX = torch.finfo(torch.float16).min, torch.finfo(torch.float16).max


def n_blocks(numel: int) -> int:
    return -(-numel // INT8_BLOCK)


@torch.no_grad()
def int8_encode(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scales) of a float tensor: int8 codes of x's shape and one float32 scale per block."""
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    pad = n_blocks(flat.numel()) * INT8_BLOCK - flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, INT8_BLOCK)
    scales = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block codes as zeros
    codes = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:flat.numel()].view(x.shape).contiguous(), scales.contiguous()


@torch.no_grad()
def int8_decode(codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 values a receiver takes from (codes, scales); ValueError when they do not fit each other.
    A non-finite scale (a diverged head) decodes to non-finite values, which validation rejects as for fp32."""
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.dim() != 1:
        raise ValueError(f"int8 wire: codes {codes.dtype} and scales {scales.dtype}/{scales.dim()}-d do not form a tensor")
    numel = codes.numel()
    if scales.numel() != n_blocks(numel):
        raise ValueError(f"int8 wire: {scales.numel()} scales for {numel} values (blocks of {INT8_BLOCK})")
    flat = torch.nn.functional.pad(codes.reshape(-1).to(torch.float32), (0, scales.numel() * INT8_BLOCK - numel))
    return (flat.view(-1, INT8_BLOCK) * scales[:, None]).reshape(-1)[:numel].view(codes.shape).contiguous()


@torch.no_grad()
def roundtrip(x: Tensor, wire: str) -> Tensor:
    """What a receiver decodes when `x` (float32) is sent in `wire`, as float32 on x's device."""
    if wire == "raw":
        return x.detach().clone()
    if wire == "fp16":
        # as hivemind's FLOAT16 codec does it: clamped to fp16's range first
        return x.detach().to(torch.float32).clamp(FP16_MIN, FP16_MAX).to(torch.float16).to(torch.float32)
    if wire == "int8":
        return int8_decode(*int8_encode(x)).to(x.device)
    raise ValueError(f"unknown wire format {wire!r} (one of {', '.join(WIRE_FORMATS)})")
