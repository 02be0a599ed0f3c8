"""What validating contributions costs next to merging them (lte/validate.py): tensor checks and update norms of
M contributions, and the coordinator's loss scoring of each on its private scoring set (lte/score.py), against
`merge_contributions` of the same M, on the run's model.

    python benchmarks/validation_cost.py [--config configs/digits.yaml] [--members 3] [--score-size 256]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from lte.config import load_spec
from lte.lora import prepare_model
from lte.merge import merge_contributions
from lte.models import create_base_model
from lte.data import load_datasets
from lte.score import SCORE_SIZE, Scorer, scoring_indices
from lte.validate import check_tensors, update_norm
from lte.wire import Layout, contribution, pack_factors, pack_replicas


def mean_seconds(fn, repeat: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def synthetic_members(spec, m: int) -> tuple[Layout, dict[str, torch.Tensor], list]:
    """The run's layout and base, and `m` trained-looking contributions (random B, each with a V: the steady state)."""
    torch.manual_seed(0)
    model = create_base_model(spec.model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lte_model = prepare_model(copy.deepcopy(model), spec.lte.model_copy(update={"heads": 1}), spec.seed)
    layout = Layout.of(lte_model)
    members = []
    for i in range(m):
        for layer in lte_model.layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)
        factors = pack_factors(lte_model, layout)
        members.append(contribution(layout, f"p{i}", 10, factors, pack_replicas(lte_model, layout), factors))
    return layout, base, members


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--score-size", type=int, default=SCORE_SIZE, help="examples in the scoring set")
    args = ap.parse_args()
    spec = load_spec(args.config)
    layout, base, members = synthetic_members(spec, args.members)
    shapes = dict(zip(layout.layers, layout.factor_shapes))
    checks = mean_seconds(lambda: [check_tensors(l, list(c.factors[l]), shapes[l]) for c in members for l in layout.layers])
    norms = mean_seconds(lambda: [update_norm(c, base) for c in members])
    merge = mean_seconds(lambda: merge_contributions(members, spec.lte.scale))
    train = load_datasets(spec.data, spec.seed)[0]
    idx = scoring_indices(len(train), args.score_size, b"benchmark")
    x, y = (t[idx] for t in train.tensors[:2]) if hasattr(train, "tensors") else \
        (torch.stack([train[i][0] for i in idx]), torch.tensor([int(train[i][1]) for i in idx]))
    model = create_base_model(spec.model)
    scorer = Scorer(model, x, y, spec.lte.scale)
    base_loss = mean_seconds(lambda: scorer.loss(base))
    scorer.base_loss(base, "b")  # once per round
    w = 1.0 / len(members)
    scores = mean_seconds(lambda: [scorer.score(base, "b", c, w) for c in members])
    r = layout.factor_shapes[0][0][0]
    print(f"{spec.model.name} {spec.model.kwargs}: {len(layout.layers)} layers, r = {r}, {args.members} members, "
          f"{torch.get_num_threads()} threads, scoring set of {len(idx)}")
    print(f"| step | ms | x merge |\n|---|---|---|")
    for name, sec in (("tensor checks", checks), ("update norms", norms), ("scoring: base loss (once a round)", base_loss),
                      ("scoring: all members", scores), ("scoring: per member", scores / len(members)),
                      ("merge", merge)):
        print(f"| {name} | {sec * 1e3:.1f} | {sec / merge:.2f} |")


if __name__ == "__main__":
    main()
