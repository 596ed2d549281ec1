"""Engine speed, side by side in one run, against what a user could write instead.

- **sequential floor** (the headline): one forward that hooks the layers, then one
  ``torch.autograd.grad(logits[:, c].sum(), activations, retain_graph=True)`` per label: the ten
  lines a user writes to get every layer's gradient for every label, with no map computed at all.
- **batched floor**: the same forward, then one ``torch.autograd.grad(..., is_grads_batched=True)``
  for all labels.
- **pytorch-grad-cam loop**: one ``GradCAM`` object per layer, one call per label (1 run).
- **camscope**: ``CamEngine.explain`` for all layers x all labels, GradCAM + LayerCAM (the issue's
  measure) and all three algorithms, with the default ``strategy="auto"``; then each gradient
  strategy named explicitly, bf16 autocast (opt-in) and, with ``--compile``, ``torch.compile``.

Each round runs every contender once, in a shuffled order (seeded); times are medians over rounds, and each ratio is the
median of the per-round ratios (robust when other work shares the machine), in wall time and in
this process's CPU time (which other processes on a shared machine disturb far less). Opt-in variants also
report how far their maps are from the float32 maps: per layer, the largest absolute difference over
the layer's largest float32 value (the contract's "float tolerance" measure, < 1e-3 for float32) and
the relative L2 error; the worst layer is shown.

    python benchmarks/engine_bench.py [--rounds 7] [--models resnet18,small_cnn,vit_b_16] [--compile]

Writes benchmarks/results/engine.md (the README's table) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camscope import CamEngine
from host import cpu_name

RESULTS = Path(__file__).parent / "results"
RESNET_BLOCKS = ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
TWO_ALGORITHMS = ["gradcam", "layercam"]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


@dataclass
class Case:
    """One row of the table: a model, the layers explained and the input."""

    name: str
    build: Callable[[], nn.Module]
    layers: list[str] | None  # None: every layer camscope finds by default
    input_shape: tuple[int, ...]
    loop: bool = True  # time the pytorch-grad-cam loop (False: skip it where it would take many minutes)
    reshape_transform: Callable | None = None
    variants: tuple[str, ...] = ("strategy=sequential", "strategy=folded", "strategy=batched",
                                 "dtype=bfloat16 (autocast)")  # of VARIANTS, timed beside the default
    note: str = ""  # what the report says about this row


CASES = {
    "resnet18": Case("resnet18", lambda: torchvision.models.resnet18().eval(), RESNET_BLOCKS, (8, 3, 160, 160)),
    "small_cnn": Case("small_cnn", small_cnn, ["0", "3", "6", "8"], (8, 3, 64, 64)),
    # Every layer camscope finds (layers=None), the floors hooked on the same ones; B=8, 112 px (7x7 tokens).
    "vit_b_16": Case(
        "vit_b_16", lambda: vit_b_16(112), None, (8, 3, 112, 112), loop=False,
        variants=("strategy=folded, gradient_budget=2**30",),
        note="vit_b_16: every layer camscope finds by default (each encoder block and its sub-modules: "
             "137 layers), the floors hooking the same 137; random head (torchvision zero-initialises it). "
             "No pytorch-grad-cam loop: 137 layers x 10 labels forward+backward passes would take hours here. "
             "One label's gradients at 137 layers are 75M values: on CPU the default gradient budget (2**27) "
             "takes the labels one at a time and `auto` is `sequential`, with no probe; on a GPU the default "
             "budget is a quarter of the free memory, so `auto` probes and folds all 10. The variant folds all 10 "
             "labels into one backward with 8x the CPU budget (about 3 GB of gradients).",
    ),
}

#: Timed on a GPU only (``--device cuda``): ResNet-18 at a batch that fills more of a GPU.
GPU_CASES = {
    "resnet18_b64": Case("resnet18_b64", lambda: torchvision.models.resnet18().eval(), RESNET_BLOCKS,
                         (64, 3, 224, 224)),
}
#: Variants timed beside every row on a GPU only.
GPU_VARIANTS = ("strategy=sequential", "strategy=batched", "dtype=float16 (autocast)")

#: Opt-in variants a row may time beside the default engine: name -> CamEngine keyword arguments.
VARIANTS = {
    "strategy=sequential": {"strategy": "sequential"},
    "strategy=folded": {"strategy": "folded"},
    "strategy=batched": {"strategy": "batched"},
    "dtype=bfloat16 (autocast)": {"dtype": torch.bfloat16},
    "dtype=float16 (autocast)": {"dtype": torch.float16},
    "strategy=folded, gradient_budget=2**30": {"strategy": "folded", "gradient_budget": 2**30},
}


def vit_b_16(image_size: int) -> nn.Module:
    """torchvision's ViT-B/16 with a random head (torchvision zero-initialises it: every gradient would be 0)."""
    model = torchvision.models.vit_b_16(image_size=image_size)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


