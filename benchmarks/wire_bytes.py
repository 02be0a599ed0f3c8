"""Bytes of a round per wire format for ViT-S at rank 32 (issue 13): what one peer receives, how long that takes on
a home link, and what data-parallel training would move for the same samples.

    .venv/bin/python benchmarks/wire_bytes.py [--peers 4 8 16] [--rank 32] [--merge-every 10 50 100] [--mbit 20 100]

The factor bytes are measured, not assumed: one head's real factors (timm's vit_small_patch16_224, pretrained=False,
224x224, 1000 classes, LoRA on every linear layer but the classifier, one training-free head with B set to random
values so that int8 blocks are not all zero) are encoded by the transport's own `encode` and their serialized
payload counted. A steady round then makes a peer receive (M - 1)(F + R) (docs/protocol.md): the other members'
factors F and replicas R (fp32 always). Data-parallel all-reduce moves 2 (M - 1) / M x 4P bytes per step and peer.
"Link s" is the time those bytes take at the given rate (payload only); the step time below which the link, not
compute, sets the pace of a pipelined peer is link s / T.
"""
from __future__ import annotations

import math

import torch
from common import banner, machine, parse, parser, table, write_json

from lte.config import load_spec
from lte.costs import data_parallel_bytes
from lte.lora import prepare_model
from lte.models import create_base_model
from lte.net.blobstore import encode
from lte.wire import Layout, pack_factors

WIRES = ("raw", "fp16", "int8")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/digits.yaml", help="the spec the ViT-S variant is derived from")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--merge-every", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--mbit", type=float, nargs="+", default=[20.0, 100.0])
    args = parse(ap)
    banner(f"Bytes per round by wire format, ViT-S rank {args.rank}", args.quick)
    spec = load_spec(args.config)
    model_spec = spec.model.model_copy(update={"name": "vit_small_patch16_224", "kwargs": {}})
    torch.manual_seed(0)
    base = create_base_model(model_spec)
    params = sum(p.numel() for p in base.parameters())
    lte = spec.lte.model_copy(update={"heads": 1, "rank": args.rank, "alpha": 2.0 * args.rank})
    model = prepare_model(base, lte, spec.seed)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.normal_(0, 1e-3)
    layout = Layout.of(model)
    factors = pack_factors(model, layout)
    replica_bytes = 4 * sum(math.prod(s) for s in layout.replica_shapes)
    measured = {w: sum(len(p.buffer) for p in encode(factors, w)) for w in WIRES}
    f_values = layout.factor_numel()

    rows = [[w, f"{measured[w] / 2**20:.2f}", f"{measured[w] / f_values:.4f}", f"{measured['raw'] / measured[w]:.2f}x"]
            for w in WIRES]
    text = [f"ViT-S: {params / 1e6:.1f}M parameters; {len(layout.layers)} LoRA layers, {f_values / 1e6:.2f}M factor "
            f"values, {replica_bytes / 2**20:.2f} MiB of replicas (fp32)\n",
            table(["wire", "factors MiB", "bytes / value", "fewer than raw"], rows)]
    cases = []
    rows = []
    for m in args.peers:
        dp_step = data_parallel_bytes(params, 1, m)
        for w in WIRES:
            per_round = (m - 1) * (measured[w] + replica_bytes)
            links = {r: per_round * 8 / (r * 1e6) for r in args.mbit}
            ratios = {t: t * dp_step / per_round for t in args.merge_every}
            cases.append({"peers": m, "wire": w, "bytes_per_round": per_round, "link_s": links,
                          "dp_bytes_per_step": dp_step, "dp_over_lte_at_T": ratios})
            rows.append([m, w, f"{per_round / 2**20:.1f}"] + [f"{links[r]:.1f}" for r in args.mbit]
                        + [f"{ratios[t]:.0f}x" for t in args.merge_every]
                        + [f"{1000 * links[args.mbit[0]] / t:.0f}" for t in args.merge_every])
    headers = (["peers", "wire", "MiB / peer / round"] + [f"link s @ {r:g} Mbit/s" for r in args.mbit]
               + [f"DP bytes / LTE bytes, T={t}" for t in args.merge_every]
               + [f"link-bound below ms/step @ {args.mbit[0]:g} Mbit/s, T={t}" for t in args.merge_every])
    text.append(table(headers, rows))
    print("\n".join(text))
    write_json(args.out_dir, "wire_bytes", {"machine": machine("cpu"), "params": params, "factor_values": f_values,
                                            "replica_bytes": replica_bytes, "factor_bytes": measured,
                                            "cases": cases, "table": "\n".join(text)})


if __name__ == "__main__":
    main()
