"""Does Focus LayerCAM focus? Localization and faithfulness of every CAM algorithm at every depth.

On the demo's validation slice (cluttered two-view MNIST, digit bounding box known) and on a second
architecture (torchvision ResNet-18, random init, trained briefly on CPU on the digit's view):

- pointing game and energy pointing game on the view holding the digit, for the ground-truth and
  the predicted label;
- deletion and insertion AUC (predicted label, zeros baseline, only the digit's view perturbed);
- sanity check: Spearman rank correlation between the maps of the model and of its
  weight-randomized copy (low = the maps depend on what the model learned).

Besides the three public algorithms it evaluates Focus LayerCAM design variants (contrastive
target only, deep gating only, both with several gate powers). Writes
``benchmarks/results/focus_eval.{md,csv,json}`` and ``docs/images/focus-*.png``.

Usage::

    .venv/bin/python benchmarks/focus_eval.py            # ~8 min on 2 busy CPU cores (+4 min to train the ResNet once)
    .venv/bin/python benchmarks/focus_eval.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from camscope import CamEngine
from camscope.algorithms import ALGORITHMS, ALGORITHM_TITLES, FocusLayerCAM
from camscope.demo import LABEL_NAMES, RUN_CONFIGS, TRAIN_SIZE, project
from camscope.demo_data import VIEWS, scenes
from camscope.demo_models import cache_dir, cache_path
from camscope.heatmap import overlay
from camscope.metrics import (
    auc,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    pointing_game,
    randomized_copy,
    rank_correlation,
)

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("gradcam", "layercam", "focus_layercam")
#: Focus LayerCAM design candidates besides the shipped one (LayerCAM gated by the deepest map,
#: power 1): a contrastive log p_c target, alone or with the gate, and other gate powers.
VARIANTS = {
    "focus:contrast": FocusLayerCAM(gate_power=0.0, contrastive=True),
    "focus:contrast+gate": FocusLayerCAM(gate_power=1.0, contrastive=True),
    "focus:gate^0.5": FocusLayerCAM(gate_power=0.5),
    "focus:gate^2": FocusLayerCAM(gate_power=2.0),
}
METRICS = {  # column -> (title, higher is better)
    "pointing_gt": ("pointing game (gt label)", True),
    "energy_gt": ("energy pointing game (gt label)", True),
    "pointing_pred": ("pointing game (predicted label)", True),
    "energy_pred": ("energy pointing game (predicted label)", True),
    "deletion_auc": ("deletion AUC (predicted, lower = better)", False),
    "insertion_auc": ("insertion AUC (predicted, higher = better)", True),
    "sanity_spearman": ("rank corr. with randomized model (lower = better)", False),
}


@contextlib.contextmanager
def registered(extra: dict) -> None:
    """Make the variants selectable by key in ``CamEngine.explain`` for the duration of the run."""
    ALGORITHMS.update(extra)
    try:
        yield
    finally:
        for key in extra:
            ALGORITHMS.pop(key, None)


# ----------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """A model under evaluation and how to feed it: ``inputs`` maps scene indices to the engine's
    inputs; the digit's view is the connection ``digit_connection(i)``."""

    name: str
    model: nn.Module
    layers: list[str] | None
    two_view: bool
    engine: CamEngine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = CamEngine(self.model, example=self.inputs(np.array([0])), layers=self.layers)

    def inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        views = torch.from_numpy(scenes().views[idx]).float().div_(255.0)
        if self.two_view:
            return {name: views[:, v : v + 1] for v, name in enumerate(VIEWS)}
        digit = torch.from_numpy(scenes().digit_view[idx])
        return {"x": views[torch.arange(len(idx)), digit][:, None]}

    def digit_connection(self, i: int) -> str:
        return VIEWS[int(scenes().digit_view[i])] if self.two_view else "x"

    def depth_layers(self, connection: str) -> list[tuple[int, str]]:
        """(depth, layer) of the layers that see ``connection``, one per depth: a container whose
        output is its last child's keeps the container (the viewer's choice for that depth)."""
        by_depth: dict[int, str] = {}
        for info in self.engine.layers:
            if connection in info.depth:
                by_depth[info.depth[connection]] = info.name
        return sorted(by_depth.items())

    def single_view_model(self, i: int, inputs: dict[str, torch.Tensor]):
        """A callable of the digit's view alone (the other view of sample ``i`` held fixed)."""
        connection = self.digit_connection(i)
        if not self.two_view:
            return self.model
        others = {name: t for name, t in inputs.items() if name != connection}

        def run(view: torch.Tensor) -> torch.Tensor:
            return self.model(**{connection: view}, **{n: t.expand(len(view), -1, -1, -1) for n, t in others.items()})

        return run


