"""One training loop for every method the simulator compares: full, lora, mhlora and lte.

Read it top to bottom: build data and model, build AdamW, then step; LTE (and the DiLoCo baseline) differ from the
rest by one line, the merge every T steps.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from lte.config import RunSpec
from lte.data import batches, eval_loader, load_datasets
from lte.errors import ConfigError
from lte.lora import BaseDType, LTEModel, Snapshot, head_seed, mhlora_model, prepare_model
from lte.models import create_base_model

Method = Literal["full", "lora", "mhlora", "lte", "diloco"]
METHODS: tuple[str, ...] = ("full", "lora", "mhlora", "lte", "diloco")


def warmup_cosine(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class DiLoCoModel(nn.Module):
    """The DiLoCo-style baseline (Douillard et al., 2023): N workers each train a full dense copy on their B/N slice
    of the batch; every T steps the group averages the dense parameter deltas and applies them to the shared model
    with an outer Nesterov SGD, then every worker restarts from the new shared model.

    It uses LTE's data conventions (one cumulative batch split across `lte.heads` workers, T = `lte.merge_every`),
    so the two differ only in what a worker trains and sends: a dense copy instead of low-rank factors.
    """

    def __init__(self, model: nn.Module, workers: int, outer_lr: float, outer_momentum: float):
        super().__init__()
        self.heads = workers
        self.workers = nn.ModuleList(copy.deepcopy(model) for _ in range(workers))
        self.net = model  # the shared model: what eval sees and the outer optimizer updates
        self.net.requires_grad_(False)  # only ever changed by the outer step, never by backprop
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.outer: torch.optim.Optimizer | None = None  # built at the first merge, after .to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.net(x)
        if x.shape[0] % self.heads:
            raise ValueError(f"batch of {x.shape[0]} does not split across {self.heads} workers")
        return torch.stack([w(xi) for w, xi in zip(self.workers, x.chunk(self.heads))])

    @torch.no_grad()
    def merge(self) -> None:
        """Outer step: the outer gradient is shared minus the workers' mean (DiLoCo's "pseudo-gradient")."""
        shared = list(self.net.parameters())
        if self.outer is None:
            self.outer = torch.optim.SGD(shared, lr=self.outer_lr, momentum=self.outer_momentum,
                                         nesterov=self.outer_momentum > 0)  # torch refuses Nesterov without momentum
        for g, *ws in zip(shared, *(w.parameters() for w in self.workers)):
            g.grad = g - torch.stack(ws).mean(0)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for w in self.workers:
            for wp, g in zip(w.parameters(), shared):
                wp.copy_(g)


def build_model(spec: RunSpec, method: Method, base_dtype: BaseDType = "fp32") -> nn.Module:
    """`base_dtype` (bf16, int8: the frozen base held in low precision, see LTEModel) applies to the LoRA methods."""
    base = create_base_model(spec.model)
    if base_dtype != "fp32" and method in ("full", "diloco"):
        raise ValueError(f"method {method} trains its base weights: it has no frozen base to hold in {base_dtype}")
    if method == "full":
        return base
    if method == "diloco":
        return DiLoCoModel(base, spec.lte.heads, spec.optim.outer_lr, spec.optim.outer_momentum)
    if method == "lora":
        return prepare_model(base, spec.lte.model_copy(update={"heads": 1}), spec.seed, base_dtype=base_dtype)
    if method == "mhlora":
        return mhlora_model(base, spec.lte, spec.seed, base_dtype)
    return prepare_model(base, spec.lte, spec.seed, base_dtype=base_dtype)


def param_groups(model: nn.Module, spec: RunSpec, method: Method) -> list[dict[str, Any]]:
    """AdamW groups. Decay applies to matrices (LoRA factors, dense weights), not to norms, biases or tokens."""
    o = spec.optim
    if isinstance(model, DiLoCoModel):
        model = model.workers  # the inner AdamW trains the workers; the outer SGD owns the shared copy
    if not isinstance(model, LTEModel):
        mats = [p for p in model.parameters() if p.dim() >= 2 and p.numel() > p.shape[-1]]
        rest = [p for p in model.parameters() if not (p.dim() >= 2 and p.numel() > p.shape[-1])]
        return [dict(params=mats, lr=o.full_lr, weight_decay=o.weight_decay),
                dict(params=rest, lr=o.full_lr, weight_decay=0.0)]
    rlr = o.replica_lr or o.lr
    # Replicas carry a leading head dimension; decide on the per-head shape.
    mats = [p for _, p in model.replica_parameters() if p[0].dim() >= 2 and p[0].numel() > p[0].shape[-1]]
    ids = {id(p) for p in mats}
    rest = [p for _, p in model.replica_parameters() if id(p) not in ids]
    return [dict(params=list(model.factor_parameters()), lr=o.lr, weight_decay=o.weight_decay),
            dict(params=mats, lr=rlr, weight_decay=o.weight_decay),
            dict(params=rest, lr=rlr, weight_decay=0.0)]


def head_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean loss: heads stay independent, exactly as N separate peers would be."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), y)
    n, b = logits.shape[:2]
    # Labels come split like the batch (one slice per head) or, when every head saw the whole batch, once.
    y = y.view(n, b) if y.numel() == n * b else y.expand(n, b)
    per = F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1), reduction="none")
    return per.view(n, b).mean(1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: str) -> tuple[float, float]:
    """(accuracy, mean loss) of the merged model on a held-out set."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in eval_loader(dataset):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total, loss / total


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def train(spec: RunSpec, method: Method, device: str = "cpu", progress: bool = True,
          datasets: tuple[Dataset, Dataset] | None = None, base_dtype: BaseDType = "fp32",
          participation: float = 1.0) -> dict[str, Any]:
    """Train `method` on `spec` and return the result record the simulator prints and saves.

    `participation` < 1 emulates a network where peers miss rounds: each round merges each head with that
    probability (at least one head), and a head left out keeps its progress and its samples for its next round."""
    pipelined = spec.lte.merge_delay or spec.lte.round_samples or participation < 1
    if pipelined and method != "lte":  # pipelined rounds are LTE's bookkeeping (LTEModel.load_base)
        raise ConfigError(f"lte.merge_delay, lte.round_samples and participation apply to method lte only, not {method}")
    # LTE over a lossy wire (lte.wire) merges snapshots at delay 0 too: their factors are the decoded ones and V
    # becomes them. (The DiLoCo baseline's pseudo-gradients are not coded yet: it ignores lte.wire.)
    by_snapshots = pipelined or (method == "lte" and spec.lte.wire != "raw")
    if not 0 < participation <= 1:
        raise ConfigError(f"participation must be in (0, 1], not {participation}")
    torch.manual_seed(spec.seed)
    train_ds, test_ds = datasets or load_datasets(spec.data, spec.seed)
    model = build_model(spec, method, base_dtype).to(device)
    opt = torch.optim.AdamW(param_groups(model, spec, method), betas=spec.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(spec.optim.warmup_steps, spec.optim.steps))
    stream: Iterable = batches(train_ds, spec.data.batch_size, spec.seed)
    heads = model.heads if isinstance(model, (LTEModel, DiLoCoModel)) else 1
    T, delay = spec.lte.merge_every, spec.lte.merge_delay
    in_flight: tuple[int, list[Snapshot]] | None = None  # (step at which it lands, the snapshots it merges)
    pending = [0.0] * heads  # each head's samples since its last snapshot (what its next contribution weighs)
    members = random.Random(f"participation-{spec.seed}")
    losses, evals, merges = [], [], 0
    t0 = time.perf_counter()
    bar = tqdm(range(spec.optim.steps), desc=method, disable=not progress, dynamic_ncols=True)
    for step in bar:
        loss = optimizer_step(model, opt, sched, next(stream), device)
        # Pipelined rounds: the merge of round k's snapshots lands `delay` steps after them, and before round
        # k+1's snapshot (delay <= T), so every round's snapshots share one base version.
        pending = [n + spec.data.batch_size / heads for n in pending]
        if in_flight is not None and step + 1 == in_flight[0]:
            model.merge_snapshots(in_flight[1], spec.lte.round_samples)
            in_flight, merges = None, merges + 1
        if method in ("lte", "diloco") and (step + 1) % T == 0:
            if by_snapshots:
                chosen = [h for h in range(heads) if members.random() < participation] or [members.randrange(heads)]
                snaps = [model.snapshot(h, pending[h]) for h in chosen]
                for h in chosen:
                    pending[h] = 0.0
                if delay:
                    in_flight = (step + 1 + delay, snaps)
                else:
                    model.merge_snapshots(snaps, spec.lte.round_samples)
                    merges += 1
            else:
                model.merge()
                merges += 1
        losses.append(loss / heads)
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.optim.steps:
            acc, tloss = evaluate(model, test_ds, device)
            evals.append({"step": step + 1, "samples": (step + 1) * spec.data.batch_size,
                          "test_accuracy": acc, "test_loss": tloss})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{acc:.3f}")
    wall = time.perf_counter() - t0
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {
        "method": method, "run": spec.run, "spec_hash": spec.spec_hash(), "device": device, "base_dtype": base_dtype,
        "test_accuracy": evals[-1]["test_accuracy"], "test_loss": evals[-1]["test_loss"],
        "steps": spec.optim.steps, "samples_seen": spec.optim.steps * spec.data.batch_size,
        "merges": merges, "wall_time_s": wall, "steps_per_s": spec.optim.steps / wall,
        "trainable_parameters": trainable, "loss_curve": losses, "eval_curve": evals,
        "spec": spec.model_dump(mode="json"),
    }


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   batch: tuple[torch.Tensor, torch.Tensor], device: str) -> float:
    """One step of a peer's training (and of the benchmarks' reference step, so both time the same code)."""
    x, y = batch[0].to(device), batch[1].to(device)
    with autocast(device):
        logits = model(x)
    loss = head_loss(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


class HeadTrainer:
    """One LTE head on one data shard: what a network peer runs between merges.

    The simulator's equivalence check builds the same object, so a network run can be replayed in one process.
    """

    def __init__(self, spec: RunSpec, base_model: nn.Module, head_id: str, train_set: Dataset, batch_size: int,
                 device: str = "cpu", base_dtype: BaseDType = "fp32",
                 stream: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`stream` replaces the batches drawn from `train_set` (a peer that trains on the run's shards, which it
        fetches as it goes, passes their stream)."""
        self.spec, self.device, self.batch_size = spec, device, batch_size
        one = spec.lte.model_copy(update={"heads": 1})
        self.model = prepare_model(base_model, one, spec.seed, head_ids=[head_id], base_dtype=base_dtype).to(device)
        self.opt = torch.optim.AdamW(param_groups(self.model, spec, "lte"), betas=spec.optim.betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(spec.optim.warmup_steps, spec.optim.steps))
        self.stream = stream if stream is not None else batches(train_set, batch_size, head_seed(spec.seed, head_id))
        self.steps = 0

    def train_steps(self, n: int, progress: bool = False, desc: str = "",
                    between: Callable[[], None] | None = None, position: int | None = None) -> tuple[int, float]:
        """Run `n` optimizer steps; returns (samples processed, mean loss). `between()` runs after each step: the
        one moment a commit may change the base under a head without tearing a step apart. `position` sets where
        in the run's learning-rate schedule the first step is (the steps after it follow on); by default the
        schedule advances one step per step this head took."""
        if position is not None:
            for group, base, at in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
                group["lr"] = base * at(position)
        total = 0.0
        for _ in tqdm(range(n), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            total += optimizer_step(self.model, self.opt, self.sched, next(self.stream), self.device)
            self.steps += 1
            if between is not None:
                between()
        return n * self.batch_size, total / max(1, n)
