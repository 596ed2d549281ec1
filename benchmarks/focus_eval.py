"""Does Focus LayerCAM focus? Localization and faithfulness of every CAM algorithm at every depth.

On the demo's validation slice (cluttered two-view MNIST, the digit's bounding box known), for the
models trained on the demo data (the demo runs ``cnn``, ``resnet8``, a network with skip connections, and
``vit``, a hybrid vision transformer):

- the validation scenes (1,000) are shuffled once (fixed seed) into a **tuning split** (design variants
  are compared and the shipped rule is chosen there) and a disjoint **held-out split** (everything
  reported). Round two tuned on the shuffle's first 200 scenes and reported on the next 300; that
  held-out split was looked at twice, so round three tunes on those 500 (first 500) and reports on the
  last 500, never used before; deletion on the tuning split's first 200 (``--tuning-faith``) scores the
  candidates' faithfulness too;
- **distinct depths only**: consecutive depths whose LayerCAM maps are identical on every evaluated
  sample (a container and its last child; a batch norm and the ReLU after it, which LayerCAM cannot
  tell apart) are one row, shown at the deepest of them (the viewer's layer);
- localization for the ground-truth label on the view that holds the digit: pointing game, energy
  pointing game and in-box AUC (rank-based: sharpening a map cannot raise it);
- faithfulness for the predicted label: deletion and insertion AUC (zeros baseline, only the digit's
  view perturbed), and the randomization sanity check (Spearman correlation between the maps of
  the model and of its weight-randomized copy: lower = the map depends on what was learned);
- every number is a mean over samples with a 95% bootstrap confidence interval; comparisons with
  LayerCAM are paired (bootstrap of the per-sample differences).

Writes ``benchmarks/results/focus_eval.{md,csv,json}`` and ``docs/images/focus-*.png``.

Usage::

    # 500 tuning + 500 held-out per model
    .venv/bin/python benchmarks/focus_eval.py
    # one process per model (--frames keeps each model's rows, tuning and held-out apart, and reuses
    # them), then one that reports them all together:
    .venv/bin/python benchmarks/focus_eval.py --runs vit --frames /tmp/focus --tuning-only
    .venv/bin/python benchmarks/focus_eval.py --runs vit --frames /tmp/focus --held-out-only
    .venv/bin/python benchmarks/focus_eval.py --runs cnn resnet8 vit --frames /tmp/focus
    .venv/bin/python benchmarks/focus_eval.py --tuning-only   # only compare the candidates on the tuning split
    .venv/bin/python benchmarks/focus_eval.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from camscope import CamEngine
from camscope.algorithms import ALGORITHMS, ALGORITHM_TITLES, FocusLayerCAM
from camscope.demo import LABEL_NAMES, RUN_CONFIGS, TRAIN_SIZE, project
from camscope.demo_data import VIEWS, scenes
from camscope.demo_models import cache_path
from camscope.heatmap import overlay
from camscope.metrics import (
    auc,
    bootstrap_ci,
    deletion_curve,
    energy_pointing_game,
    in_box_auc,
    insertion_curve,
    pointing_game,
    randomized_copy,
    rank_correlation,
)

ROOT = Path(__file__).resolve().parents[1]
SPLIT_SEED = 17
PUBLIC = ("gradcam", "layercam", "focus_layercam")
#: The first Focus LayerCAM (every layer gated by the deepest LayerCAM map): the rule to beat.
PREVIOUS = "focus:deepest"
#: Design candidates compared on the tuning split (the shipped rule is ``focus_layercam``): the previous
#: rules, and the shipped rule with one setting changed at a time.
VARIANTS = {
    PREVIOUS: FocusLayerCAM(gate="deepest", gate_power=1.0, floor=0.0, detail_power=0.0),
    "focus:round1": FocusLayerCAM(gate="cascade", gate_power=1.5, floor=0.0, detail_power=0.0),
    "focus:stage": FocusLayerCAM(gate="stage", gate_power=1.0, floor=0.0, detail_power=0.0),
    "focus:no-floor": FocusLayerCAM(floor=0.0),
    "focus:no-detail": FocusLayerCAM(detail_power=0.0),
    "focus:cascade": FocusLayerCAM(gate="cascade"),
    "focus:gate^0.75": FocusLayerCAM(gate_power=0.75),
    "focus:gate^1.25": FocusLayerCAM(gate_power=1.25),
    "focus:detail^0.5": FocusLayerCAM(detail_power=0.5),
    "focus:detail^1": FocusLayerCAM(detail_power=1.0),
    "focus:ref-gate^0.5": FocusLayerCAM(ref_gate_power=0.5),
    "focus:ref-gate^0": FocusLayerCAM(ref_gate_power=0.0),
}
#: Last-layer rules measured on the tuning split (post hoc from the GradCAM and LayerCAM maps).
LAST_LAYER_RULES = {
    "last:layercam*gradcam": 1.0,
    "last:layercam*gradcam^0.5": 0.5,
}
#: Candidates whose deletion AUC is measured on the tuning split too (deletion only: it is slow).
TUNING_FAITH = ("layercam", PREVIOUS, "focus_layercam")
LOCALIZATION = ("pointing", "energy", "inbox_auc")
FAITHFULNESS = ("deletion_auc", "insertion_auc")
METRICS = {  # column -> (title, higher is better)
    "pointing": ("pointing game", True),
    "energy": ("energy pointing game", True),
    "inbox_auc": ("in-box AUC (rank-based)", True),
    "deletion_auc": ("deletion AUC (lower = better)", False),
    "insertion_auc": ("insertion AUC (higher = better)", True),
    "sanity_spearman": ("rank corr. with randomized model (lower = better)", False),
}


@contextlib.contextmanager
def registered(extra: dict):
    """Make the variants selectable by key in ``CamEngine.explain`` for the duration of the run."""
    ALGORITHMS.update(extra)
    try:
        yield
    finally:
        for key in extra:
            ALGORITHMS.pop(key, None)


def splits(tuning: int, held_out: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint tuning and held-out scene indices drawn from the validation slice (fixed seed)."""
    validation = np.arange(TRAIN_SIZE, len(scenes()))
    if tuning + held_out > len(validation):
        raise ValueError(f"only {len(validation)} validation scenes for {tuning} + {held_out}")
    shuffled = np.random.default_rng(seed).permutation(validation)
    return shuffled[:tuning], shuffled[tuning : tuning + held_out]


