"""Scoring contributions by what they do to the loss: the check for updates that pass every format and norm check
of lte/validate.py and still poison the run (a negated update scaled to just under the norm bound, honest training
on wrong labels, random factors of an honest norm).

The coordinator keeps a small private scoring set, drawn from the training split with a seed that never leaves its
checkpoint directory (so it is disjoint from the test split the status page reports, and peers cannot tune against
it). A member's score is the loss improvement its update brings **alone, at the weight the merge gives it**:

    score_n = L(base) - L(base + w_n s (B_n A_n - V_n), base_replicas + w_n (replicas_n - base_replicas))

with w_n its share of the samples of the round's scored members. Alone rather than leave-one-out: it costs one
member's dense delta and one forward pass over the scoring set per member (leave-one-out needs as many forward passes
plus the merged update, and its signal for one member is the difference of two nearly equal losses), and it judges a
member on its own, whoever else came: a sign-flipped or wrong-label update makes the loss worse by itself. At its
merge weight rather than at full weight: one honest head applied at weight 1 overshoots (on the test model, honest
heads alone made the loss worse in a third of the rounds, so no rule could tell them from a free rider), while at
weight w_n it is the step the merge would take in its direction, and honest steps improved the loss in every round
after the first few (docs/reliability.md).

The rule has the shape of the norm bound: a robust statistic over this round's scores and the accepted scores of
the last few rounds. The floor (`score_floor`) is `SCORE_FRACTION` times the pool's median improvement: the median
stays an honest value while honest members are at least half of the pool, the history covers rounds of one or two
members, and the fraction makes the floor follow how much honest updates improve the loss at this point of the run
(a lot early, little late). A member is rejected (`score_outlier`, `score_problem`) when

- this round's score is below the floor by more than `SCORE_TOLERANCE`, or by more than `SCORE_SPREAD` robust
  standard deviations of the pool when they are wider (the first rounds of a run): an update that harms
  (sign-flipped, trained on wrong labels) is caught in the round it is sent, while an honest update's worst round
  (its improvement varies by about 0.01 nats around the median late in a run) is not;
- or the mean of its last `SCORE_RECENT` scores is below the floor by more than `SCORE_MEAN_TOLERANCE` (or
  `SCORE_MEAN_SPREAD` deviations of such a mean, when wider: late in a run honest scores are small and noisy): an update
  that brings nothing (a free rider's random factors, an empty update) scores about 0 round after round, while
  honest members' dips do not last. This applies once the floor is above that tolerance (the run improves
  measurably), since a free rider's mean of about 0 is only below the floor from then on; before that, and once a
  run has converged, the mean is held to the one-round tolerance only (a member that harmed recently stays out).

A median that is itself not positive (the first rounds of a run from scratch, where nothing improves measurably)
gives a floor below it, so only what is clearly worse is rejected. In a run's first `SCORE_WARMUP_ROUNDS` rounds the
floor is not used at all: honest updates then move the loss by a few hundredths of a nat either way (an honest member
of a 2-peer run scored -0.033 in round 2 and -0.016 in round 3, against floors of 0.001, and CI saw them rejected), so
only clear harm is rejected there, a score below `-SCORE_HARM`. What it cannot do: in those first rounds a free
rider, or a harm smaller than that, is not told apart from honest members.

Only the coordinator scores: the decision travels in its signed commit (the rejected members with their reason, and
every member's score), so peers agree on the merge without the scoring set.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from lte.merge import HeadContribution, apply_update, merge_contributions

SCORE_SIZE = 256  # examples in the scoring set (0: no scoring)
SCORE_FRACTION = 0.2  # the floor: this fraction of the pool's median improvement ...
SCORE_TOLERANCE = 0.02  # ... minus this (nats of mean cross-entropy) for one round's score,
SCORE_SPREAD = 2.0  # ... or minus this many robust standard deviations of the pool, if that is more,
SCORE_MEAN_TOLERANCE = 2e-3  # ... or minus this (or SCORE_MEAN_SPREAD deviations of a mean of SCORE_RECENT, if
# more) for the mean of a member's last SCORE_RECENT scores
SCORE_MEAN_SPREAD = 1.0
SCORE_RECENT = 3  # scores per member in that mean (it applies once a member has SCORE_RECENT_MIN of them)
SCORE_RECENT_MIN = 2
SCORE_HISTORY_ROUNDS = 4  # rounds of accepted scores that join each round's pool (improvements shrink as a run goes)
SCORE_WARMUP_ROUNDS = 6  # a run's first rounds, where only a score below -SCORE_HARM is rejected
SCORE_HARM = 0.1  # nats: ten times the improvement an honest update loses in its worst early round


def scoring_indices(n_train: int, size: int, secret: bytes) -> list[int]:
    """`size` distinct indices into the training split, chosen by a seed derived from `secret` (private to the
    coordinator): the same set after a restart, unknown to peers."""
    if size <= 0:
        return []
    seed = int.from_bytes(hashlib.sha256(b"lte-scoring-set" + secret).digest()[:8], "little") >> 1
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:min(size, n_train)].tolist())


class Scorer:
    """Loss of a model state on the scoring set, and the score of one contribution against a base."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, scale: float) -> None:
        self.model, self.x, self.y, self.scale = model, x, y, scale
        self._base_loss: tuple[str, float] | None = None

    @torch.no_grad()
    def loss(self, state: Mapping[str, Tensor]) -> float:
        self.model.load_state_dict(dict(state), strict=True)
        self.model.eval()
        return float(nn.functional.cross_entropy(self.model(self.x), self.y))

    def base_loss(self, base: Mapping[str, Tensor], base_hash: str) -> float:
        """L(base), computed once per base version."""
        if self._base_loss is None or self._base_loss[0] != base_hash:
            self._base_loss = (base_hash, self.loss(base))
        return self._base_loss[1]

    def score(self, base: Mapping[str, Tensor], base_hash: str, c: HeadContribution, weight: float) -> float:
        """L(base) - L(base + weight * this contribution's update): positive when the update helps. `weight` is
        its share of the round's samples, the weight the merge would give it. A non-finite loss (an update that
        blows the model up) scores -inf."""
        update = merge_contributions([c], self.scale * weight)  # deltas: scale * weight * (B A - V)
        update.replicas = {name: base[name].to(torch.float64) + weight * (v - base[name].to(torch.float64))
                           for name, v in update.replicas.items()}
        state = dict(base)
        apply_update(state, update)
        s = self.base_loss(base, base_hash) - self.loss(state)
        return s if math.isfinite(s) else float("-inf")