class OneViewResNet(nn.Module):
    """torchvision ResNet-18 (random init) on one 1-channel 64x64 view: ``forward(x) -> logits``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=classes)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


RESNET_LAYERS = ["net.relu", "net.layer1", "net.layer2", "net.layer3", "net.layer4"]


def trained_resnet(steps: int, batch_size: int = 32, seed: int = 0) -> tuple[OneViewResNet, float]:
    """Train (or load from the cache) the ResNet on the train slice's digit views; returns it and
    the training seconds."""
    key = hashlib.sha256(f"{scenes().digest}-{steps}-{batch_size}-{seed}-v1".encode()).hexdigest()[:16]
    path = cache_dir() / f"focus-resnet18-{key}.safetensors"
    model = OneViewResNet()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), float(json.loads(path.with_suffix(".json").read_text())["seconds"])
    torch.manual_seed(seed)
    data = scenes()
    idx = np.arange(TRAIN_SIZE)
    x = torch.from_numpy(data.views[idx, data.digit_view[idx]][:, None]).float().div_(255.0)
    y = torch.from_numpy(data.labels[idx]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(y), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "steps": steps}))
    return model.eval(), seconds


# ----------------------------------------------------------------------------- measuring
def upsampled(layer_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, K, h, w]`` -> ``[B, K, H, W]`` bilinear, as the viewer shows it."""
    return F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False).clamp_(min=0)


def localization_rows(subject: Subject, idx: np.ndarray, algorithms: list[str]) -> tuple[list[dict], dict]:
    """Pointing / energy pointing for gt and predicted labels, per sample, algorithm and depth.
    Also returns the upsampled maps of the predicted label, for the deletion curves."""
    data = scenes()
    inputs = subject.inputs(idx)
    ex = subject.engine.explain(inputs, labels=None, algorithms=algorithms)
    predicted = ex.logits.argmax(dim=1)
    rows, pred_maps = [], {}
    for b, i in enumerate(idx):
        connection = subject.digit_connection(i)
        box = data.bboxes[i].tolist()
        gt, pred = int(data.labels[i]), int(predicted[b])
        for depth, layer in subject.depth_layers(connection):
            for algorithm in algorithms:
                heat = upsampled(ex.maps[algorithm][layer][b : b + 1], (64, 64))[0]
                pred_maps[(int(i), algorithm, layer)] = heat[pred]
                rows.append({
                    "model": subject.name, "sample": int(i), "algorithm": algorithm, "layer": layer,
                    "depth": depth, "correct": gt == pred,
                    "pointing_gt": pointing_game(heat[gt], box), "energy_gt": energy_pointing_game(heat[gt], box),
                    "pointing_pred": pointing_game(heat[pred], box),
                    "energy_pred": energy_pointing_game(heat[pred], box),
                })
    return rows, {"maps": pred_maps, "predicted": predicted, "inputs": inputs}