# ----------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """A demo run under evaluation: its model, engine and the digit's view of each scene."""

    name: str
    model: nn.Module
    engine: CamEngine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = CamEngine(self.model, example=self.inputs(np.array([TRAIN_SIZE])))

    @staticmethod
    def inputs(idx: np.ndarray) -> dict[str, torch.Tensor]:
        views = torch.from_numpy(scenes().views[idx]).float().div_(255.0)
        return {name: views[:, v : v + 1] for v, name in enumerate(VIEWS)}

    @staticmethod
    def digit_connection(i: int) -> str:
        return VIEWS[int(scenes().digit_view[i])]

    def depth_layers(self, connection: str) -> list[tuple[int, str]]:
        """(depth, layer) for ``connection``, one layer per depth: the first to finish (in a residual
        block the main path runs before the shortcut; a container and its last child have one map)."""
        by_depth: dict[int, str] = {}
        for info in self.engine.layers:
            if connection in info.depth:
                by_depth.setdefault(info.depth[connection], info.name)
        return sorted(by_depth.items())

    def single_view_model(self, connection: str, inputs: dict[str, torch.Tensor]):
        """A callable of one view alone, the other view of the same scene held fixed."""
        others = {name: t for name, t in inputs.items() if name != connection}

        def run(view: torch.Tensor) -> torch.Tensor:
            return self.model(**{connection: view}, **{n: t.expand(len(view), -1, -1, -1) for n, t in others.items()})

        return run


def distinct_depths(subject: Subject, layercam: dict[str, torch.Tensor]) -> dict[str, list[tuple[str, str]]]:
    """Per connection: (depth label, layer) rows, consecutive depths with identical LayerCAM maps merged
    into one row (labelled "2-3") shown at the deepest layer of the run."""
    rows: dict[str, list[tuple[list[int], str]]] = {}
    for connection in VIEWS:
        merged: list[tuple[list[int], str]] = []
        for depth, layer in subject.depth_layers(connection):
            if merged and _identical(layercam[merged[-1][1]], layercam[layer]):
                merged[-1] = ([*merged[-1][0], depth], layer)
            else:
                merged.append(([depth], layer))
        rows[connection] = [(f"{d[0]}" if len(d) == 1 else f"{d[0]}-{d[-1]}", layer) for d, layer in merged]
    return rows


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------- measuring
def upsampled(layer_map: torch.Tensor, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """``[B, K, h, w]`` -> ``[B, K, H, W]`` bilinear, as the viewer shows it."""
    return F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False).clamp_(min=0)


def explain_all(subject: Subject, idx: np.ndarray, algorithms: list[str], batch: int = 50):
    """Maps of every label at every layer for ``idx``, concatenated over batches; and the predictions."""
    maps: dict[str, dict[str, list[torch.Tensor]]] = {a: {} for a in algorithms}
    predicted = []
    for start in range(0, len(idx), batch):
        ex = subject.engine.explain(subject.inputs(idx[start : start + batch]), labels=None, algorithms=algorithms)
        predicted.append(ex.logits.argmax(dim=1))
        for algorithm in algorithms:
            for layer, value in ex.maps[algorithm].items():
                maps[algorithm].setdefault(layer, []).append(value)
    joined = {a: {layer: torch.cat(parts) for layer, parts in by_layer.items()} for a, by_layer in maps.items()}
    return joined, torch.cat(predicted)