class Floor(NamedTuple):
    """A round's floor and its tolerances (see the module docstring)."""

    value: float
    tolerance: float  # for one round's score
    mean_tolerance: float  # for the mean of a member's last SCORE_RECENT scores


def score_floor(scores: Iterable[float], history: Iterable[float] = (), fraction: float = SCORE_FRACTION,
                spread: float = SCORE_SPREAD, tolerance: float = SCORE_TOLERANCE,
                mean_tolerance: float = SCORE_MEAN_TOLERANCE, mean_spread: float = SCORE_MEAN_SPREAD,
                recent: int = SCORE_RECENT) -> Floor:
    """The floor is what a typical honest update improves, scaled down: `fraction` times the median of this round's
    scores and the accepted ones of the last rounds, or (2 - fraction) times a median that is not positive. The
    one-round tolerance is `tolerance`, or `spread` robust standard deviations (1.4826 x the median absolute
    deviation) of that pool when they are wider; the tolerance of a mean of `recent` scores is `mean_tolerance`, or
    `mean_spread` deviations of such a mean (sigma / sqrt(recent)) when wider. (-inf, 0, 0) with nothing to compare."""
    pool = [s for s in (*scores, *history) if math.isfinite(s)]
    if not pool:
        return Floor(float("-inf"), 0.0, 0.0)
    m = statistics.median(pool)
    sigma = 1.4826 * statistics.median(abs(s - m) for s in pool)
    return Floor(fraction * m if m > 0 else (2.0 - fraction) * m, max(tolerance, spread * sigma),
                 max(mean_tolerance, mean_spread * sigma / math.sqrt(recent)))


def score_problem(score: float, recent: Sequence[float], floor: Floor, recent_min: int = SCORE_RECENT_MIN,
                  warming_up: bool = False) -> str | None:
    """Why a member with this round's `score` and its `recent` scores (this one last) is rejected, or None.
    `warming_up` (a run's first SCORE_WARMUP_ROUNDS rounds): only a score below -SCORE_HARM is.

    Two tests, because the two kinds of attack differ in size: an update that harms (sign-flipped, wrong labels)
    falls far below the floor in a single round, while one that brings nothing (random factors, an empty update)
    is only a little below it, as deep as an honest update's noise in one round but not in the mean of three. The
    mean is held to the one-round tolerance always (a member that harmed in its last rounds stays out while its
    mean shows it, whatever it sends now) and to the finer one once the floor is above it: before, honest members'
    means are no better than a free rider's 0."""
    if warming_up:
        return f"loss improvement {score:.4g} < {-SCORE_HARM:.4g} (warm-up)" if score < -SCORE_HARM else None
    if score < floor.value - floor.tolerance:
        return f"loss improvement {score:.4g} < floor {floor.value:.4g} - {floor.tolerance:.4g}"
    if len(recent) < recent_min:
        return None
    mean = statistics.fmean(recent)
    for tol in (floor.tolerance, floor.mean_tolerance if floor.value > floor.mean_tolerance else None):
        if tol is not None and mean < floor.value - tol:
            return (f"mean loss improvement of its last {len(recent)} scored rounds {mean:.4g} < floor "
                    f"{floor.value:.4g} - {tol:.4g}")
    return None
