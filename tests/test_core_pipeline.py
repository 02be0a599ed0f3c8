"""Pipelined rounds (design notes §5): heads train on while their round's merge is in flight, and lose nothing.

What the network peer will rely on: the bookkeeping is exact, delay 0 is today's LTE bit for bit, and a delay-d
simulator run equals single-head peers that apply commit k d steps after snapshot k.
"""
import copy
import json

import pytest
import timm
import torch

from lte.config import RunSpec, spec_from_dict
from lte.data import batches, load_datasets
from lte.errors import ConfigError
from lte.lora import LTEModel, prepare_model
from lte.merge import merge_contributions
from lte.models import create_base_model
from lte.sim import main as sim_main
from lte.train import HeadTrainer, build_model, evaluate, head_loss, optimizer_step, param_groups, train, warmup_cosine
from tests.conftest import TINY_MODEL, hash_before_later_fields


def _spec(tiny_spec: RunSpec, **lte) -> RunSpec:
    """tiny_spec with a learning rate high enough that a lost or doubled step shows in the trajectory."""
    data = tiny_spec.model_dump()
    data["lte"].update(lte)
    data["optim"].update(lr=1e-2, replica_lr=1e-2, warmup_steps=2, steps=8)
    data["eval_every"] = 1000
    return spec_from_dict(data)