def localization_rows(subject: Subject, idx: np.ndarray, maps: dict, depths: dict, predicted: torch.Tensor,
                      split: str) -> list[dict]:
    """Pointing, energy pointing and in-box AUC of the ground-truth label, per sample, algorithm and distinct depth."""
    data = scenes()
    rows = []
    for b, i in enumerate(idx):
        connection = subject.digit_connection(i)
        box = data.bboxes[i].tolist()
        gt = int(data.labels[i])
        for step, (depth, layer) in enumerate(depths[connection]):
            for algorithm, by_layer in maps.items():
                heat = upsampled(by_layer[layer][b : b + 1, gt : gt + 1])[0, 0]
                rows.append({
                    "model": subject.name, "split": split, "sample": int(i), "algorithm": algorithm,
                    "step": step, "depth": depth, "layer": layer, "correct": gt == int(predicted[b]),
                    "pointing": pointing_game(heat, box), "energy": energy_pointing_game(heat, box),
                    "inbox_auc": in_box_auc(heat, box),
                })
    return rows


def faithfulness_rows(subject: Subject, idx: np.ndarray, maps: dict, depths: dict, predicted: torch.Tensor,
                      steps: int, insertion: bool = True) -> list[dict]:
    """Deletion (and insertion) AUC of the predicted label: every map of one sample in one batch."""
    rows = []
    for b, i in enumerate(idx):
        connection = subject.digit_connection(i)
        inputs = subject.inputs(np.array([i]))
        label = int(predicted[b])
        keys = [(step, layer, algorithm) for step, (_, layer) in enumerate(depths[connection]) for algorithm in maps]
        heat = torch.stack([upsampled(maps[a][layer][b : b + 1, label : label + 1])[0, 0] for _, layer, a in keys])
        run = subject.single_view_model(connection, inputs)
        x = inputs[connection].expand(len(keys), -1, -1, -1)
        deleted = auc(deletion_curve(run, x, heat, [label] * len(keys), steps=steps)).tolist()
        inserted = (auc(insertion_curve(run, x, heat, [label] * len(keys), steps=steps)).tolist() if insertion
                    else [float("nan")] * len(keys))
        for (step, _, algorithm), d, s in zip(keys, deleted, inserted):
            rows.append({"model": subject.name, "sample": int(i), "algorithm": algorithm, "step": step,
                         "deletion_auc": d, "insertion_auc": s})
    return rows


def sanity_rows(subject: Subject, idx: np.ndarray, maps: dict, depths: dict, predicted: torch.Tensor,
                algorithms: list[str]) -> list[dict]:
    """Spearman correlation between the maps of the model and of its randomized copy (predicted label)."""
    random_engine = CamEngine(randomized_copy(subject.model), example=subject.inputs(idx[:1]))
    randomized = random_engine.explain(subject.inputs(idx), labels=None, algorithms=algorithms).maps
    rows = []
    for b, i in enumerate(idx):
        label = int(predicted[b])
        for step, (_, layer) in enumerate(depths[subject.digit_connection(i)]):
            for algorithm in algorithms:
                rho = rank_correlation(maps[algorithm][layer][b, label], randomized[algorithm][layer][b, label])
                rows.append({"model": subject.name, "sample": int(i), "algorithm": algorithm, "step": step,
                             "sanity_spearman": rho})
    return rows


def evaluate(subject: Subject, idx: np.ndarray, algorithms: list[str], split: str, faith: int = 0,
             sanity: int = 0, steps: int = 10, faith_algorithms: list[str] | None = None) -> pd.DataFrame:
    """Every metric of one subject on ``idx``: one row per (sample, algorithm, distinct depth).
    Faithfulness on the first ``faith`` samples (of ``faith_algorithms`` only, deletion only, when given),
    the sanity check on the first ``sanity``."""
    maps, predicted = explain_all(subject, idx, algorithms)
    if split == "tuning" and "gradcam" in maps:
        maps = with_last_layer_rules(maps)
    depths = distinct_depths(subject, maps["layercam"] if "layercam" in maps else next(iter(maps.values())))
    frame = pd.DataFrame(localization_rows(subject, idx, maps, depths, predicted, split))
    keys = ["model", "sample", "algorithm", "step"]
    if faith:
        sub = {a: {layer: m[:faith] for layer, m in by_layer.items()} for a, by_layer in maps.items()
               if faith_algorithms is None or a in faith_algorithms}
        faith_frame = pd.DataFrame(faithfulness_rows(subject, idx[:faith], sub, depths, predicted[:faith], steps,
                                                     insertion=faith_algorithms is None))
        frame = frame.merge(faith_frame, on=keys, how="left")
    if sanity:
        sub = {a: {layer: m[:sanity] for layer, m in by_layer.items()} for a, by_layer in maps.items()}
        sanity_frame = pd.DataFrame(sanity_rows(subject, idx[:sanity], sub, depths, predicted[:sanity], algorithms))
        frame = frame.merge(sanity_frame, on=keys, how="left")
    return frame.reindex(columns=[*frame.columns, *(m for m in METRICS if m not in frame.columns)])


