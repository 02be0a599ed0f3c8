"""The outer step on LTE's merged update (design notes §6, issue 13): Nesterov momentum on each round's merge.

lte.outer_lr = 1 and lte.outer_momentum = 0 must be plain LTE bit for bit; otherwise the base follows
m <- mu m + U, base <- base + lr (U + mu m) per state key, for weights and replicas alike.
"""
import pytest
import torch

from lte.data import load_datasets
from lte.errors import ConfigError
from lte.lora import prepare_model
from lte.merge import MergeUpdate, outer_step
from lte.models import create_base_model
from lte.train import train
from tests.conftest import hash_before_later_fields
from tests.test_core_pipeline import _spec, _train_a_little


def test_lr_one_and_no_momentum_is_the_update_itself():
    u = MergeUpdate({"l": torch.randn(3, 4, dtype=torch.float64)}, {"n": torch.randn(3, dtype=torch.float64)}, ["a"], [1.0])
    momentum: dict = {}
    assert outer_step(u, momentum, {"n": torch.zeros(3)}, 1.0, 0.0) is u and momentum == {}


def test_two_rounds_follow_the_nesterov_formula():
    g = torch.Generator().manual_seed(0)
    base_rep = torch.randn(5, generator=g)
    u1, u2 = (MergeUpdate({"l": torch.randn(3, 4, generator=g, dtype=torch.float64)},
                          {"n": base_rep.double() + torch.randn(5, generator=g, dtype=torch.float64)}, ["a"], [1.0])
              for _ in range(2))
    lr, mu, momentum = 0.7, 0.9, {}
    s1 = outer_step(u1, momentum, {"n": base_rep}, lr, mu)
    torch.testing.assert_close(s1.deltas["l"], lr * (1 + mu) * u1.deltas["l"], rtol=1e-12, atol=0)
    rep1 = s1.replicas["n"]
    s2 = outer_step(u2, momentum, {"n": rep1}, lr, mu)
    m2 = mu * u1.deltas["l"] + u2.deltas["l"]
    torch.testing.assert_close(momentum["l.weight"], m2, rtol=1e-12, atol=0)
    torch.testing.assert_close(s2.deltas["l"], lr * (u2.deltas["l"] + mu * m2), rtol=1e-12, atol=0)
    # replicas: U is the merged value minus the base value it moves from
    r1 = u1.replicas["n"] - base_rep.double()
    r2 = u2.replicas["n"] - rep1
    torch.testing.assert_close(s2.replicas["n"], rep1 + lr * (r2 + mu * (mu * r1 + r2)), rtol=1e-12, atol=1e-12)


def test_the_model_applies_it_at_each_merge_and_its_merged_view_leaves_the_momentum_alone(tiny_spec):
    spec = _spec(tiny_spec, outer_lr=0.5, outer_momentum=0.8)
    torch.manual_seed(0)
    model = prepare_model(create_base_model(spec.model), spec.lte)
    plain = prepare_model(create_base_model(spec.model), _spec(tiny_spec).lte)
    plain.load_state_dict(model.state_dict())
    _train_a_little(model, spec, 2, seed=1)
    _train_a_little(plain, spec, 2, seed=1)
    before = model.base_state_dict()
    view = model.eval().merged_state_dict()
    assert model.momentum == {}  # evaluating the merged view is not a merge
    model.train().merge()
    plain.merge()
    after, plain_after = model.base_state_dict(), plain.base_state_dict()
    for k in model.layers:  # first round: m = U, the base moves by lr (1 + mu) U
        key = f"{k}.weight"
        u = plain_after[key].double() - before[key].double()
        torch.testing.assert_close(after[key].double() - before[key].double(), 0.5 * 1.8 * u, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(view[key], after[key])
    assert set(model.momentum) >= {f"{k}.weight" for k in model.layers}


def test_the_simulator_runs_it_and_is_plain_lte_at_one_and_zero(tiny_spec):
    spec = _spec(tiny_spec)
    data = load_datasets(spec.data, spec.seed)
    plain = train(spec, "lte", progress=False, datasets=data)
    same = train(_spec(tiny_spec, outer_lr=1.0, outer_momentum=0.0), "lte", progress=False, datasets=data)
    assert same["loss_curve"] == plain["loss_curve"] and same["test_loss"] == plain["test_loss"]
    nesterov = train(_spec(tiny_spec, outer_lr=0.7, outer_momentum=0.9), "lte", progress=False, datasets=data)
    assert nesterov["loss_curve"][:2] == plain["loss_curve"][:2]  # the first merge is after T = 2 steps
    assert nesterov["loss_curve"] != plain["loss_curve"]


def test_outer_fields_are_hashed_only_when_set(tiny_spec):
    assert tiny_spec.spec_hash() == hash_before_later_fields(tiny_spec)
    assert _spec(tiny_spec, outer_momentum=0.9).spec_hash() != _spec(tiny_spec).spec_hash()
    with pytest.raises(ConfigError, match="less than 1"):
        _spec(tiny_spec, outer_momentum=1.0)
    with pytest.raises(ConfigError, match="greater than 0"):
        _spec(tiny_spec, outer_lr=0.0)
