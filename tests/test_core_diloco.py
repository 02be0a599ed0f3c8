"""The DiLoCo baseline: the outer Nesterov step checked by hand, and the worker split of the batch."""
import pytest
import torch

from lte.config import load_spec
from lte.models import create_base_model
from lte.train import DiLoCoModel, head_loss, param_groups, train


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _inner_steps(model: DiLoCoModel, spec, steps: int, seed: int) -> None:
    opt = torch.optim.AdamW(param_groups(model, spec, "diloco"), lr=1e-2)
    for s in range(steps):
        x, y = _batch(12, seed + s)
        opt.zero_grad()
        head_loss(model(x), y).backward()
        opt.step()


def test_two_outer_steps_match_nesterov_by_hand(tiny_spec):
    lr, mu = 0.7, 0.9
    model = DiLoCoModel(create_base_model(tiny_spec.model), workers=3, outer_lr=lr, outer_momentum=mu)
    theta = [p.detach().clone() for p in model.net.parameters()]
    buf = None
    for rnd in range(2):
        _inner_steps(model, tiny_spec, steps=2, seed=10 * rnd)
        workers = [[p.detach().clone() for p in w.parameters()] for w in model.workers]
        assert not torch.equal(workers[0][0], workers[1][0])  # each worker saw its own slice
        delta = [t - sum(w[i] for w in workers) / 3 for i, t in enumerate(theta)]  # the pseudo-gradient
        buf = delta if buf is None else [mu * b + d for b, d in zip(buf, delta)]
        theta = [t - lr * (d + mu * b) for t, d, b in zip(theta, delta, buf)]  # Nesterov: g + mu * buf
        model.merge()
        for want, got in zip(theta, model.net.parameters()):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        for w in model.workers:  # every worker restarts from the new shared model
            assert all(torch.equal(a, b) for a, b in zip(w.parameters(), model.net.parameters()))


def test_each_worker_trains_on_its_slice_and_eval_uses_the_shared_model(tiny_spec):
    model = DiLoCoModel(create_base_model(tiny_spec.model), workers=3, outer_lr=0.7, outer_momentum=0.9)
    _inner_steps(model, tiny_spec, steps=1, seed=0)  # make the workers differ from the shared model
    x, _ = _batch(12, 5)
    logits = model(x)
    assert logits.shape == (3, 4, 10)
    for i, w in enumerate(model.workers):
        torch.testing.assert_close(logits[i], w(x[4 * i:4 * i + 4]))
    model.eval()
    torch.testing.assert_close(model(x), model.net(x))
    with pytest.raises(ValueError, match="does not split"):
        model.train()(x[:11])


@pytest.mark.timeout(300)
def test_diloco_trains_on_digits_through_the_common_loop(tiny_spec):
    spec = load_spec("configs/digits.yaml", {"model": tiny_spec.model.model_dump(), "eval_every": 60,
                                             "optim": {"steps": 120, "warmup_steps": 5, "full_lr": 3e-3},
                                             "lte": {"merge_every": 10}})
    r = train(spec, "diloco", progress=False)
    assert r["merges"] == 12
    assert r["trainable_parameters"] == spec.lte.heads * sum(p.numel() for p in create_base_model(spec.model).parameters())
    first, last = r["loss_curve"][:20], r["loss_curve"][-20:]
    assert sum(last) / 20 < sum(first) / 20 - 0.2, r["loss_curve"]  # it learns across outer steps
