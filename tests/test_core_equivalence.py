"""The paper's equivalences and the emulation/network equivalence, checked numerically."""
import copy

import pytest
import timm
import torch

from lte.lora import mhlora_model, prepare_model
from lte.merge import merge_contributions
from lte.models import create_base_model
from lte.train import head_loss, param_groups


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _assert_states_close(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("fold", [True, False])
def test_lte_with_t1_equals_mhlora_step_for_step(tiny_spec, fold):
    """T = 1: merging after every step gives the same trajectory as one model with N summed heads.

    With plain SGD the heads' gradients in LTE are N times MHLoRA's (each head sees the full effect of its
    factors, MHLoRA scales each by 1/N), so MHLoRA's factor learning rate is N times LTE's.
    """
    spec = tiny_spec.lte.model_copy(update={"fold": fold})
    base = create_base_model(tiny_spec.model)
    lte_m = prepare_model(copy.deepcopy(base), spec, run_seed=7)
    mh = mhlora_model(copy.deepcopy(base), spec, run_seed=7)
    n, lr = spec.heads, 0.05
    opt_lte = torch.optim.SGD([{"params": list(lte_m.factor_parameters()), "lr": lr},
                               {"params": [p for _, p in lte_m.replica_parameters()], "lr": lr}])
    opt_mh = torch.optim.SGD([{"params": list(mh.factor_parameters()), "lr": lr * n},
                              {"params": [p for _, p in mh.replica_parameters()], "lr": lr}])
    _assert_states_close(lte_m.merged_state_dict(), mh.merged_state_dict())
    for step in range(6):
        x, y = _batch(16, step)
        for model, opt in ((lte_m, opt_lte), (mh, opt_mh)):
            opt.zero_grad()
            logits = model(x, split=False) if model is lte_m else model(x)
            head_loss(logits, y).backward()
            opt.step()
        lte_m.merge()
        _assert_states_close(lte_m.base_state_dict(), mh.merged_state_dict())
    # The trajectory really moved: this is not a comparison of two untouched models.
    assert not torch.allclose(lte_m.base_state_dict()["blocks.0.attn.qkv.weight"], base.state_dict()["blocks.0.attn.qkv.weight"])


def test_emulated_heads_equal_separate_single_head_models(tiny_spec):
    """N heads in one process == N single-head models on their own shards, merged through the merge API."""
    spec = tiny_spec
    base = create_base_model(spec.model)
    ids = ["peer-b", "peer-a", "peer-c"]  # unsorted on purpose: the merge sorts by id
    emu = prepare_model(copy.deepcopy(base), spec.lte, run_seed=3, head_ids=ids)
    one = spec.lte.model_copy(update={"heads": 1, "fold": False})  # the unfolded path must agree too
    singles = [prepare_model(copy.deepcopy(base), one, run_seed=3, head_ids=[i]) for i in ids]
    opts = [torch.optim.AdamW(param_groups(m, spec, "lte")) for m in [emu, *singles]]
    b = spec.data.batch_size // spec.lte.heads
    for rnd in range(3):
        for step in range(spec.lte.merge_every):
            x, y = _batch(spec.data.batch_size, 100 * rnd + step)
            for i, (m, opt) in enumerate(zip([emu, *singles], opts)):
                xi, yi = (x, y) if m is emu else (x[(i - 1) * b:i * b], y[(i - 1) * b:i * b])
                opt.zero_grad()
                head_loss(m(xi), yi).backward()
                opt.step()
        emu.merge()
        update = merge_contributions([m.head_contribution(0) for m in singles], spec.lte.scale)
        for m in singles:
            m.apply_merge(update)
        states = [m.base_state_dict() for m in singles]
        for s in states[1:]:  # network peers merging the same bytes end bitwise identical
            assert all(torch.equal(s[k], states[0][k]) for k in s)
        _assert_states_close(emu.base_state_dict(), states[0])


def test_merged_model_loads_into_vanilla_timm(tiny_spec):
    model = prepare_model(create_base_model(tiny_spec.model), tiny_spec.lte, run_seed=1)
    opt = torch.optim.AdamW(param_groups(model, tiny_spec, "lte"), lr=1e-2)
    for step in range(3):  # train without a final merge: the merged view must include pending head deltas
        x, y = _batch(24, step)
        opt.zero_grad()
        head_loss(model(x), y).backward()
        opt.step()
    x, _ = _batch(8, 99)
    model.eval()
    ours = model(x)
    vanilla = timm.create_model(tiny_spec.model.name, pretrained=False, **tiny_spec.model.kwargs)
    vanilla.load_state_dict(model.merged_state_dict(), strict=True)
    vanilla.eval()
    torch.testing.assert_close(vanilla(x), ours, atol=1e-5, rtol=1e-4)
    fresh = timm.create_model(tiny_spec.model.name, pretrained=False, **tiny_spec.model.kwargs).eval()
    assert not torch.allclose(fresh(x), ours, atol=1e-3)
