"""Factors over a lossy wire (lte.wire; design notes §6): what is sent, what is decoded, and that nothing is lost.

The int8 code is blockwise absmax; every merge uses the decoded factors and V becomes them, so the coding error
stays in the head and goes out with its next contribution (error feedback, with no buffer of its own).
"""
import copy

import pytest
import torch

from lte.config import spec_from_dict
from lte.errors import ConfigError
from lte.lora import prepare_model
from lte.models import create_base_model
from lte.net.blobstore import decode, digest, encode
from lte.quant import INT8_BLOCK, int8_decode, int8_encode, roundtrip
from lte.train import train
from tests.test_core_pipeline import _f64, _spec, _train_a_little


@pytest.mark.parametrize("shape", [(8, 192), (192, 8), (5,), (0, 3), (INT8_BLOCK + 1,)])
def test_int8_code_is_within_half_a_step_of_each_value(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    codes, scales = int8_encode(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.numel() == -(-x.numel() // INT8_BLOCK)
    y = int8_decode(codes, scales)
    step = scales.repeat_interleave(INT8_BLOCK)[:x.numel()].view(x.shape)
    assert (y - x).abs().le(step / 2 * (1 + 1e-6)).all()
    assert torch.equal(y, roundtrip(x, "int8"))  # what the simulator uses is what the wire gives
    if x.numel():  # each block's largest value is coded exactly at +-127
        assert codes.abs().max() == 127


def test_an_all_zero_block_codes_as_zeros_and_a_diverged_one_decodes_non_finite():
    x = torch.zeros(2 * INT8_BLOCK)
    x[INT8_BLOCK] = float("nan")
    y = roundtrip(x, "int8")
    assert torch.equal(y[:INT8_BLOCK], torch.zeros(INT8_BLOCK))  # no 0/0
    assert not torch.isfinite(y[INT8_BLOCK:]).all()  # left for validation's non-finite check to reject


def test_int8_blob_decodes_to_the_roundtrip_and_refuses_mismatched_parts():
    a, b = torch.randn(4, 96), torch.randn(96, 4)
    raw = torch.arange(5, dtype=torch.uint8)  # non-float tensors travel as they are
    parts = encode([a, b, raw], "int8")
    assert len(parts) == 5 and sum(len(p.buffer) for p in parts[:2]) < a.numel() * 4 / 3.5
    got = decode(parts)
    assert torch.equal(got[0], roundtrip(a, "int8")) and torch.equal(got[1], roundtrip(b, "int8"))
    assert torch.equal(got[2], raw)
    assert digest(parts) == digest(encode([a, b, raw], "int8"))  # deterministic: one address for one tensor list
    assert digest(parts) != digest(encode([a, b, raw], "raw"))
    with pytest.raises(ValueError, match="without their scales"):
        decode(parts[:1])
    short = encode([torch.randn(10)], "int8")
    with pytest.raises(ValueError, match="1 scales for 384 values"):
        decode([parts[0], short[1]])  # a's codes with another tensor's scales


def test_fp16_roundtrip_is_hivemind_fp16_codec():
    x = torch.tensor([1e-3, 1e6, -1e6, 3.14159])
    assert torch.equal(decode(encode([x], "fp16"))[0], roundtrip(x, "fp16"))


def test_wire_needs_reset_less_rule_and_raw_leaves_the_spec_hash_alone(tiny_spec):
    data = tiny_spec.model_dump()
    data["lte"]["wire"] = "raw"
    assert spec_from_dict(data).spec_hash() == tiny_spec.spec_hash()
    data["lte"]["wire"] = "int8"
    assert spec_from_dict(data).spec_hash() != tiny_spec.spec_hash()
    data["lte"]["reset"] = True
    with pytest.raises(ConfigError, match="wire: int8 needs the reset-less rule"):
        spec_from_dict(data)


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_a_merge_keeps_the_coding_error_in_the_head(tiny_spec, wire):
    """Error feedback: after a merge of decoded snapshots, each head's pending delta B A - V is exactly what it
    trained that the wire did not carry, so base + s(B A - V) summed over the merge is unchanged for one head."""
    spec = _spec(tiny_spec, wire=wire, heads=1)
    model = prepare_model(create_base_model(spec.model), spec.lte, run_seed=5)
    _train_a_little(model, spec, 3, seed=1)
    before = {n: _f64(l.weight) + spec.lte.scale * (_f64(l.lora_B[0]) @ _f64(l.lora_A[0])
                                                    - _f64(l.v_B[0]) @ _f64(l.v_A[0])) for n, l in model.layers.items()}
    snap = model.snapshot(0)
    model.merge_snapshots([snap])
    left = 0.0
    for n, layer in model.layers.items():
        pending = _f64(layer.lora_B[0]) @ _f64(layer.lora_A[0]) - _f64(layer.v_B[0]) @ _f64(layer.v_A[0])
        torch.testing.assert_close(_f64(layer.weight) + spec.lte.scale * pending, before[n], atol=1e-5, rtol=1e-5)
        assert torch.equal(layer.v_A[0], snap.factors[n][0]) and torch.equal(layer.v_B[0], snap.factors[n][1])
        left = max(left, pending.abs().max().item())
    assert left > 0  # the code lost something, and it is still there to be sent


def test_simulator_trains_over_an_int8_wire(tiny_spec):
    """lte.wire: int8 goes through the snapshot merge and differs from raw only by the coding error."""
    raw = train(_spec(tiny_spec), "lte", progress=False)
    int8 = train(_spec(tiny_spec, wire="int8"), "lte", progress=False)
    assert int8["merges"] == raw["merges"] > 0
    assert int8["loss_curve"] != raw["loss_curve"]
    assert abs(int8["test_loss"] - raw["test_loss"]) < 0.1 * raw["test_loss"]