def faithfulness_rows(subject: Subject, idx: np.ndarray, found: dict, steps: int) -> list[dict]:
    """Deletion and insertion AUC of the predicted label: all maps of one sample in one batch."""
    rows = []
    for b, i in enumerate(idx):
        keys = [key for key in found["maps"] if key[0] == int(i)]
        connection = subject.digit_connection(i)
        view = found["inputs"][connection][b : b + 1]
        heat = torch.stack([found["maps"][key] for key in keys])
        labels = [int(found["predicted"][b])] * len(keys)
        run = subject.single_view_model(i, {n: t[b : b + 1] for n, t in found["inputs"].items()})
        x = view.expand(len(keys), -1, -1, -1)
        deletion = auc(deletion_curve(run, x, heat, labels, steps=steps))
        insertion = auc(insertion_curve(run, x, heat, labels, steps=steps))
        for (sample, algorithm, layer), d, s in zip(keys, deletion.tolist(), insertion.tolist()):
            rows.append({"model": subject.name, "sample": sample, "algorithm": algorithm, "layer": layer,
                         "deletion_auc": d, "insertion_auc": s})
    return rows


def sanity_rows(subject: Subject, idx: np.ndarray, algorithms: list[str]) -> list[dict]:
    """Spearman correlation between maps of the trained model and of its randomized copy (same label)."""
    inputs = subject.inputs(idx)
    trained = subject.engine.explain(inputs, labels=None, algorithms=algorithms)
    random_engine = CamEngine(randomized_copy(subject.model), example=inputs, layers=subject.layers)
    randomized = random_engine.explain(inputs, labels=None, algorithms=algorithms)
    predicted = trained.logits.argmax(dim=1)
    rows = []
    for b, i in enumerate(idx):
        for _, layer in subject.depth_layers(subject.digit_connection(i)):
            for algorithm in algorithms:
                label = int(predicted[b])
                rho = rank_correlation(trained.maps[algorithm][layer][b, label], randomized.maps[algorithm][layer][b, label])
                rows.append({"model": subject.name, "sample": int(i), "algorithm": algorithm, "layer": layer,
                             "sanity_spearman": rho})
    return rows


def evaluate(subject: Subject, idx: np.ndarray, faith_idx: np.ndarray, algorithms: list[str], steps: int,
             batch: int) -> pd.DataFrame:
    """Every metric of one subject, per sample; merged on (model, sample, algorithm, layer)."""
    loc, faith = [], []
    for start in range(0, len(idx), batch):
        chunk = idx[start : start + batch]
        rows, found = localization_rows(subject, chunk, algorithms)
        loc += rows
        keep = np.isin(chunk, faith_idx)
        if keep.any():
            found["maps"] = {k: v for k, v in found["maps"].items() if k[0] in set(chunk[keep].tolist())}
            faith += faithfulness_rows(subject, chunk[keep], _subset(found, keep), steps)
    frame = pd.DataFrame(loc)
    if len(faith_idx):
        keys = ["model", "sample", "algorithm", "layer"]
        sanity = sanity_rows(subject, faith_idx[:batch], algorithms)
        frame = frame.merge(pd.DataFrame(faith), on=keys, how="left").merge(pd.DataFrame(sanity), on=keys, how="left")
    return frame.reindex(columns=[*frame.columns, *(m for m in METRICS if m not in frame.columns)])


def _subset(found: dict, keep: np.ndarray) -> dict:
    mask = torch.from_numpy(keep)
    return {"maps": found["maps"], "predicted": found["predicted"][mask],
            "inputs": {n: t[mask] for n, t in found["inputs"].items()}}


