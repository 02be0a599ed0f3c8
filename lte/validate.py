"""Validation of contributions before they are merged: what a public run needs against broken GPUs, stale software
and attackers. A contribution that fails any check is left out of the merge for everyone.

Who decides, and why every participant agrees: the coordinator screens each round's members with these checks and
publishes the result in its signed commit (the accepted members, each rejected one with its reason, and the norm
bound). Every peer merges exactly the accepted set and re-checks what it fetched with the same code: blobs are
content-addressed, so it checks the very bytes the coordinator checked. A peer that finds a committed contribution
invalid refuses the commit and resyncs, so a wrong commit can never silently make bases differ.

The checks, cheapest first:
- the digest: spec hash, round number, samples (`digest_problem`);
- the bytes: the blob hash (in the transport), then structure, shapes, dtypes and finiteness of every tensor
  (`check_tensors`);
- the size of the update: the contribution's update norm must be at most `NORM_FACTOR` times the lower median of
  this round's norms together with the accepted norms of the last few rounds (`norm_bound`). The lower median
  stays an honest value while honest contributions are at least half of that pool, so one scaled-up delta (or a
  minority of them) is rejected however large it is; keeping the last rounds in the pool covers rounds with only
  one or two peers. It rejects rather than clips: a delta 10x too large is broken or hostile, and a clipped copy
  of it would still carry its direction into the base. Its cost is one Gram product per layer
  (`O(r^2 (in + out))`, against the merge's `O(r in out)`).
- the weight: claimed samples are capped at `SAMPLES_FACTOR` times the lower median of claims (same pool), so a
  peer cannot outweigh everyone by claiming a huge count; the capped value is what the commit records and every
  participant merges with.
- what the update does to the loss: scored by the coordinator alone on its private scoring set (lte/score.py,
  reason `score_outlier`); peers follow the commit's decision.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lte.merge import HeadContribution

NORM_FACTOR = 10.0
SAMPLES_FACTOR = 4.0
HISTORY_ROUNDS = 8  # rounds of accepted norms and samples that join each round's pool

# Every reason a contribution can be left out for (metric label values; see docs/reliability.md).
REASONS = ("spec_mismatch", "stale_round", "no_samples", "fetch_failed", "blob_hash_mismatch", "blob_truncated",
           "malformed", "wrong_dtype", "nonfinite", "norm_outlier", "unauthorized", "score_outlier")


class Rejected(ValueError):
    """A contribution is invalid: `reason` is one of REASONS, the message says what exactly."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def digest_problem(spec: str, round_claimed: int, samples: int, spec_hash: str, round_id: int) -> str | None:
    """Why an announced contribution cannot be merged before fetching anything, or None."""
    if spec != spec_hash:
        return "spec_mismatch"
    if round_claimed != round_id:
        return "stale_round"
    if samples <= 0:
        return "no_samples"
    return None


def check_tensors(name: str, tensors: Sequence[Tensor], shapes: Sequence[tuple[int, ...]],
                  dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The tensors of one blob, checked against the run's layout; raises Rejected. Every float blob of the
    protocol decodes to float32 (fp16 on the wire included), so any other dtype is a foreign sender."""
    if len(tensors) != len(shapes):
        raise Rejected("malformed", f"{name} has {len(tensors)} tensors, the run's layout needs {len(shapes)}")
    for i, (t, shape) in enumerate(zip(tensors, shapes)):
        if tuple(t.shape) != tuple(shape):
            raise Rejected("malformed", f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype:
            raise Rejected("wrong_dtype", f"{name}[{i}] is {t.dtype}, expected {dtype}")
        if not bool(torch.isfinite(t).all()):
            raise Rejected("nonfinite", f"{name}[{i}] holds NaN or Inf")
    return list(tensors)


def update_norm(c: HeadContribution, base: Mapping[str, Tensor]) -> float:
    """Frobenius norm of everything the contribution changes, in float64: sum over layers of ||B A - B' A'||^2
    (from the factors' Gram matrices, never forming the out x in product) and, for replicas, of their distance to
    the current base. Covers the layers the contribution holds: a peer that takes some layers over the dense path
    checks the part it fetched, which can only be smaller than the whole."""
    total = torch.zeros((), dtype=torch.float64)
    for layer in sorted(set(c.factors) | set(c.deltas)):
        if layer in c.deltas:
            total += c.deltas[layer].to(torch.float64).pow(2).sum()
            continue
        a, b = c.factors[layer]
        if c.prev_factors is not None:  # B A - B' A' = [B, -B'] [A; A']
            pa, pb = c.prev_factors[layer]
            a, b = torch.cat([a, pa], 0), torch.cat([b, -pb], 1)
        a, b = a.to(torch.float64), b.to(torch.float64)
        total += ((b.T @ b) * (a @ a.T)).sum()
    for name in sorted(c.replicas):
        total += (c.replicas[name].to(torch.float64) - base[name].to(torch.float64)).pow(2).sum()
    return float(total.clamp_min(0.0).sqrt())


def norm_bound(norms: Iterable[float], history: Iterable[float] = (), factor: float = NORM_FACTOR) -> float:
    """The largest update norm accepted this round (see the module docstring); inf with nothing to compare."""
    pool = [*norms, *history]
    return factor * statistics.median_low(pool) if pool else float("inf")


def samples_cap(claims: Iterable[int], history: Iterable[int] = (), factor: float = SAMPLES_FACTOR) -> int:
    """The most samples a contribution is weighted with this round."""
    pool = [int(n) for n in (*claims, *history) if int(n) > 0]
    return max(1, int(factor * statistics.median_low(pool))) if pool else 1