@contextlib.contextmanager
def hooked(model: nn.Module, layers: list[str]):
    """Frozen weights and a list that the layers' outputs are appended to (what a user writes)."""
    modules = dict(model.named_modules())
    acts: list[torch.Tensor] = []
    # a module returning a tuple (attention: output, weights) is explained at its first element, as camscope does
    handles = [modules[n].register_forward_hook(lambda m, i, o: acts.append(o[0] if isinstance(o, tuple) else o))
               for n in layers]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield acts
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def sequential_floor(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int]) -> None:
    """One forward + one autograd.grad per label on the hooked activations; no maps."""
    with hooked(model, layers) as acts:
        logits = model(x.detach().requires_grad_(True))
        for label in labels:
            torch.autograd.grad(logits[:, label].sum(), acts, retain_graph=True)


def batched_floor(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int]) -> None:
    """One forward + one label-batched autograd.grad (is_grads_batched); no maps."""
    with hooked(model, layers) as acts:
        logits = model(x.detach().requires_grad_(True))
        seeds = torch.zeros(len(labels), *logits.shape, device=logits.device)
        seeds[torch.arange(len(labels)), :, torch.tensor(labels)] = 1
        torch.autograd.grad(logits, acts, grad_outputs=seeds, is_grads_batched=True)


def grad_cam_loop(case: Case, model: nn.Module, x: torch.Tensor, labels: list[int]) -> None:
    """What a pytorch-grad-cam user writes for every layer and label."""
    modules = dict(model.named_modules())
    for name in case.layers:
        with GradCAM(model=model, target_layers=[modules[name]], reshape_transform=case.reshape_transform) as cam:
            for label in labels:
                cam(input_tensor=x, targets=[ClassifierOutputTarget(label)] * x.shape[0])


def rounds_of(contenders: dict[str, Callable[[], object]], rounds: int) -> tuple[dict, dict, dict]:
    """Wall and process-CPU seconds per contender per round, after one warm-up call each (which also
    runs any one-time discovery and probe; its wall seconds are the third result). CPU time is far
    less disturbed than wall time by other work on the machine."""
    first = {}
    for name, run in contenders.items():
        start = time.perf_counter()
        run()
        synchronize()
        first[name] = time.perf_counter() - start
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffler = random.Random(0)
    for _ in range(rounds):
        # a fresh order each round: whatever runs right after the batched floor (which frees large
        # buffers) pays for faulting memory back in, about 5% on ResNet-18; shuffling spreads that
        shuffler.shuffle(order)
        for name in order:
            run = contenders[name]
            synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, first


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so that wall time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ratio(times: dict[str, list[float]], name: str, floor: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[floor]))


def map_error(got: dict, reference: dict) -> tuple[float, float]:
    """Worst layer's (max |got - ref| / max ref, ||got - ref|| / ||ref||) over all algorithms."""
    worst_max, worst_l2 = 0.0, 0.0
    for algorithm, layers in reference.items():
        for layer, ref in layers.items():
            diff = got[algorithm][layer] - ref
            worst_max = max(worst_max, float(diff.abs().max() / ref.abs().max().clamp(min=1e-12)))
            worst_l2 = max(worst_l2, float(diff.norm() / ref.norm().clamp(min=1e-12)))
    return worst_max, worst_l2