# ----------------------------------------------------------------------------- summarizing
def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% bootstrap interval of every metric per (model, algorithm, distinct depth)."""
    out = []
    for (model, algorithm, step), part in frame.groupby(["model", "algorithm", "step"], sort=True):
        row = {"model": model, "algorithm": algorithm, "step": step, "depth": part["depth"].iloc[0],
               "layer": " / ".join(sorted(set(part["layer"]))), "samples": part["sample"].nunique()}
        for metric in METRICS:
            mean, low, high = bootstrap_ci(part[metric].to_numpy(dtype=float))
            row.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
        out.append(row)
    return pd.DataFrame(out)


def paired(frame: pd.DataFrame, algorithm: str, rival: str, metric: str) -> pd.DataFrame:
    """Per (model, distinct depth): mean of ``algorithm - rival`` over the same samples, with its interval."""
    keys = ["model", "step", "sample"]
    a = frame[frame["algorithm"] == algorithm].set_index(keys)[metric]
    b = frame[frame["algorithm"] == rival].set_index(keys)[metric]
    diff = (a - b).dropna().reset_index()
    out = []
    for (model, step), part in diff.groupby(["model", "step"]):
        mean, low, high = bootstrap_ci(part[metric].to_numpy())
        out.append({"model": model, "step": step, "metric": metric, "algorithm": algorithm, "rival": rival,
                    "diff": mean, "low": low, "high": high})
    return pd.DataFrame(out)


def with_last_layer_rules(maps: dict) -> dict:
    """Add the last-layer candidates ``LayerCAM * norm(GradCAM)^p`` (every layer; only the last is read)."""
    from camscope.algorithms import _unit_peak

    for key, power in LAST_LAYER_RULES.items():
        maps[key] = {layer: lc * _unit_peak(maps["gradcam"][layer]).pow(power) for layer, lc in maps["layercam"].items()}
    return maps


def tuning_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per gating candidate, over both models' distinct depths below the last: at how many depths it
    beats the previous rule on energy pointing AND in-box AUC, and its mean energy, in-box AUC and
    pointing; for the candidates scored on deletion, the depths (all of them, the last included) where its
    deletion AUC is worse than LayerCAM's beyond the paired 95% interval, and the largest mean difference.
    Sorted by the depths beating the previous rule (ties: higher mean energy pointing)."""
    below = frame[frame["step"] < frame.groupby("model")["step"].transform("max")]
    means = below.groupby(["algorithm", "model", "step"])[["energy", "inbox_auc", "pointing"]].mean()
    previous = means.xs(PREVIOUS, level="algorithm")
    rows = []
    for algorithm in ["focus_layercam", *VARIANTS]:
        mine = means.xs(algorithm, level="algorithm")
        both = ((mine["energy"] > previous["energy"]) & (mine["inbox_auc"] > previous["inbox_auc"])).sum()
        row = {"candidate": algorithm, "depths_beating_previous": int(both), "depths": len(mine),
               **mine.mean().round(4).to_dict(), "deletion_worse_depths": "", "deletion_max_diff": ""}
        if "deletion_auc" in frame and frame.loc[frame["algorithm"] == algorithm, "deletion_auc"].notna().any():
            deletion = paired(frame, algorithm, "layercam", "deletion_auc")
            row["deletion_worse_depths"] = int((deletion["low"] > 0).sum())
            row["deletion_max_diff"] = f"{deletion['diff'].max():+.4f}"
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["depths_beating_previous", "energy"], ascending=False)
    return table.reset_index(drop=True)


def last_layer_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model: the last layer's energy, in-box AUC and pointing of GradCAM, LayerCAM and the candidates."""
    last = frame[frame["step"] == frame.groupby("model")["step"].transform("max")]
    keep = ["gradcam", "layercam", "focus_layercam", *LAST_LAYER_RULES]
    table = last[last["algorithm"].isin(keep)].groupby(["model", "algorithm"])[["energy", "inbox_auc", "pointing"]]
    return table.mean().round(4).reset_index()


