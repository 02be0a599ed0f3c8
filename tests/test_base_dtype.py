"""A low-memory peer (`--base-dtype bf16|int8`): the frozen base weights live in low precision on the device, the
authoritative fp32 master in host memory. Merges and hashes read only the master, so the base stays bit-identical to
an fp32 peer's, and the device copy is always exactly quantize(master): nothing drifts across merges."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from lte.checkpoint import state_hash
from lte.config import load_spec
from lte.data import load_datasets
from lte.lora import LoRALinear, dequantize_base, prepare_model, quantize_base
from lte.errors import ConfigError
from lte.merge import apply_update, merge_contributions
from lte.models import create_base_model
from lte.train import HeadTrainer

LOW = ["bf16", "int8"]
# Worst-case rounding of one weight: bf16 keeps 8 significant bits, so round-to-nearest moves |w| by at most
# 2^-8 of itself; int8 rounds to half a step of s = max|row| / 127, i.e. 1/254 of the row's largest magnitude.
PER_WEIGHT = {"bf16": 2.0 ** -8, "int8": 1 / 254}


def _digits_pair(base_dtype):
    """A single-head fp32 model and a low-precision one over the same digits ViT base (same A init)."""
    spec = load_spec("configs/digits.yaml")
    one = spec.lte.model_copy(update={"heads": 1})
    base = create_base_model(spec.model)
    return (prepare_model(copy.deepcopy(base), one, run_seed=3),
            prepare_model(copy.deepcopy(base), one, run_seed=3, base_dtype=base_dtype))


def _set_factors(models, seed):
    """The same random nonzero B for every model (B starts at zero, which would hide the LoRA path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in models[0].layers:
            b = torch.randn(models[0].layers[name].lora_B.shape, generator=g) * 0.01
            for m in models:
                m.layers[name].lora_B.copy_(b)


def _assert_device_copy_is_quantized_master(model, base_dtype):
    for name, layer in model.layers.items():
        master = model.master[f"{name}.weight"]
        assert master.dtype == torch.float32 and master.device.type == "cpu"
        q, scale = quantize_base(master, base_dtype)
        assert layer.weight.dtype == q.dtype and torch.equal(layer.weight, q), name
        assert (scale is None and layer.weight_scale is None) or torch.equal(layer.weight_scale, scale), name


@pytest.mark.parametrize("base_dtype", LOW)
def test_device_copy_is_quantize_of_master_and_merges_keep_the_fp32_hash(tiny_spec, base_dtype):
    base = create_base_model(tiny_spec.model)
    ref = prepare_model(copy.deepcopy(base), tiny_spec.lte, run_seed=1)
    low = prepare_model(copy.deepcopy(base), tiny_spec.lte, run_seed=1, base_dtype=base_dtype)
    # Holding a low-precision copy does not touch the base: same bytes, same hash as the fp32 model's.
    assert state_hash(low.base_state_dict()) == state_hash(ref.base_state_dict()) == state_hash(
        {k: v for k, v in base.state_dict().items()})
    _assert_device_copy_is_quantized_master(low, base_dtype)
    for k in range(3):
        # The peer path (peer/service.py: base_state_dict -> apply_update -> load_base) with the same update for both,
        # then the emulation path (apply_merge): both must leave the master equal to the fp32 model's base.
        _set_factors([ref, low], 10 + k)
        update = merge_contributions(ref.contributions(), ref.scale)
        states = []
        for m in (ref, low):
            state = m.base_state_dict()
            apply_update(state, update)
            m.load_base(state)
            states.append(state)
        assert state_hash(low.base_state_dict()) == state_hash(ref.base_state_dict()) == state_hash(states[0])
        _assert_device_copy_is_quantized_master(low, base_dtype)
        _set_factors([ref, low], 20 + k)
        ref.merge()
        low.merge()
        assert state_hash(low.base_state_dict()) == state_hash(ref.base_state_dict())
        _assert_device_copy_is_quantized_master(low, base_dtype)
    # The merges really moved the base (the checks above are not about an unchanged model).
    assert state_hash(low.base_state_dict()) != state_hash(dict(base.state_dict()))


@pytest.mark.parametrize("base_dtype", LOW)
def test_layer_output_stays_within_the_rounding_bound(base_dtype):
    """Elementwise: |y_low - y_fp32| <= sum_k |x_k| |dW_jk|max, the bound rounding one weight allows."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    ref, low = LoRALinear(lin, 1, 8, 2.0, False), LoRALinear(lin, 1, 8, 2.0, False, base_dtype)
    with torch.no_grad():
        for layer in (ref, low):
            layer.lora_A.copy_(torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(1)))
            layer.lora_B.copy_(torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(2)) * 0.1)
    x = torch.randn(32, 96)
    w = lin.weight.detach()
    dw_max = w.abs() * PER_WEIGHT["bf16"] if base_dtype == "bf16" else (w.abs().amax(1, keepdim=True) / 254).expand_as(w)
    dw_max = dw_max * (1 + 1e-6)  # the fp32 division W / s itself rounds
    assert (low.dense_weight() - w).abs().le(dw_max).all()

    def one_head(layer):  # what LTEModel does for N = 1: per-head tensors without their head dimension
        per_head = {n: t[0] for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.dim() == 3 or n == "bias"}
        return functional_call(layer, per_head, (x,))

    bound = x.abs() @ dw_max.T + 1e-5  # + the fp32 rounding of the two matmuls themselves
    err = (one_head(low) - one_head(ref)).abs()
    assert err.le(bound).all(), (err - bound).max()
    assert err.max() > 0  # the copy really is low precision


@pytest.mark.parametrize("base_dtype", LOW)
def test_model_forward_close_to_fp32_and_eval_reads_the_master(base_dtype):
    ref, low = _digits_pair(base_dtype)
    _set_factors([ref, low], 0)
    x = torch.randn(16, 1, 8, 8)
    y_ref, y_low = ref(x), low(x)
    # Tolerance: 5x the worst-case relative rounding of one weight. Independent roundings partly cancel and
    # LayerNorm renormalises each block, so the logits move by about that much (measured 0.24x bf16, 0.9x int8);
    # a real bug (a wrong scale, a row swapped, the LoRA path dropped) moves them by order 1.
    rel = ((y_low - y_ref).norm() / y_ref.norm()).item()
    assert 0 < rel < 5 * PER_WEIGHT[base_dtype], rel
    # Evaluation is the merged base computed from the fp32 master, so it is exactly the fp32 model's.
    ref.eval(), low.eval()
    assert torch.equal(ref(x), low(x))


@pytest.mark.parametrize("base_dtype", LOW)
def test_frozen_weights_shrink_by_the_expected_factor(base_dtype):
    ref, low = _digits_pair(base_dtype)

    def nbytes(m, names):
        return sum(getattr(l, n).nbytes for l in m.layers.values() for n in names if getattr(l, n) is not None)

    fp32 = nbytes(ref, ["weight"])
    stored = nbytes(low, ["weight", "weight_scale"])
    rows = sum(l.out_features for l in low.layers.values())
    expected = fp32 / 2 if base_dtype == "bf16" else fp32 / 4 + 4 * rows  # int8 + one fp32 scale per output row
    assert stored == expected
    # The folded fp32 copy (one per head, as large as the fp32 base) is not kept: the peer runs unfolded.
    assert ref.spec.fold and all(l.folded is not None for l in ref.layers.values())
    assert all(l.folded is None for l in low.layers.values())
    # Factors and replicas stay fp32 and trainable.
    assert all(p.dtype == torch.float32 for p in low.parameters())
    assert {p.data_ptr() for p in low.parameters()}.isdisjoint({l.weight.data_ptr() for l in low.layers.values()})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("base_dtype", LOW)
def test_head_trainer_learns_and_leaves_the_master_alone(base_dtype):
    spec = load_spec("configs/digits.yaml", {"optim": {"warmup_steps": 5}})
    train_set = load_datasets(spec.data, 0)[0]
    torch.manual_seed(0)
    trainer = HeadTrainer(spec, create_base_model(spec.model), "peer-a", train_set, 32, base_dtype=base_dtype)
    before = state_hash(trainer.model.base_state_dict())
    device_copy = {n: l.weight.clone() for n, l in trainer.model.layers.items()}
    losses = [trainer.train_steps(1)[1] for _ in range(60)]
    # From ln 10 = 2.30: the last 10 steps average about 1.85 (bf16) and 1.93 (int8), fp32 1.81 (measured).
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses
    # Training moves factors and replicas only: the converted layers' master and device copy are unchanged.
    after = trainer.model.base_state_dict()
    assert all(torch.equal(after[f"{n}.weight"], trainer.model.master[f"{n}.weight"]) for n in device_copy)
    assert all(torch.equal(l.weight, device_copy[n]) for n, l in trainer.model.layers.items())
    assert state_hash(after) != before  # (the replicas did train)


def test_dequantize_round_trip_and_bad_dtype():
    w = torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]])
    q, s = quantize_base(w, "int8")
    assert q.tolist() == [[50, -127, 0], [0, 0, 0]]
    assert torch.equal(dequantize_base(q, s, torch.float32)[1], torch.zeros(3))  # an all-zero row stays zero
    torch.testing.assert_close(dequantize_base(q, s, torch.float32), w, rtol=0, atol=1.27 / 254)
    with pytest.raises(ValueError):
        quantize_base(w, "fp8")
    with pytest.raises(ConfigError, match="base dtype"):
        prepare_model(nn.Sequential(nn.Linear(4, 4)), load_spec("configs/digits.yaml").lte, base_dtype="fp16")


@pytest.mark.parametrize("base_dtype", LOW)
def test_backward_keeps_no_fp32_copy_of_the_frozen_weights(base_dtype):
    """Autograd must not hold each layer's dequantized fp32 W until backward (that would give the memory back):
    among the tensors saved for backward there is no fp32 matrix of a converted layer's shape, and the gradients
    equal those of plain F.linear on the dequantized weight."""
    ref, low = _digits_pair(base_dtype)
    shapes = {tuple(l.weight.shape) for l in ref.layers.values()}
    x = torch.randn(8, 1, 8, 8)

    def saved_fp32_weights(model):
        found = []

        def pack(t):
            if t.dtype == torch.float32 and tuple(t.shape) in shapes:
                found.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        return found

    assert saved_fp32_weights(ref)  # the check sees them where they are (the fp32 base's folded W)
    assert saved_fp32_weights(low) == []
    # Same gradients as autograd through the dequantized weight (one layer, input and bias gradients).
    layer = low.layers["blocks.0.mlp.fc1"]
    xin = torch.randn(5, layer.in_features, requires_grad=True)
    xin2 = xin.detach().clone().requires_grad_(True)
    bias = layer.bias[0].detach().clone().requires_grad_(True)
    per_head = {n: t[0] for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.dim() == 3}
    functional_call(layer, {**per_head, "bias": bias}, (xin,)).sum().backward()
    w = layer.dense_weight().detach().requires_grad_(False)
    out = nn.functional.linear(xin2, w, bias.detach()) + nn.functional.linear(
        nn.functional.linear(xin2, per_head["lora_A"]), per_head["lora_B"] * layer.scale) - nn.functional.linear(
        nn.functional.linear(xin2, per_head["v_A"]), per_head["v_B"] * layer.scale)
    out.sum().backward()
    torch.testing.assert_close(xin.grad, xin2.grad)
    assert torch.equal(bias.grad, torch.full_like(bias, 5.0))


def test_cli_accepts_the_three_dtypes_and_refuses_others_in_one_line(capsys):
    from peer.cli import parse_args

    assert parse_args(["join", "--dht", "x"]).base_dtype == "fp32"
    assert parse_args(["join", "--dht", "x", "--base-dtype", "int8"]).base_dtype == "int8"
    with pytest.raises(SystemExit) as exc:
        parse_args(["join", "--dht", "x", "--base-dtype", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base-dtype: invalid choice: 'fp16'" in err[0], err