def bench(case: Case, labels: list[int], rounds: int, with_compile: bool,
          device: str = "cpu") -> tuple[dict, list[dict]]:
    torch.manual_seed(0)
    model = case.build().to(device)
    x = torch.rand(*case.input_shape).to(device)
    if case.layers is None:
        case = dataclasses.replace(case, layers=[layer.name for layer in CamEngine(model, example=x).layers])
    engine = CamEngine(model, layers=case.layers)
    variants = {name: CamEngine(model, layers=case.layers, **VARIANTS[name]) for name in case.variants}
    if with_compile:
        variants["compile=True"] = CamEngine(model, layers=case.layers, compile=True, strategy="sequential")
    contenders: dict[str, Callable[[], object]] = {
        "sequential floor": lambda: sequential_floor(model, case.layers, x, labels),
        "batched floor": lambda: batched_floor(model, case.layers, x, labels),
        "camscope": lambda: engine.explain(x, labels=labels, algorithms=TWO_ALGORITHMS),
        "camscope 3 algorithms": lambda: engine.explain(x, labels=labels),
    }
    for name, variant in variants.items():
        contenders[name] = lambda variant=variant: variant.explain(x, labels=labels, algorithms=TWO_ALGORITHMS)
    compile_s = None
    if with_compile:
        start = time.perf_counter()
        variants["compile=True"].explain(x, labels=labels, algorithms=TWO_ALGORITHMS)
        compile_s = time.perf_counter() - start
    times, cpu, first = rounds_of(contenders, rounds)
    loop_s = None
    if case.loop:
        start = time.perf_counter()
        grad_cam_loop(case, model, x, labels)
        loop_s = time.perf_counter() - start
    median = {name: statistics.median(t) for name, t in times.items()}
    chosen = ", ".join(sorted(set(engine.chosen_strategies.values()))) or "sequential"
    row = {
        "model": case.name,
        "input": "x".join(map(str, case.input_shape)),
        "layers x labels": f"{len(case.layers)} x {len(labels)}",
        "sequential floor (s)": median["sequential floor"],
        "batched floor (s)": median["batched floor"],
        "pytorch-grad-cam loop (s)": loop_s,
        "camscope GradCAM+LayerCAM (s)": median["camscope"],
        "camscope 3 algorithms (s)": median["camscope 3 algorithms"],
        "camscope first call (s)": first["camscope"],
        "strategy (auto)": chosen,
        "vs sequential floor": ratio(times, "camscope", "sequential floor"),
        "vs sequential floor (CPU time)": ratio(cpu, "camscope", "sequential floor"),
        "vs batched floor": ratio(times, "camscope", "batched floor"),
        "speed-up vs loop": loop_s / median["camscope"] if loop_s else None,
    }
    reference = CamEngine(model, layers=case.layers, strategy="sequential").explain(x, labels=labels).maps
    detail = []
    for name, variant in variants.items():
        worst_max, worst_l2 = map_error(variant.explain(x, labels=labels).maps, reference)
        detail.append({
            "model": case.name,
            "variant": name,
            "GradCAM+LayerCAM (s)": median[name],
            "vs sequential floor": ratio(times, name, "sequential floor"),
            "vs sequential floor (CPU time)": ratio(cpu, name, "sequential floor"),
            "vs camscope default": ratio(times, name, "camscope"),
            "worst layer: max error / max": worst_max,
            "worst layer: relative L2": worst_l2,
            "first call incl. compile (s)": compile_s if name == "compile=True" else None,
        })
    return row, detail


def to_markdown(rows: list[dict]) -> str:
    header = [key for key in rows[0] if any(row.get(key) is not None for row in rows)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key.startswith("vs "):
                cells.append(f"**{value:.2f}x**" if key == "vs sequential floor" else f"{value:.2f}x")
            elif key == "speed-up vs loop":
                cells.append(f"{value:.0f}x")
            elif key.startswith("worst"):
                cells.append(f"{value:.1e}")
            elif isinstance(value, float):
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device: str = "cpu") -> str:
    used = torch.cuda.get_device_name() if device == "cuda" else "no GPU used"
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {used}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile on CPU)")
    parser.add_argument("--no-loop", action="store_true", help="skip the pytorch-grad-cam loop (the slowest part)")
    parser.add_argument("--out", default="engine.md", help="result file name in benchmarks/results/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: also times fp16 autocast, and the larger cases of GPU_CASES")
    args = parser.parse_args()
    if args.device == "cuda":
        CASES.update(GPU_CASES)
        for name, case in list(CASES.items()):
            variants = case.variants + tuple(v for v in GPU_VARIANTS if v not in case.variants)
            CASES[name] = dataclasses.replace(case, variants=variants)
    labels = list(range(args.labels))
    load_before = os.getloadavg()
    rows, details = [], []
    for name in args.models.split(","):
        case = CASES[name]
        if args.no_loop:
            case = dataclasses.replace(case, loop=False)
        row, detail = bench(case, labels, args.rounds, args.compile, args.device)
        rows.append(row)
        details.extend(detail)
        text = report(rows, details, args.rounds, load_before, [CASES[n].note for n in args.models.split(",")],
                      args.device)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / args.out).write_text(text)  # after each model, so a long run keeps what it measured
        print(to_markdown([row]), flush=True)
    print(text)


def report(rows: list[dict], details: list[dict], rounds: int, load_before: tuple, notes: list[str],
           device: str = "cpu") -> str:
    load_after = os.getloadavg()
    note = (f"{machine(device)}. Median of {rounds} interleaved rounds (ratios: median of per-round ratios); "
            f"the pytorch-grad-cam loop: 1 run; camscope's first call (layer discovery and, where it probes, "
            f"the strategy probe included): 1 run. Load average (1 min) {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after" + (
                ": other work shared the CPU cores, so absolute times are noisy and the side-by-side ratios "
                "are the numbers to read." if device == "cpu" else
                f"; every call timed with the GPU synchronized before and after ({device}, float32 maps "
                "as the reference of every variant)."))
    return (
        "## All layers x all labels\n\n" + to_markdown(rows)
        + "\n\n## Gradient strategies and opt-in variants (GradCAM + LayerCAM)\n\n" + to_markdown(details)
        + "\n\n" + note + "\n" + "".join(f"\n{text}\n" for text in notes if text)
    )


if __name__ == "__main__":
    main()
