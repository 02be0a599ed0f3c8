"""Memory: the training state an LTE peer holds vs standard AdamW training, counted from the tensors, and peak RSS.

    .venv/bin/python benchmarks/memory.py [--steps 2] [--device cpu|cuda] [--quick]

For the digits tiny ViT (configs/digits.yaml) and timm's vit_small_patch16_224 (pretrained=False, 224x224, 22M
parameters), each case trains a few steps and then counts the bytes of every tensor it holds for training: model
parameters and buffers, gradients and AdamW state, each storage once. The LTE peer is `lte.train.HeadTrainer`, what
`lte-peer` runs (one head, rank 32, folded by default; `lte.fold: false` drops the folded copy of the frozen
weights). The bf16 and int8 cases are `lte-peer join --base-dtype bf16|int8`: the frozen weights on the device in
that dtype (unfolded), the fp32 master of the base in host memory, shown apart because it is not on the training
device (on a CPU-only peer the device is the host, and it adds back). Target (issue 5): at most 0.4x of full
training.

Peak RSS comes from a fresh subprocess per case (the kernel's VmHWM, or the CUDA allocator's peak with --device
cuda). The Python/torch runtime alone is several hundred MB, so the child resets the peak mark after its imports
and the table also shows what building and training added on top of the runtime.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict

import torch
from torch.utils.data import Dataset, TensorDataset

from common import StepTrainer, banner, machine, parse, parser, pyplot, save_figure, table, write_json
from lte.config import ModelSpec, RunSpec, load_spec
from lte.data import load_datasets
from lte.lora import LoRALinear
from lte.models import create_base_model
from lte.train import HeadTrainer

TARGET = 0.4
MODELS = {  # name: (timm model replacing the config's, batch, input shape, classes)
    "digits tiny ViT": (None, 16, None, 10),
    "ViT-S/16 224": (ModelSpec(name="vit_small_patch16_224"), 2, (3, 224, 224), 1000),
}
BASE_DTYPE_CASES = {"LTE peer (bf16 base)": "bf16", "LTE peer (int8 base)": "int8"}
CASES = ("full AdamW", "LTE peer (folded)", "LTE peer (fold: false)", *BASE_DTYPE_CASES)


def spec_for(model_name: str) -> RunSpec:
    spec = load_spec("configs/digits.yaml")
    other = MODELS[model_name][0]
    return spec if other is None else spec.model_copy(update={"model": other})


def data_for(model_name: str) -> Dataset:
    _, batch, shape, classes = MODELS[model_name]
    if shape is None:
        return load_datasets(spec_for(model_name).data, 0)[0]
    # random pixels: memory does not depend on the content
    return TensorDataset(torch.randn(4 * batch, *shape), torch.randint(0, classes, (4 * batch,)))


def build(model_name: str, case: str, device: str, data: Dataset):
    """(model, optimizer, one-step function) for a case; the step is the training loop's body."""
    batch, spec = MODELS[model_name][1], spec_for(model_name)
    if case == "full AdamW":
        trainer = StepTrainer(spec, create_base_model(spec.model), "full", data, batch, device)
        return trainer.model, trainer.opt, lambda: trainer.train_steps(1)
    fold = case == "LTE peer (folded)"  # a low-precision base always runs unfolded (lte/lora.py)
    spec = spec.model_copy(update={"lte": spec.lte.model_copy(update={"fold": fold})})
    trainer = HeadTrainer(spec, create_base_model(spec.model), "peer-0", data, batch, device,
                          BASE_DTYPE_CASES.get(case, "fp32"))
    return trainer.model, trainer.opt, lambda: trainer.train_steps(1)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the training state by kind, each storage counted once (the first kind that claims it)."""
    seen: set[int] = set()
    out: dict[str, int] = defaultdict(int)

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return
        seen.add(st.data_ptr())
        out[kind] += st.nbytes()

    for m in model.modules():
        if isinstance(m, LoRALinear):
            add("frozen base weights", m.weight)
            add("frozen base weights", m.weight_scale)  # int8: one scale per output row
            add("folded copy W - sV", m.folded)
            add("previous factors V", m.v_A)
            add("previous factors V", m.v_B)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for p in trainable:
        add("trainable parameters", p)
    for p in model.parameters():
        add("frozen base weights", p)  # parameters outside the optimizer (none in these cases)
    for b in model.buffers():
        add("other buffers", b)
    for p in trainable:
        add("gradients", p.grad)
    for st in opt.state.values():
        for v in st.values():
            add("AdamW state", v)
    return dict(out)


def host_master_bytes(model: torch.nn.Module) -> int:
    """The fp32 master of a low-precision base: host memory, not the training device's (0 for an fp32 base)."""
    master = getattr(model, "master", None) or {}
    return sum(t.untyped_storage().nbytes() for t in master.values())


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(model_name: str, case: str, steps: int, device: str) -> None:
    """Runs in a fresh process: build the case, train `steps` steps, print what that added to the peak as JSON.

    The libraries are imported and the data loaded before measuring; the kernel's peak-RSS mark is then reset
    (clear_refs 5), so the peak is that of building and training, not of importing torch."""
    torch.set_num_threads(1)
    data = data_for(model_name)
    runtime = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak = lambda: torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024  # noqa: E731
    _, _, step = build(model_name, case, device, data)
    built = peak()  # converting a model copies its weights: this peak can exceed training's
    for _ in range(steps):
        step()
    print(json.dumps({"runtime_bytes": 0 if device == "cuda" else runtime, "peak_bytes": peak(),
                      "peak_after_build_bytes": built}))