def targets(summary: pd.DataFrame, frame: pd.DataFrame, candidate: str = "focus_layercam") -> pd.DataFrame:
    """The issue's targets per model: met or not, with the numbers."""
    rows = []
    for model, part in summary.groupby("model", sort=False):
        steps = sorted(part["step"].unique())
        last = steps[-1]
        below = steps[:-1]
        shallow = below[: max(1, (len(below) + 1) // 2)]

        def value(algorithm, step, metric):
            return float(part[(part["algorithm"] == algorithm) & (part["step"] == step)][metric].iloc[0])

        def depth(step):
            return str(part[part["step"] == step]["depth"].iloc[0])

        for metric in ("energy", "inbox_auc"):
            beaten = [s for s in below if value(candidate, s, metric) > value(PREVIOUS, s, metric)]
            missed = ", ".join(f"{depth(s)}: {value(candidate, s, metric) - value(PREVIOUS, s, metric):+.4f}"
                               for s in below if s not in beaten)
            rows.append({"model": model, "target": f"{metric} above the previous Focus LayerCAM at every depth below the last",
                         "met": len(beaten) == len(below),
                         "detail": f"{len(beaten)} of {len(below)} depths"
                                   + (f" (not at depth {missed})" if missed else "")})
        gain = np.mean([value(candidate, s, "energy") - value(PREVIOUS, s, "energy") for s in shallow])
        rows.append({"model": model, "target": "energy pointing +0.10 on average over the shallow half",
                     "met": bool(gain >= 0.10), "detail": f"+{gain:.3f} over {len(shallow)} depths"})
        for metric in ("energy", "inbox_auc", "pointing"):
            best = max(value("gradcam", last, metric), value("layercam", last, metric))
            mine = value(candidate, last, metric)
            rows.append({"model": model, "target": f"last layer {metric} >= max(GradCAM, LayerCAM)",
                         "met": bool(mine >= best - 1e-9), "detail": f"{mine:.3f} vs {best:.3f}"})
        deletion = paired(frame[frame["model"] == model], candidate, "layercam", "deletion_auc")
        if len(deletion):
            # worse = higher deletion AUC; "by more than its interval": the whole interval above zero
            worse = deletion[deletion["low"] > 0]
            rows.append({"model": model, "target": "deletion AUC not worse than LayerCAM's beyond the interval",
                         "met": worse.empty,
                         "detail": "worse at depth " + ", ".join(
                             f"{depth(r.step)} ({r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}])"
                             for r in worse.itertuples())
                         if len(worse) else f"max diff {deletion['diff'].max():+.3f}"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- reporting
def _cell(row: pd.Series, metric: str, bold: bool) -> str:
    text = f"{row[metric]:.3f} [{row[f'{metric}_low']:.2f}, {row[f'{metric}_high']:.2f}]"
    return f"**{text}**" if bold else text


NOTES = [
    "The shipped rule (`focus_layercam`), with `norm` = divide by the map's maximum and `G_l = "
    "norm(resize(D_g(l)))`: (1) deepest first, `D_ref = LayerCAM_ref` and `D_l = LayerCAM_l * G_l + 0.01 * "
    "max(LayerCAM_l) * G_l` (the second term only below the reference's resolution: it ranks LayerCAM's zeros by "
    "the gate); (2) at the reference's resolution, the last layer included, `F_l = D_l * norm(sum_i "
    "avgpool(norm(D_fine(i))))^0.2`, `fine(i)` the finest layer of input `i` (focused without the 0.01 term); "
    "(3) the other layers redo step 1 with their gates from `F`. `g(l)` is the deepest layer of the resolution of "
    "`l`'s nearest deeper layer (`gate=\"stage\"`). `focus:deepest` is the previous rule (every layer gated by "
    "the deepest LayerCAM map, power 1); `focus:round1` the first round's cascade (`g(l)` the nearest deeper layer "
    "of `l`'s resolution, power 1.5, no floor, no detail); the other `focus:` rows change one setting of the "
    "shipped rule (`stage` = neither floor nor detail).",
    "",
    "Metrics (ground-truth label, the view holding the digit): pointing game; energy pointing (mass share in the "
    "box; sharpening raises it); in-box AUC (share of the top-q pixels inside the box averaged over q, rank-based: "
    "a map with no ranking scores the box's area share, 0.06 on average here, a perfect ranking about 0.23). "
    "Predicted label: deletion and insertion AUC (zeros baseline, the digit's view only); rank correlation "
    "with the maps of a weight-randomized copy (Adebayo et al.'s sanity check). Deletion is compared with "
    "LayerCAM's by a paired bootstrap of the per-sample differences.",
]


def markdown(summary: pd.DataFrame, tuning: pd.DataFrame, last_rules: pd.DataFrame, target_table: pd.DataFrame,
             meta: dict, order: list[str]) -> str:
    """The results page: tuning choice, targets, then per model and metric a table (rows = distinct depth)."""
    lines = ["# Focus LayerCAM evaluation", "",
             f"Produced by `benchmarks/focus_eval.py`. Settings: `{json.dumps(meta)}`", "",
             "Every number below is on the **held-out** split, as mean [95% bootstrap interval] over samples, "
             "per distinct depth (depths with identical LayerCAM maps merged). Bold: best mean of the row.", "",
             *NOTES, "",
             "## Choosing the rule (tuning split)", "",
             "**Splits.** The validation slice's 1,000 scenes are shuffled once (seed 17). Round two tuned on the "
             "first 200 and reported on the next 300; that held-out split was looked at twice, so round three tunes "
             "on those 500 and reports on the last 500, never used before.", "",
             f"Gating candidates over every model's distinct depths below the last: depths where the candidate beats "
             f"the previous rule (`{PREVIOUS}`) on energy pointing and in-box AUC both, and the means; for the "
             f"candidates in `TUNING_FAITH`, the depths where deletion AUC is worse than LayerCAM's beyond the paired "
             f"95% interval (first {meta.get('tuning_faith', 0)} tuning scenes) and the largest mean difference. "
             "`focus_layercam` is the shipped rule. It was chosen in round two on `cnn` and `resnet8` from "
             "per-layer maps cached once (more candidates than this table: products of deeper maps, blurred and "
             "GradCAM gates, per-resolution powers, gate offsets, mixes with LayerCAM, per-sample powers from the "
             "map's agreement with its gate, detail at every resolution). Round three looked on the 500 tuning "
             "scenes for a change that fixed round two's two held-out misses on `resnet8` (in-box AUC at depth 5-6, "
             "deletion at depths 11-12 and 16): a weaker gate at the reference's resolution (`ref-gate^0.5`, "
             "`^0.25`, `^0`, `ref_gate_power`), no detail there, weaker gates within a resolution, gates mixing the "
             "stage's last layer with the next coarser one, floors 0 to 0.02, detail 0.1. None helped: `resnet8`'s "
             "deletion was worse than LayerCAM's beyond its interval at no depth for the shipped rule on all 500 "
             "tuning scenes (largest mean difference +0.0012 at depth 16, a scratch run from cached maps; the "
             "table's column is the first 200 scenes of every model), so there was no deletion miss to fix there (on round two's 80 faith scenes, now tuning, "
             "`ref-gate^0` removed it and `^0.5` did not), and a weaker gate at the reference's resolution only lowered energy pointing "
             "(`^0`: above the previous rule at 9 of 16 `resnet8` depths); in-box AUC at `resnet8`'s depth 5-6 "
             "stayed .0001 to .0003 below the previous rule for every candidate that kept the +0.10 shallow-half "
             "gain. So the shipped rule is round two's.", "",
             *_markdown_table(tuning), "",
             "Last-layer rules (tuning split): LayerCAM gated by GradCAM against both.", "",
             *_markdown_table(last_rules), "", "## Targets (held-out)", "", *_markdown_table(target_table), ""]
    for model, part in summary.groupby("model", sort=False):
        lines += [f"## {model}", "", "Energy pointing / in-box AUC (bold: best energy pointing of the row):", "",
                  *compact_table(summary, model, order), ""]
        for metric, (title, higher) in METRICS.items():
            table = part[part[metric].notna()]
            if table.empty:
                continue
            present = [a for a in order if a in set(table["algorithm"])]
            lines += [f"### {title}", "", "| depth | layer | " + " | ".join(present) + " |",
                      "|---|---|" + "---:|" * len(present)]
            for step, rows in table.groupby("step"):
                rows = rows.set_index("algorithm")
                best = rows[metric].max() if higher else rows[metric].min()
                cells = [_cell(rows.loc[a], metric, abs(rows.loc[a, metric] - best) < 1e-9) for a in present]
                lines.append(f"| {rows['depth'].iloc[0]} | {rows['layer'].iloc[0]} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def compact_table(summary: pd.DataFrame, model: str, order: list[str]) -> list[str]:
    """One model's energy pointing / in-box AUC per distinct depth and algorithm (the README's table)."""
    part = summary[summary["model"] == model]
    titles = [ALGORITHM_TITLES.get(a, "previous Focus") for a in order]
    lines = ["| depth | layer | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(order)]
    for _, rows in part.groupby("step"):
        rows = rows.set_index("algorithm")
        best = rows.loc[order, "energy"].max()
        cells = []
        for a in order:
            text = f"{rows.loc[a, 'energy']:.3f} / {rows.loc[a, 'inbox_auc']:.3f}"
            cells.append(f"**{text}**" if abs(rows.loc[a, "energy"] - best) < 1e-9 else text)
        lines.append(f"| {rows['depth'].iloc[0]} | `{rows['layer'].iloc[0]}` | " + " | ".join(cells) + " |")
    return lines


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    rows = [" | ".join(str(v) for v in row) for row in frame.itertuples(index=False)]
    return ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns), *[f"| {r} |" for r in rows]]


STYLES = {"gradcam": ("tab:blue", "-", 2.0), "layercam": ("tab:orange", "-", 2.0),
          "focus_layercam": ("tab:red", "-", 3.0), PREVIOUS: ("tab:gray", "--", 1.5)}


def plot_metrics(summary: pd.DataFrame, path: Path) -> None:
    """Metric vs distinct depth with 95% intervals, one line per algorithm, one row of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["energy", "inbox_auc", "pointing", "deletion_auc", "insertion_auc", "sanity_spearman"]
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = plt.subplots(len(models), len(shown), figsize=(3.6 * len(shown), 3.2 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        part = summary[summary["model"] == model]
        ticks = part.drop_duplicates("step").sort_values("step")
        for c, metric in enumerate(shown):
            ax = axes[r][c]
            for algorithm, (colour, line, width) in STYLES.items():
                rows = part[part["algorithm"] == algorithm].sort_values("step")
                if rows.empty or rows[metric].isna().all():
                    continue
                label = ALGORITHM_TITLES.get(algorithm, "Focus LayerCAM (previous: deepest gate)")
                ax.plot(rows["step"], rows[metric], line, color=colour, lw=width, marker="o", ms=3, label=label)
                ax.fill_between(rows["step"], rows[f"{metric}_low"], rows[f"{metric}_high"], color=colour, alpha=0.15)
            ax.set_xticks(ticks["step"], ticks["depth"], fontsize=7)
            ax.set_title(f"{model}: {METRICS[metric][0]}", fontsize=8)
            ax.set_xlabel("distinct depth (input -> output)", fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_strip(subject: Subject, sample: int, path: Path) -> None:
    """One held-out sample's digit view with each public algorithm's map (gt label) at every distinct depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = scenes()
    inputs = subject.inputs(np.array([sample]))
    shown = [*PUBLIC, PREVIOUS]
    ex = subject.engine.explain(inputs, labels=[int(data.labels[sample])], algorithms=shown)
    connection = subject.digit_connection(sample)
    image = inputs[connection][0, 0].numpy()
    x0, y0, x1, y1 = data.bboxes[sample]
    steps = distinct_depths(subject, ex.maps["layercam"])[connection]
    fig, axes = plt.subplots(len(shown), len(steps), figsize=(1.9 * len(steps), 2.1 * len(shown)), squeeze=False)
    for r, algorithm in enumerate(shown):
        for c, (depth, layer) in enumerate(steps):
            ax = axes[r][c]
            ax.imshow(overlay(image, ex.maps[algorithm][layer][0, 0].numpy(), alpha=0.5))
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"depth {depth}\n{layer}", fontsize=7)
            if c == 0:
                ax.set_ylabel(ALGORITHM_TITLES.get(algorithm, "previous Focus\n(deepest gate)"), fontsize=8)
    fig.suptitle(f"{subject.name}, held-out sample {sample} (digit {data.labels[sample]}, view {connection})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo_weights(run: str) -> str:
    """The cached weights file a demo run loads (names the exact model the numbers are for)."""
    return cache_path(run, RUN_CONFIGS[run], scenes().digest, len(LABEL_NAMES)).name


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuning", type=int, default=500, help="tuning-split samples")
    parser.add_argument("--held-out", type=int, default=500, help="held-out samples for localization")
    parser.add_argument("--faith", type=int, default=200, help="held-out samples for deletion/insertion")
    parser.add_argument("--tuning-faith", type=int, default=200,
                        help="tuning samples for the deletion of the candidates in TUNING_FAITH")
    parser.add_argument("--sanity", type=int, default=100, help="held-out samples for the randomization check")
    parser.add_argument("--steps", type=int, default=10, help="deletion/insertion curve steps")
    parser.add_argument("--runs", nargs="*", default=["cnn", "resnet8"], help="demo runs to evaluate")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--tuning-only", action="store_true", help="compare the candidates on the tuning split, then stop")
    parser.add_argument("--held-out-only", action="store_true",
                        help="with --frames: evaluate and keep the held-out rows only (the tuning rows by another process)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--frames", type=Path, default=None,
                        help="keep each run's per-sample rows here and reuse them when present: runs evaluated "
                             "by separate processes, then reported together by one")
    args = parser.parse_args()
    if args.quick:
        args.tuning, args.held_out, args.faith, args.tuning_faith, args.sanity, args.steps = 16, 24, 4, 4, 4, 4
    torch.manual_seed(0)
    started = time.perf_counter()
    tuning_idx, held_idx = splits(args.tuning, args.held_out)
    candidates = ["gradcam", "layercam", "focus_layercam", *VARIANTS]
    reported = ["gradcam", "layercam", PREVIOUS, "focus_layercam"]
    shipped = ALGORITHMS["focus_layercam"]
    meta = {"tuning": args.tuning, "held_out": args.held_out, "faith": args.faith,
            "tuning_faith": args.tuning_faith, "sanity": args.sanity,
            "steps": args.steps, "split_seed": SPLIT_SEED, "baseline": "zeros", "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "shipped_focus": {"gate": shipped.gate, "gate_power": shipped.gate_power, "floor": shipped.floor,
                              "detail_power": shipped.detail_power, "target": shipped.target},
            "demo_weights": {run: demo_weights(run) for run in args.runs}}
    subjects = [Subject(run, project.model(run)) for run in args.runs]
    tuning_frames, held_frames = [], []
    with registered(VARIANTS):
        for subject in subjects:
            kept = args.frames / subject.name if args.frames else None
            if kept and (kept / "tuning.parquet").exists():
                tuning_frames.append(pd.read_parquet(kept / "tuning.parquet"))
            elif not args.held_out_only:
                tuning_frames.append(evaluate(subject, tuning_idx, candidates, "tuning", faith=args.tuning_faith,
                                              steps=args.steps, faith_algorithms=TUNING_FAITH))
                if kept:
                    kept.mkdir(parents=True, exist_ok=True)
                    tuning_frames[-1].to_parquet(kept / "tuning.parquet")
            if args.tuning_only:
                continue
            if kept and (kept / "held-out.parquet").exists():
                held_frames.append(pd.read_parquet(kept / "held-out.parquet"))
                meta.update(json.loads((kept / "meta.json").read_text()))
                continue
            t = time.perf_counter()
            frame = evaluate(subject, held_idx, reported, "held-out", faith=args.faith, sanity=args.sanity,
                             steps=args.steps)
            held_frames.append(frame)
            accuracy = frame.drop_duplicates("sample")["correct"].mean()
            run_meta = {f"{subject.name}_held_out_accuracy": round(float(accuracy), 3),
                        f"{subject.name}_seconds": round(time.perf_counter() - t, 1)}
            meta.update(run_meta)
            if kept:
                kept.mkdir(parents=True, exist_ok=True)
                frame.to_parquet(kept / "held-out.parquet")
                (kept / "meta.json").write_text(json.dumps(run_meta))
            print(f"{subject.name}: accuracy {accuracy:.3f} on {len(held_idx)} held-out samples, "
                  f"{time.perf_counter() - t:.0f}s", flush=True)
        if args.held_out_only:
            return
        tuning_frame = pd.concat(tuning_frames, ignore_index=True)
        tuning = tuning_scores(tuning_frame)
        last_rules = last_layer_scores(tuning_frame)
        meta["tuning_winner"] = str(tuning["candidate"].iloc[0])
        if args.tuning_only:
            print(tuning.to_string(index=False))
            print(last_rules.to_string(index=False))
            return
        frame = pd.concat(held_frames, ignore_index=True)
        summary = summarize(frame)
        target_table = targets(summary, frame)
        meta["seconds"] = round(sum(v for k, v in meta.items() if k.endswith("_seconds")), 1)
        args.results.mkdir(parents=True, exist_ok=True)
        args.images.mkdir(parents=True, exist_ok=True)
        summary.to_csv(args.results / "focus_eval.csv", index=False)
        (args.results / "focus_eval.json").write_text(json.dumps(
            {"meta": meta, "tuning": tuning.to_dict(orient="records"),
             "last_layer_tuning": last_rules.to_dict(orient="records"), "summary": summary.to_dict(orient="records"),
             "targets": target_table.to_dict(orient="records")}, indent=1, default=float))
        (args.results / "focus_eval.md").write_text(markdown(summary, tuning, last_rules, target_table, meta, reported))
        plot_metrics(summary, args.images / "focus-metrics-by-depth.png")
        for subject in subjects:
            plot_strip(subject, int(held_idx[0]), args.images / f"focus-strip-{subject.name}.png")
    print(tuning.to_string(index=False))
    print(last_rules.to_string(index=False))
    print(target_table.to_string(index=False))
    print(f"done in {time.perf_counter() - started:.0f}s: {args.results / 'focus_eval.md'}")


if __name__ == "__main__":
    main()
