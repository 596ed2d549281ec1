"""Engine speed, side by side in one run: camscope vs the pytorch-grad-cam loop a user writes
(one CAM object per layer, one call per label) vs the floor (one forward + the batched backward).

    python benchmarks/engine_bench.py [--size 160] [--batch 8] [--labels 10] [--repeats 3]

Writes benchmarks/results/engine.md (the README's table) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camscope import CamEngine

RESULTS = Path(__file__).parent / "results"
RESNET_BLOCKS = ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def grad_cam_loop(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int]) -> None:
    """What a pytorch-grad-cam user writes for every layer and label."""
    modules = dict(model.named_modules())
    for name in layers:
        with GradCAM(model=model, target_layers=[modules[name]]) as cam:
            for label in labels:
                cam(input_tensor=x, targets=[ClassifierOutputTarget(label)] * x.shape[0])


def floor(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int]) -> None:
    """One forward capturing the layers + one batched backward to them; no maps, no weight grads."""
    modules = dict(model.named_modules())
    acts: list[torch.Tensor] = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: acts.append(o)) for n in layers]
    try:
        with contextlib.ExitStack() as stack:
            for p in model.parameters():
                stack.callback(p.requires_grad_, p.requires_grad)
                p.requires_grad_(False)
            logits = model(x.requires_grad_(True))
            seeds = torch.zeros(len(labels), *logits.shape)
            seeds[torch.arange(len(labels)), :, torch.tensor(labels)] = 1
            torch.autograd.grad(logits, acts, grad_outputs=seeds, is_grads_batched=True)
    finally:
        for h in handles:
            h.remove()


def bench(name: str, model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int], repeats: int) -> dict:
    engine = CamEngine(model, layers=layers)
    camscope_gradcam = timed(lambda: engine.explain(x, labels=labels, algorithms=["gradcam"]), repeats)
    camscope_all = timed(lambda: engine.explain(x, labels=labels), repeats)
    floor_s = timed(lambda: floor(model, layers, x.clone(), labels), repeats)
    loop_s = timed(lambda: grad_cam_loop(model, layers, x, labels), 1)
    return {
        "model": name,
        "input": f"{x.shape[0]}x{x.shape[1]}x{x.shape[2]}x{x.shape[3]}",
        "layers x labels": f"{len(layers)} x {len(labels)}",
        "pytorch-grad-cam loop (s)": loop_s,
        "floor (s)": floor_s,
        "camscope GradCAM (s)": camscope_gradcam,
        "camscope 3 algorithms (s)": camscope_all,
        "speed-up vs loop": loop_s / camscope_gradcam,
        "vs floor": camscope_gradcam / floor_s,
    }


def to_markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key in header:
            value = row[key]
            if key == "speed-up vs loop":
                cells.append(f"**{value:.0f}x**")
            elif key == "vs floor":
                cells.append(f"{value:.2f}x")
            elif isinstance(value, float):
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    labels = list(range(args.labels))
    rows = [
        bench("resnet18", torchvision.models.resnet18().eval(), RESNET_BLOCKS,
              torch.rand(args.batch, 3, args.size, args.size), labels, args.repeats),
        bench("small CNN", small_cnn(), ["0", "3", "6", "8"],
              torch.rand(args.batch, 3, 64, 64), labels, args.repeats),
    ]
    table = to_markdown(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    note = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} (loop: 1 run)."
    (RESULTS / "engine.md").write_text(table + "\n\n" + note + "\n")
    print(table)
    print(note)


if __name__ == "__main__":
    main()