def _train_a_little(model: LTEModel, spec: RunSpec, steps: int, seed: int) -> None:
    opt = torch.optim.AdamW(param_groups(model, spec, "lte"), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(spec.data.batch_size, 1, 8, 8, generator=g), torch.randint(0, 10, (spec.data.batch_size,), generator=g)
        opt.zero_grad()
        head_loss(model(x), y).backward()
        opt.step()


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# ----- (a) delay 0 is today's LTE ----------------------------------------------------------------------------------
def test_delay_zero_is_synchronous_lte_bit_for_bit(tiny_spec):
    """train() at merge_delay 0 equals the synchronous loop (train T steps, merge all heads) written out here."""
    spec = _spec(tiny_spec, merge_delay=0)
    data = load_datasets(spec.data, spec.seed)
    result = train(spec, "lte", progress=False, datasets=data)

    torch.manual_seed(spec.seed)
    model = build_model(spec, "lte")
    opt = torch.optim.AdamW(param_groups(model, spec, "lte"), betas=spec.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(spec.optim.warmup_steps, spec.optim.steps))
    stream = batches(data[0], spec.data.batch_size, spec.seed)
    losses = []
    for step in range(spec.optim.steps):
        losses.append(optimizer_step(model, opt, sched, next(stream), "cpu") / spec.lte.heads)
        if (step + 1) % spec.lte.merge_every == 0:
            model.merge()
    assert result["loss_curve"] == losses
    assert (result["test_accuracy"], result["test_loss"]) == evaluate(model, data[1], "cpu")
    assert result["merges"] == spec.optim.steps // spec.lte.merge_every


@pytest.mark.parametrize("fold", [True, False])
def test_pipelined_merge_with_nothing_trained_since_the_snapshot_is_merge(tiny_spec, fold):
    """Snapshot then merge at once (delay 0 through the pipelined bookkeeping) leaves every tensor as merge() does."""
    spec = _spec(tiny_spec, fold=fold)
    model = prepare_model(create_base_model(spec.model), spec.lte, run_seed=5)
    _train_a_little(model, spec, 3, seed=1)
    model.merge()  # V != 0 from here on, so the snapshots' V is exercised too
    _train_a_little(model, spec, 2, seed=2)
    sync, pipe = copy.deepcopy(model), copy.deepcopy(model)
    sync.merge()
    pipe.merge_snapshots(pipe.snapshots())
    a, b = dict(sync.named_parameters()) | dict(sync.named_buffers()), dict(pipe.named_parameters()) | dict(pipe.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- (b) the bookkeeping is exact --------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [True, False])
def test_commit_keeps_exactly_the_progress_since_the_snapshot(tiny_spec, fold):
    spec = _spec(tiny_spec, fold=fold)
    model = prepare_model(create_base_model(spec.model), spec.lte, run_seed=5)
    _train_a_little(model, spec, 3, seed=1)
    model.merge()
    _train_a_little(model, spec, 2, seed=2)
    snaps = model.snapshots(samples=[1.0, 2.0, 3.0])
    old_w = {n: _f64(l.weight) for n, l in model.layers.items()}
    old_v = {n: _f64(l.v_B) @ _f64(l.v_A) for n, l in model.layers.items()}
    _train_a_little(model, spec, 2, seed=3)  # the round is in flight: the heads train on
    live_ba = {n: _f64(l.lora_B) @ _f64(l.lora_A) for n, l in model.layers.items()}
    live_rep = {n: _f64(p) for n, p in model.replica_parameters()}
    snap_ba = {n: torch.stack([_f64(s.factors[n][1]) @ _f64(s.factors[n][0]) for s in snaps]) for n in model.layers}
    snap_rep = {n: torch.stack([_f64(s.replicas[n]) for s in snaps]) for n in live_rep}
    s, w = spec.lte.scale, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6

    model.merge_snapshots(snaps)

    for n, layer in model.layers.items():
        # The base moved by the snapshots' weighted deltas only, computed here independently of lte.merge.
        expected_w = old_w[n] + s * torch.einsum("h,hoi->oi", w, snap_ba[n] - old_v[n])
        torch.testing.assert_close(_f64(layer.weight), expected_w, atol=1e-6, rtol=0)
        # Each head's effective weight is the new base plus exactly what it learned since its snapshot.
        effective = _f64(layer.weight) + s * (live_ba[n] - _f64(layer.v_B) @ _f64(layer.v_A))
        torch.testing.assert_close(effective, _f64(layer.weight) + s * (live_ba[n] - snap_ba[n]), atol=1e-6, rtol=0)
        assert (live_ba[n] - snap_ba[n]).abs().max() > 1e-3  # the heads did move after their snapshots
        if fold:
            torch.testing.assert_close(_f64(layer.folded), _f64(layer.weight) - s * _f64(layer.v_B) @ _f64(layer.v_A),
                                       atol=1e-6, rtol=0)
    base_reps = model.base_replicas()
    for n, p in model.replica_parameters():
        torch.testing.assert_close(_f64(base_reps[n]), torch.einsum("h,h...->...", w, snap_rep[n]), atol=1e-6, rtol=0)
        torch.testing.assert_close(_f64(p) - _f64(base_reps[n]), live_rep[n] - snap_rep[n], atol=1e-6, rtol=0)


# ----- (c) the simulator at delay d equals single-head peers that apply commit k d steps after snapshot k ----------
def _replay(spec: RunSpec, data, keep_progress: bool = True) -> tuple[list[float], float]:
    """N HeadTrainers, each on its slice of the simulator's batch, merging as network peers do: at every multiple
    of T each snapshots and trains on; d steps later each applies the commit of all snapshots with its own."""
    T, d, n = spec.lte.merge_every, spec.lte.merge_delay, spec.lte.heads
    torch.manual_seed(spec.seed)
    base = create_base_model(spec.model)  # the same init as train()'s, which seeds the same way first
    b = spec.data.batch_size // n
    stream = batches(data[0], spec.data.batch_size, spec.seed)
    shared = [next(stream) for _ in range(spec.optim.steps)]
    peers = []
    for h in range(n):
        t = HeadTrainer(spec, copy.deepcopy(base), f"head{h:03d}", data[0], b)
        t.stream = iter([(x[h * b:(h + 1) * b], y[h * b:(h + 1) * b]) for x, y in shared])
        peers.append(t)
    losses, in_flight = [], None
    for step in range(spec.optim.steps):
        losses.append(sum(p.train_steps(1)[1] for p in peers) / n)
        if in_flight is not None and step + 1 == in_flight[0]:
            update = merge_contributions([s.contribution() for s in in_flight[1]], spec.lte.scale)
            for p, snap in zip(peers, in_flight[1]):
                if keep_progress:
                    p.model.apply_merge(update, snapshots=[snap])
                else:  # today's peer: V <- what it sent, replicas <- base, so its progress since is dropped
                    p.model.apply_merge(update, sent=snap.factors)
            in_flight = None
        if (step + 1) % T == 0:
            in_flight = (step + 1 + d, [p.model.snapshot(0) for p in peers])
    # What the simulator evaluates: the base plus every head's pending contribution, merged.
    state = peers[0].model.base_state_dict() | peers[0].model.base_replicas()
    update = merge_contributions([p.model.head_contribution(0) for p in peers], spec.lte.scale)
    for layer, delta in update.deltas.items():
        state[f"{layer}.weight"] = (state[f"{layer}.weight"].double() + delta).float()
    state |= {k: v.float() for k, v in update.replicas.items()}
    vanilla = timm.create_model(spec.model.name, pretrained=False, **spec.model.kwargs)
    vanilla.load_state_dict(state, strict=True)
    return losses, evaluate(vanilla, data[1], "cpu")[1]


@pytest.mark.parametrize("delay", [1, 2])  # T = 2: half a round, and a whole one (the network's schedule)
def test_simulator_at_delay_d_equals_single_head_peers_replay(tiny_spec, delay):
    spec = _spec(tiny_spec, merge_delay=delay)
    data = load_datasets(spec.data, spec.seed)
    sim = train(spec, "lte", progress=False, datasets=data)
    losses, test_loss = _replay(spec, data)
    assert sim["merges"] == spec.optim.steps // spec.lte.merge_every - 1  # the last round is still in flight
    torch.testing.assert_close(torch.tensor(sim["loss_curve"]), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    assert sim["test_loss"] == pytest.approx(test_loss, rel=1e-4, abs=1e-5)
    # The comparison has teeth: peers that drop their in-flight progress (synchronous bookkeeping at the same
    # schedule) end measurably elsewhere.
    dropped, dropped_test = _replay(spec, data, keep_progress=False)
    assert abs(dropped_test - test_loss) > 1e-3 and max(abs(a - b) for a, b in zip(dropped, losses)) > 1e-3


# ----- (d) a head left out of a commit keeps both rounds' progress -------------------------------------------------
def test_left_out_head_carries_both_rounds_into_its_next_contribution(tiny_spec):
    spec = _spec(tiny_spec)
    model = prepare_model(create_base_model(spec.model), spec.lte, run_seed=5)
    _train_a_little(model, spec, 3, seed=1)
    model.merge()
    old_v = {n: (l.v_A[2].clone(), l.v_B[2].clone()) for n, l in model.layers.items()}
    old_base = {n: t.clone() for n, t in model.base_replicas().items()}
    _train_a_little(model, spec, 2, seed=2)
    snaps = model.snapshots()
    _train_a_little(model, spec, 2, seed=3)
    live = {n: (l.lora_A[2].clone(), l.lora_B[2].clone()) for n, l in model.layers.items()}
    live_rep = {n: p[2].clone() for n, p in model.replica_parameters()}

    model.merge_snapshots(snaps[:2])  # head 2's contribution did not make it into this commit

    mine = model.head_contribution(2)
    for n, layer in model.layers.items():
        assert torch.equal(layer.v_A[2], old_v[n][0]) and torch.equal(layer.v_B[2], old_v[n][1])
        # Its delta B A - V reaches back to its last merged round: both rounds' progress, none of it lost.
        expected = _f64(live[n][1]) @ _f64(live[n][0]) - _f64(old_v[n][1]) @ _f64(old_v[n][0])
        torch.testing.assert_close(_f64(mine.factors[n][1]) @ _f64(mine.factors[n][0])
                                   - _f64(mine.prev_factors[n][1]) @ _f64(mine.prev_factors[n][0]), expected)
        assert expected.abs().max() > 1e-3
        if spec.lte.fold:
            torch.testing.assert_close(layer.folded[2], layer.weight - spec.lte.scale * layer.v_B[2] @ layer.v_A[2])
    for n, p in model.replica_parameters():
        # Its replicas sit on the new base with the offset they had from the old one.
        torch.testing.assert_close(p[2] - model.base_replicas()[n], live_rep[n] - old_base[n], atol=1e-6, rtol=0)
    assert any(not torch.equal(model.base_replicas()[n], old_base[n]) for n in old_base)  # the base did move


# ----- the spec field ----------------------------------------------------------------------------------------------
def test_merge_delay_validation_and_hash(tiny_spec):
    # Left out of the hash at its default, so every existing run's hash (and checkpoint) stays valid: the hash is
    # the one spec_hash gave before the field existed.
    assert tiny_spec.spec_hash() == hash_before_later_fields(tiny_spec)
    assert _spec(tiny_spec, merge_delay=2).spec_hash() != _spec(tiny_spec, merge_delay=0).spec_hash()
    with pytest.raises(ConfigError, match="merge_delay=3 is larger than merge_every=2"):
        _spec(tiny_spec, merge_delay=3)
    with pytest.raises(ConfigError, match="reset-less rule"):
        _spec(tiny_spec, merge_delay=1, reset=True)
    with pytest.raises(ConfigError, match="greater than or equal to 0"):
        _spec(tiny_spec, merge_delay=-1)
    with pytest.raises(ConfigError, match="method lte only"):
        train(_spec(tiny_spec, merge_delay=1), "diloco", progress=False)


def test_lte_sim_runs_a_delay(tmp_path, capsys):
    import yaml
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"batch_size": 24},
                                   "lte": {"heads": 3, "rank": 4, "alpha": 16, "merge_every": 3},
                                   "optim": {"steps": 7, "warmup_steps": 1}, "eval_every": 100}))
    out = tmp_path / "r.json"
    assert sim_main(["--config", str(cfg), "--set", "lte.merge_delay=3", "--no-progress", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    # Snapshots at steps 3 and 6; the first one's merge lands at 6, the second would land after the run.
    assert result["spec"]["lte"]["merge_delay"] == 3 and result["merges"] == 1
    assert sim_main(["--config", str(cfg), "--set", "lte.merge_delay=4", "--no-progress"]) == 2
    assert "merge_delay=4 is larger than merge_every=3" in capsys.readouterr().err
