"""Loss scoring of contributions (lte/score.py): the rule and the score on real trained heads, then a real run with
3 honest peers and one that poisons its contribution in ways that pass every format and norm check."""
from __future__ import annotations

import copy

import pytest
import torch

from lte.config import load_spec
from lte.data import batches, load_datasets, shard
from lte.merge import HeadContribution
from lte.models import create_base_model
from lte.score import (SCORE_FRACTION, SCORE_HARM, SCORE_MEAN_TOLERANCE, SCORE_TOLERANCE, SCORE_WARMUP_ROUNDS, Scorer,
                       score_floor, score_problem, scoring_indices)
from lte.train import HeadTrainer
from lte.wire import Layout, contribution, pack_factors, pack_replicas
from tests import poisoning
from tests.adversary import POISON, SIGNFLIP
from tests.netproc import write_spec
from tests.webcheck import get_json, scrape, status_base_url


def test_the_scoring_set_is_private_stable_and_sized():
    a = scoring_indices(1400, 256, b"secret")
    assert a == scoring_indices(1400, 256, b"secret")  # the same set after a restart
    assert len(a) == len(set(a)) == 256 and all(0 <= i < 1400 for i in a)
    assert a != scoring_indices(1400, 256, b"another secret")  # nobody without the secret knows it
    assert scoring_indices(100, 256, b"s") == list(range(100)) and scoring_indices(1400, 0, b"s") == []


def test_the_floor_is_a_fraction_of_the_median_improvement():
    honest = [0.05, 0.04, 0.06, 0.045, 0.055]
    floor, tolerance, mean_tolerance = score_floor([*honest, -0.3])  # one attacker cannot move the median much
    assert 0.0 < floor < min(honest) and floor == pytest.approx(SCORE_FRACTION * 0.05, rel=0.2)
    assert SCORE_TOLERANCE <= tolerance < 0.03  # honest scores close together: about the fixed tolerance
    assert SCORE_MEAN_TOLERANCE <= mean_tolerance < tolerance
    # with one member, the accepted scores of the last rounds keep the floor honest
    assert score_floor([-0.3], history=honest)[0] > 0
    assert score_floor([-0.01, -0.02, -0.03])[0] == pytest.approx((2 - SCORE_FRACTION) * -0.02)
    # widely spread scores (a run's first rounds): the tolerance widens with them
    assert score_floor([0.1, -0.1, 0.0, 0.05, -0.05])[1] == pytest.approx(2 * 1.4826 * 0.05)
    assert score_floor([]) == (float("-inf"), 0.0, 0.0) and score_floor([float("-inf")])[0] == float("-inf")