# ----------------------------------------------------------------------------- reporting
def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric per (model, algorithm, depth, layer)."""
    grouped = frame.groupby(["model", "algorithm", "depth"], sort=True)
    summary = grouped[list(METRICS)].mean()
    # a two-view model has one branch layer per view at the same depth: name them together
    summary.insert(0, "layer", grouped["layer"].agg(lambda names: " / ".join(sorted(set(names)))))
    return summary.reset_index()


def wins(summary: pd.DataFrame, metric: str, rivals: tuple[str, ...] = ("gradcam", "layercam")) -> pd.DataFrame:
    """Per model and algorithm: at how many depths it beats every rival on ``metric``, and whether
    it is at least as good as the best rival at the deepest layer."""
    higher = METRICS[metric][1]
    out = []
    for model, part in summary.groupby("model"):
        table = part.pivot_table(index="depth", columns="algorithm", values=metric)
        best_rival = table[list(rivals)].max(axis=1) if higher else table[list(rivals)].min(axis=1)
        last = table.index.max()
        for algorithm in table.columns:
            if algorithm in rivals:
                continue
            diff = (table[algorithm] - best_rival) * (1 if higher else -1)
            out.append({"model": model, "algorithm": algorithm, "metric": metric,
                        "depths_won": int((diff > 1e-9).sum()), "depths": len(table),
                        "last_layer_not_worse": bool(diff.loc[last] >= -0.005)})
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, win_table: pd.DataFrame, meta: dict) -> str:
    """The results page: one table per model and metric (rows = depth, columns = algorithm)."""
    lines = ["# Focus LayerCAM evaluation", "", f"Produced by `benchmarks/focus_eval.py`: {json.dumps(meta)}", ""]
    for model, part in summary.groupby("model", sort=False):
        lines += [f"## {model}", ""]
        for metric, (title, higher) in METRICS.items():
            table = part.pivot_table(index=["depth", "layer"], columns="algorithm", values=metric)
            if table.isna().all().all():
                continue
            order = [a for a in (*PUBLIC, *VARIANTS) if a in table.columns]
            table = table[order]
            lines += [f"### {title}", "", "| depth | layer | " + " | ".join(order) + " |",
                      "|---|---|" + "---:|" * len(order)]
            for (depth, layer), row in table.iterrows():
                best = row.max() if higher else row.min()
                cells = [f"**{v:.3f}**" if abs(v - best) < 1e-9 else f"{v:.3f}" for v in row]
                lines.append(f"| {depth} | {layer} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Depths won against both GradCAM and LayerCAM", "", *_markdown_table(win_table), ""]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    rows = [" | ".join(str(v) for v in row) for row in frame.itertuples(index=False)]
    return ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns), *[f"| {r} |" for r in rows]]


def plot_metrics(summary: pd.DataFrame, path: Path) -> None:
    """Metric vs depth, one line per algorithm, one row of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["pointing_gt", "energy_gt", "deletion_auc", "insertion_auc", "sanity_spearman"]
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = plt.subplots(len(models), len(shown), figsize=(4 * len(shown), 3.3 * len(models)), squeeze=False)
    styles = {"gradcam": ("tab:blue", "-", 2.5), "layercam": ("tab:orange", "-", 2.5),
              "focus_layercam": ("tab:red", "-", 3.0)}
    spare = iter(["tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:olive", "tab:cyan", "tab:pink"])
    styles.update({v: (next(spare, "black"), "--", 1.2) for v in VARIANTS})
    for r, model in enumerate(models):
        part = summary[summary["model"] == model]
        for c, metric in enumerate(shown):
            ax = axes[r][c]
            for algorithm, rows in part.groupby("algorithm"):
                colour, line, width = styles.get(algorithm, (None, "--", 1.2))
                label = ALGORITHM_TITLES.get(algorithm, algorithm)
                ax.plot(rows["depth"], rows[metric], line, color=colour, lw=width, marker="o", ms=3, label=label)
            ax.set_title(f"{model}: {METRICS[metric][0]}", fontsize=9)
            ax.set_xlabel("depth (layers from the input)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_strip(subject: Subject, sample: int, path: Path) -> None:
    """One sample's digit view with each public algorithm's map (gt label) at every depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = scenes()
    inputs = subject.inputs(np.array([sample]))
    ex = subject.engine.explain(inputs, labels=[int(data.labels[sample])], algorithms=list(PUBLIC))
    connection = subject.digit_connection(sample)
    image = inputs[connection][0, 0].numpy()
    x0, y0, x1, y1 = data.bboxes[sample]
    layers = subject.depth_layers(connection)
    fig, axes = plt.subplots(len(PUBLIC), len(layers), figsize=(2.1 * len(layers), 2.3 * len(PUBLIC)), squeeze=False)
    for r, algorithm in enumerate(PUBLIC):
        for c, (depth, layer) in enumerate(layers):
            ax = axes[r][c]
            ax.imshow(overlay(image, ex.maps[algorithm][layer][0, 0].numpy(), alpha=0.5))
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"depth {depth}\n{layer}", fontsize=8)
            if c == 0:
                ax.set_ylabel(ALGORITHM_TITLES[algorithm], fontsize=9)
    fig.suptitle(f"{subject.name}, validation sample {sample} (digit {data.labels[sample]}, view {connection})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_weights(run: str) -> str:
    """The cached weights file a demo run loads (names the exact model the numbers are for)."""
    return cache_path(run, RUN_CONFIGS[run], scenes().digest, len(LABEL_NAMES)).name


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="validation samples for localization")
    parser.add_argument("--faith-samples", type=int, default=16, help="samples for deletion/insertion")
    parser.add_argument("--resnet-samples", type=int, default=64)
    parser.add_argument("--resnet-faith-samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion curve steps")
    parser.add_argument("--resnet-train-steps", type=int, default=150)
    parser.add_argument("--runs", nargs="*", default=["cnn"], help="demo runs to evaluate")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="Focus LayerCAM design variants")
    parser.add_argument("--no-resnet", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.faith_samples, args.resnet_samples, args.resnet_faith_samples = 16, 4, 8, 2
        args.steps = 4
    torch.manual_seed(0)
    started = time.perf_counter()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    algorithms = list(PUBLIC) + list(args.variants)
    validation = np.arange(TRAIN_SIZE, len(scenes()))
    meta = {"samples": args.samples, "faith_samples": args.faith_samples, "steps": args.steps,
            "baseline": "zeros", "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "shipped_focus": vars(ALGORITHMS["focus_layercam"])}
    meta["demo_weights"] = {run: demo_weights(run) for run in args.runs}
    subjects = [(Subject(f"demo:{run}", project.model(run), None, True), args.samples, args.faith_samples)
                for run in args.runs]
    if not args.no_resnet:
        resnet, seconds = trained_resnet(args.resnet_train_steps)
        meta["resnet_train_seconds"] = round(seconds, 1)
        subjects.append((Subject("resnet18", resnet, RESNET_LAYERS, False), args.resnet_samples,
                         args.resnet_faith_samples))
    frames = []
    with registered(VARIANTS):
        for subject, n, n_faith in subjects:
            t = time.perf_counter()
            frame = evaluate(subject, validation[:n], validation[:n_faith], algorithms, args.steps, batch=32)
            frames.append(frame)
            accuracy = frame.drop_duplicates("sample")["correct"].mean()
            meta[f"{subject.name}_accuracy"] = round(float(accuracy), 3)
            meta[f"{subject.name}_seconds"] = round(time.perf_counter() - t, 1)
            print(f"{subject.name}: accuracy {accuracy:.3f} on {n} samples, {time.perf_counter() - t:.0f}s", flush=True)
        frame = pd.concat(frames, ignore_index=True)
        summary = summarize(frame)
        measured = [m for m in METRICS if m != "sanity_spearman" and summary[m].notna().any()]
        win_table = pd.concat([wins(summary, m) for m in measured], ignore_index=True)
        args.results.mkdir(parents=True, exist_ok=True)
        args.images.mkdir(parents=True, exist_ok=True)
        summary.to_csv(args.results / "focus_eval.csv", index=False)
        meta["seconds"] = round(time.perf_counter() - started, 1)
        (args.results / "focus_eval.json").write_text(json.dumps(
            {"meta": meta, "summary": summary.to_dict(orient="records"), "wins": win_table.to_dict(orient="records")},
            indent=1))
        (args.results / "focus_eval.md").write_text(markdown(summary, win_table, meta))
        plot_metrics(summary, args.images / "focus-metrics-by-depth.png")
        plot_strip(subjects[0][0], int(validation[0]), args.images / "focus-strip.png")
    print(win_table.to_string(index=False))
    print(f"done in {time.perf_counter() - started:.0f}s: {args.results / 'focus_eval.md'}")


if __name__ == "__main__":
    main()
