"""The merge rule itself: reset and reset-less over several merges, order independence, sample weights."""
import random

import pytest
import torch

from lte.lora import prepare_model
from lte.merge import HeadContribution, merge_contributions
from lte.models import create_base_model


def _randomise_factors(model, seed: int, only_b: bool = False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            if not only_b:
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)


def _weights(model):
    return {n: l.weight.clone().double() for n, l in model.layers.items()}


def test_resetless_merge_telescopes_without_double_subtraction(tiny_spec):
    """Reset-less, equal weights: after k merges W = W0 + (s/N) sum_n B_n A_n of the latest factors."""
    model = prepare_model(create_base_model(tiny_spec.model), tiny_spec.lte)
    w0, s, n = _weights(model), tiny_spec.lte.scale, tiny_spec.lte.heads
    for k in range(4):
        _randomise_factors(model, k)
        model.merge()
        for name, layer in model.layers.items():
            expect = w0[name] + (s / n) * sum(layer.lora_B[h].double() @ layer.lora_A[h].double() for h in range(n))
            torch.testing.assert_close(layer.weight.double(), expect, atol=1e-5, rtol=1e-5)


def test_reset_merge_adds_each_round_once(tiny_spec):
    spec = tiny_spec.lte.model_copy(update={"reset": True})
    model = prepare_model(create_base_model(tiny_spec.model), spec)
    s, n = spec.scale, spec.heads
    for k in range(3):
        before = _weights(model)
        _randomise_factors(model, k, only_b=True)
        expect = {name: before[name] + (s / n) * sum(l.lora_B[h].double() @ l.lora_A[h].double() for h in range(n))
                  for name, l in model.layers.items()}
        model.merge()
        for name, layer in model.layers.items():
            torch.testing.assert_close(layer.weight.double(), expect[name], atol=1e-5, rtol=1e-5)
            assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.v_B) == 0


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("reset", [True, False])
def test_every_head_computes_the_base_right_after_a_merge(tiny_spec, fold, reset):
    spec = tiny_spec.lte.model_copy(update={"fold": fold, "reset": reset})
    model = prepare_model(create_base_model(tiny_spec.model), spec)
    for k in range(2):  # twice, so stale V from an earlier merge would show
        _randomise_factors(model, 5 + k)
        model.merge()
    x = torch.randn(6, 1, 8, 8)
    per_head = model(x, split=False)  # (N, 6, classes)
    model.eval()
    merged = model(x)
    for h in range(spec.heads):
        torch.testing.assert_close(per_head[h], merged, atol=1e-5, rtol=1e-4)


def _contribution(i: int, samples: float) -> HeadContribution:
    g = torch.Generator().manual_seed(i)
    a, b = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    pa, pb = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    return HeadContribution(f"peer{i}", samples, {"l": (a, b)}, {"norm": torch.randn(5, generator=g)}, {"l": (pa, pb)})


def test_merge_is_independent_of_arrival_order():
    contribs = [_contribution(i, 10 + i) for i in range(5)]
    ref = merge_contributions(contribs, scale=2.0)
    for seed in range(5):
        shuffled = contribs[:]
        random.Random(seed).shuffle(shuffled)
        got = merge_contributions(shuffled, scale=2.0)
        assert torch.equal(got.deltas["l"], ref.deltas["l"]) and torch.equal(got.replicas["norm"], ref.replicas["norm"])
    assert ref.head_ids == sorted(ref.head_ids)


def test_merge_weights_by_samples():
    c1, c2 = _contribution(1, 1), _contribution(2, 3)
    got = merge_contributions([c1, c2], scale=2.0)
    d = lambda c: c.factors["l"][1].double() @ c.factors["l"][0].double() - c.prev_factors["l"][1].double() @ c.prev_factors["l"][0].double()
    torch.testing.assert_close(got.deltas["l"], 2.0 * (0.25 * d(c1) + 0.75 * d(c2)))
    torch.testing.assert_close(got.replicas["norm"], 0.25 * c1.replicas["norm"].double() + 0.75 * c2.replicas["norm"].double())
    assert got.weights == [0.25, 0.75]


def test_merge_rejects_duplicates_and_empty_weight():
    with pytest.raises(ValueError, match="duplicate"):
        merge_contributions([_contribution(1, 1), _contribution(1, 1)], 1.0)
    with pytest.raises(ValueError, match="samples"):
        merge_contributions([_contribution(1, 0)], 1.0)