def peak_in_subprocess(model_name: str, case: str, steps: int, device: str) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--child", model_name, case, "--steps", str(steps), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, help="training steps before counting (default 2; quick 1)")
    # internal: one case in a fresh process
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parse(ap)
    args.steps = args.steps or (1 if args.quick else 2)
    if args.child:
        child(*args.child, args.steps, args.device)
        return
    torch.set_num_threads(1)
    banner(f"Memory: training state per peer after {args.steps} steps", args.quick)
    mb = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    rows, rss_rows, results = [], [], []
    for model_name in MODELS:
        counts, masters = {}, {}
        for case in CASES:
            model, opt, step = build(model_name, case, args.device, data_for(model_name))
            for _ in range(args.steps):
                step()
            counts[case], masters[case] = state_bytes(model, opt), host_master_bytes(model)
            del model, opt, step
        full_total = sum(counts["full AdamW"].values())
        for case, c in counts.items():
            total = sum(c.values())
            top = max(c, key=c.get)
            verdict = "" if case == "full AdamW" else ("met" if total / full_total <= TARGET else "NOT met")
            rows.append([model_name, case, mb(total), f"{total / full_total:.3f}", verdict,
                         f"{top} ({c[top] / total:.0%})", mb(masters[case]) if masters[case] else "—"])
            results.append({"model": model_name, "case": case, "bytes": c, "total": total, "ratio": total / full_total,
                            "host_master_bytes": masters[case]})
        if args.quick and model_name != "digits tiny ViT":
            continue  # quick: tensors only for the big model, no subprocesses
        peaks = {case: peak_in_subprocess(model_name, case, args.steps, args.device) for case in CASES}
        full_extra = peaks["full AdamW"]["peak_bytes"] - peaks["full AdamW"]["runtime_bytes"]
        for case, pk in peaks.items():
            extra = pk["peak_bytes"] - pk["runtime_bytes"]
            rss_rows.append([model_name, case, mb(pk["peak_bytes"]), mb(extra), f"{extra / full_extra:.3f}",
                             mb(pk["peak_after_build_bytes"] - pk["runtime_bytes"])])
            next(r for r in results if r["model"] == model_name and r["case"] == case).update(**pk)
    print()
    text1 = table(["model", "case", "training state MiB", "ratio to full (target <= 0.4)", "target", "largest part",
                   "+ fp32 master in host memory MiB"], rows)
    print()
    peak_name = "CUDA peak allocated" if args.device == "cuda" else "peak RSS"
    text2 = table(["model", "case", f"{peak_name} MiB", "added by model + training MiB", "ratio to full",
                   "peak after building MiB"], rss_rows)
    print("\nbreakdown (MiB):")
    kinds = sorted({k for r in results for k in r["bytes"]})
    text3 = table(["model", "case"] + kinds, [[r["model"], r["case"]] + [mb(r["bytes"].get(k, 0)) for k in kinds]
                                             for r in results])

    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, len(MODELS), figsize=(10, 3.2))
        for ax, model_name in zip(axes, MODELS):
            rs = [r for r in results if r["model"] == model_name]
            left = [0.0] * len(rs)
            for k in kinds:
                vals = [r["bytes"].get(k, 0) / 2**20 for r in rs]
                ax.barh([r["case"] for r in rs], vals, left=left, label=k)
                left = [a + b for a, b in zip(left, vals)]
            ax.set(title=model_name, xlabel="MiB")
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
        axes[-1].legend(fontsize=6, loc="lower right")
        save_figure(fig, args.out_dir, "memory")
    write_json(args.out_dir, "memory", {"machine": machine(args.device), "quick": args.quick, "steps": args.steps,
                                         "results": results, "tables": [text1, text2, text3], "target": TARGET})


if __name__ == "__main__":
    main()