def test_harm_is_rejected_in_one_round_and_nothing_in_the_mean_of_a_few():
    floor = score_floor([0.05, 0.04, 0.06])
    assert score_problem(0.045, [0.05, 0.045], floor) is None
    assert "floor" in score_problem(-0.3, [-0.3], floor)  # harm: at once, even as a member's first score
    assert score_problem(float("-inf"), [float("-inf")], floor) is not None
    # one honest dip below the floor is noise; a free rider's scores stay there
    assert score_problem(-0.005, [0.04, 0.05, -0.005], floor) is None
    assert "mean" in score_problem(0.0, [0.001, -0.002, 0.0], floor)
    assert score_problem(0.0, [0.0], floor) is None  # one score is not yet a mean
    assert "mean" in score_problem(0.0, [-1.5, 0.0], floor)  # who harmed in its last rounds stays out a while
    # early in a run nothing improves measurably: honest noise around zero is not rejected
    early = score_floor([0.001, -0.003, 0.002])
    assert all(score_problem(s, [s, s, s], early) is None for s in (0.001, -0.003, 0.002, 0.0))
    assert score_problem(-SCORE_TOLERANCE - 0.05, [0.0], early) is not None
    # a run's first rounds: an honest dip far below a floor that is not yet meaningful passes, clear harm does not
    late = score_floor([0.06, 0.05, 0.07, 0.06])
    assert score_problem(-0.033, [-0.033], late) is not None
    assert score_problem(-0.033, [-0.033], late, warming_up=True) is None
    assert "warm-up" in score_problem(-SCORE_HARM - 0.01, [], late, warming_up=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Base, scorer and three honest heads trained 40 steps on their shards of digits (the test model). The base is
    trained first (fully, 150 steps): from an untrained model nothing improves measurably in 40 steps."""
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec")))
    torch.manual_seed(spec.seed)
    model = create_base_model(spec.model)
    train = load_datasets(spec.data, spec.seed)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for xb, yb in zip(range(150), batches(train, 64, 0)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(yb[0]), yb[1]).backward()
        opt.step()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    heads = []
    for i in range(3):
        trainer = HeadTrainer(spec, copy.deepcopy(model), f"p{i}", shard(train, i, 4, spec.seed), 16)
        n, _ = trainer.train_steps(40)
        layout = Layout.of(trainer.model)
        heads.append(contribution(layout, f"p{i}", n, pack_factors(trainer.model, layout),
                                  pack_replicas(trainer.model, layout), None))
    x, y = train.tensors
    idx = scoring_indices(len(train), 256, b"test")
    return base, Scorer(copy.deepcopy(model), x[idx], y[idx], spec.lte.scale), heads


def test_honest_updates_improve_the_loss_and_poisoned_ones_fall_below_the_floor(trained):
    base, scorer, heads = trained
    honest = [scorer.score(base, "b", c, 0.25) for c in heads]
    assert min(honest) > 0, honest
    c = heads[0]
    flipped = HeadContribution("adv", c.samples, {l: (a, SIGNFLIP * b) for l, (a, b) in c.factors.items()},
                               {n: base[n] + SIGNFLIP * (v - base[n]) for n, v in c.replicas.items()})
    empty = HeadContribution("adv", c.samples, {l: (a, torch.zeros_like(b)) for l, (a, b) in c.factors.items()},
                             {n: base[n].clone() for n in c.replicas})
    g = torch.Generator().manual_seed(0)
    noise = HeadContribution("adv", c.samples, {l: (a, torch.randn(b.shape, generator=g) * b.norm() / b.numel() ** 0.5)
                                                for l, (a, b) in c.factors.items()},
                             {n: base[n].clone() for n in c.replicas})
    bad = {name: scorer.score(base, "b", adv, 0.25) for name, adv in
           (("signflip", flipped), ("empty", empty), ("free rider", noise))}
    assert bad["empty"] == 0.0  # the base itself
    floor = score_floor([*honest, *bad.values()])
    assert score_problem(bad["signflip"], [bad["signflip"]], floor) is not None, (bad, honest)
    assert all(score_problem(s, [s, s], floor) is None for s in honest), (bad, honest)
    # random factors bring less than the typical honest update (whether that is below the floor depends on how far
    # honest updates are above the tolerance: the real run below measures it)
    assert bad["free rider"] < sorted(honest)[1], (bad, honest)
    # the loss of the base is computed once per base version
    assert scorer.base_loss(base, "b") == scorer.loss(base)


# ----- a real run ---------------------------------------------------------------------------------------------
KINDS = ["signflip", "labels", "freerider"]
ROUNDS_PER_KIND = 10
# The adversary (and in the reference run, the honest 4th peer) joins after the scoring's warm-up: in the first rounds
# of a run from scratch honest updates improve nothing measurably, and nothing tells a small harm or a free rider from them
# (docs/reliability.md measures the rounds from 0 on with benchmarks/adversaries.py). A public run is mostly past
# those rounds when anyone joins.
JOIN_AFTER = SCORE_WARMUP_ROUNDS


def _probe(net, coord) -> dict:
    """The coordinator's metrics and status page data at the end of the run."""
    url = status_base_url(net, coord)
    families = scrape(url + "/metrics")
    return {"rejected": {s.labels["reason"]: s.value for s in families["lte_rejected_contributions"].samples
                         if s.name.endswith("_total")},
            "scored": sum(s.value for s in families["lte_contribution_score"].samples if s.name.endswith("_count")),
            "status": get_json(url + "/status.json")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with the adversary cycling through KINDS until it was screened in ROUNDS_PER_KIND rounds of each, then
    the honest peers alone (same identities, so the same head seeds, and the same shards) for the same number of
    merged rounds: what rejecting the adversary can at best give back (with 3 heads of rank 8 on width 32 the run
    is below LTE's N r >= d regime, so a 4th honest peer would end higher for its own sake)."""
    root = tmp_path_factory.mktemp("poison")
    poisoned = poisoning.run(root / "poisoned", root / "ids", KINDS, 0, per_kind=ROUNDS_PER_KIND,
                             join_after=JOIN_AFTER, timeout_s=900,
                             coordinator_args=("--http-port", "0"), probe=_probe)
    merged = sum(e["peers"] > 0 for e in poisoned.rounds)
    honest = poisoning.run(root / "honest", root / "ids", [], merged, adversary=False, timeout_s=600)
    return poisoned, honest


@pytest.mark.timeout(1500)
def test_a_poisoning_peer_is_rejected_and_honest_ones_are_not(runs):
    """Every kind is rejected in at least 90 % of the rounds the adversary was screened in (the norm bound takes
    some -9x updates, the scoring the rest), honest peers in at most 5 % of theirs, every honest peer ends every
    round on the committed base, and the rejections, scores and leaderboard are where operators look."""
    poisoned, _ = runs
    screened = poisoned.adversary_rounds()
    for kind in KINDS:
        reasons = [screened[k] for k in screened if poisoned.attacks[k] == kind]
        assert len(reasons) >= ROUNDS_PER_KIND, (kind, reasons)
        rejected = [r for r in reasons if r is not None]
        assert len(rejected) >= 0.9 * len(reasons), (kind, reasons)
        assert set(rejected) <= POISON[kind], (kind, reasons)
    h_rejected, h_rounds = poisoned.honest_rejections()
    assert h_rejected <= 0.05 * h_rounds, (h_rejected, h_rounds)
    assert not poisoned.mismatches, poisoned.mismatches
    for e in poisoned.rounds:  # the commit carries a score for every member it scored
        assert set(e["members"]) <= set(e["scores"]), e
    probe = poisoned.probe
    assert probe["rejected"]["score_outlier"] >= 1 and probe["scored"] >= len(poisoned.rounds), probe["rejected"]
    board = {p["peer"]: p for p in probe["status"]["leaderboard"]}
    adv, honest_ids = board[poisoned.adversary], [board[i] for i in poisoned.honest.values()]
    assert adv["rejected"] >= 1 and adv["score"] < min(h["score"] for h in honest_ids), (adv, honest_ids)


@pytest.mark.timeout(1500)
def test_final_accuracy_is_the_honest_runs(runs):
    """Final accuracy (the mean of the last 5 evaluations: see RunResult.final_accuracy_mean) within 3 points.

    The issue asks for 1 point; two single network runs differ by their timing (CI saw 1.3 and 2.3 points between
    them with the adversary rejected every round), while an attack that gets through costs 30 points and more
    (docs/reliability.md). So this test bounds the damage, and the 1-point target is not claimed."""
    poisoned, honest = runs
    assert not honest.mismatches, honest.mismatches
    assert abs(poisoned.final_accuracy_mean() - honest.final_accuracy_mean()) <= 0.03, (
        poisoned.final_accuracy_mean(), honest.final_accuracy_mean(), poisoned.final_accuracy, honest.final_accuracy)
