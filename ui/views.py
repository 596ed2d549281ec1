"""What each panel shows for a sample and the controller's settings (pure: no Gradio here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from camscope.algorithms import ALGORITHM_TITLES
from ui import pictures
from ui.backend import Backend, SampleView
from camscope.depth_steps import DepthStep

OVERLAY, RAW, INPUT = "Heatmap overlay", "Raw heatmap", "Connection input"
LAST_LAYER, CUSTOM = "last layer", "custom"
GRID_CONTROLLER, GRID_PREDICTED = "the controller's Label", "each sample's prediction"
STRIP_SIZE = 128
GRID_SIZE = 192


@dataclass
class Controls:
    """The controller panel: which map to show and how."""

    label: int
    connection: str
    depth_mode: str  # LAST_LAYER or CUSTOM
    position: int  # 1-based slider position along the connection's layers (1 = nearest the input)
    algorithm: str
    opacity: float = 0.5


def choose_step(view: SampleView, connection: str, depth_mode: str, position: int) -> DepthStep | None:
    """The step the controller points at: the default (deepest with extent), or the slider's position."""
    steps = view.maps.steps(connection)
    if not steps:
        return None
    if depth_mode != CUSTOM:
        return steps[view.maps.default_position(connection) - 1]
    return steps[min(max(int(position), 1), len(steps)) - 1]


def matching_step(view: SampleView, connection: str, step: DepthStep, position: int) -> DepthStep | None:
    """In another run's maps: the step at the same depth (the same layer name first), else the same position."""
    steps = view.maps.steps(connection)
    for candidate in steps:
        if step.layer in candidate.names:
            return candidate
    same_depth = [candidate for candidate in steps if candidate.depth == step.depth]
    if same_depth:
        return same_depth[0]
    return steps[min(max(position, 1), len(steps)) - 1] if steps else None


def step_heat(view: SampleView, controls: Controls, step: DepthStep | None, label: int | None = None):
    """The raw map of ``step`` for the controls' connection and algorithm (None when not computed)."""
    if step is None:
        return None
    return view.maps.heat(controls.connection, controls.algorithm, step.layer,
                          controls.label if label is None else label)


def picture_of(backend: Backend, view: SampleView, controls: Controls, heat, visualizer: str,
               size: int = pictures.VIEW_SIZE) -> np.ndarray:
    """The map drawn as the visualizer says: raw (square or 1-D strip), or over the input / signal."""
    if visualizer == RAW:
        return pictures.raw_picture(heat) if size == pictures.VIEW_SIZE else pictures.heat_picture(heat, (size, size))
    if pictures.is_signal(heat):
        signal = backend.input_signal(view.slice, view.sample_id, controls.connection)
        return pictures.overlay_picture(None, heat, controls.opacity, size, signal=signal)
    image = backend.input_image(view.slice, view.sample_id, controls.connection)
    return pictures.overlay_picture(image, heat, controls.opacity, size)


def label_name(names: Sequence[str], label: int) -> str:
    """The display name of a label index."""
    return names[label] if 0 <= label < len(names) else str(label)


def main_picture(backend: Backend, view: SampleView, controls: Controls, visualizer: str) -> tuple[np.ndarray, str]:
    """The viewer's picture and a one-line description of what it shows."""
    names = backend.label_names
    if visualizer not in (OVERLAY, RAW):
        image = (backend.input_image(view.slice, view.sample_id, controls.connection) if visualizer == INPUT
                 else backend.visualize(visualizer, view.slice, view.sample_id))
        if image is None:
            signal = backend.input_signal(view.slice, view.sample_id, controls.connection)
            if visualizer == INPUT and signal is not None:
                return pictures.signal_picture(signal, np.zeros((1, 2)), 0.0), f"{visualizer} · sample {view.sample_id}"
            return pictures.blank_picture(), f"{visualizer}: needs the project's data (not importable here)"
        return pictures.enlarge(image), f"{visualizer} · sample {view.sample_id}"
    step = choose_step(view, controls.connection, controls.depth_mode, controls.position)
    heat = step_heat(view, controls, step)
    if heat is None:
        return pictures.blank_picture(), (f"no {ALGORITHM_TITLES.get(controls.algorithm, controls.algorithm)} map for "
                                          f"label {label_name(names, controls.label)!r} on {controls.connection!r}")
    picture = picture_of(backend, view, controls, heat, visualizer)
    return picture, step_info(backend, view, controls, step)


def step_info(backend: Backend, view: SampleView, controls: Controls, step: DepthStep) -> str:
    """One line: the layer(s), depth, position, algorithm, label, other layers at this depth, faithfulness."""
    names = backend.label_names
    steps = view.maps.steps(controls.connection)
    title = ALGORITHM_TITLES.get(controls.algorithm, controls.algorithm)
    layers = " = ".join(f"`{name}`" for name in step.names)
    info = (f"layer {layers} · depth **{step.depth}** from `{controls.connection}` "
            f"({steps.index(step) + 1}/{len(steps)}) · {title} · label **{label_name(names, controls.label)}**")
    if step.others:
        info += " · also at this depth: " + ", ".join(f"`{name}`" for name in step.others)
    score = view.faithfulness.get((controls.connection, controls.algorithm, step.layer, int(controls.label)))
    if score is not None:
        info += f" · faithfulness **{score:.2f}** ({backend.faithfulness_note()})"
    return info


def comparison(backend: Backend, view: SampleView, other: SampleView, controls: Controls,
               visualizer: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The other run's picture for the same sample, label, depth and algorithm, and the signed
    difference (this run minus the other), with a caption; blanks and the reason when it has no such map."""
    step = choose_step(view, controls.connection, controls.depth_mode, controls.position)
    other_step = matching_step(other, controls.connection, step, controls.position) if step else None
    heat, other_heat = step_heat(view, controls, step), step_heat(other, controls, other_step)
    if heat is None or other_heat is None:
        blank = pictures.blank_picture()
        return blank, blank, f"run `{other.run}` has no such map for sample {view.sample_id}"
    picture = picture_of(backend, other, controls, other_heat, visualizer)
    size = (pictures.STRIP_HEIGHT, pictures.SIGNAL_SIZE[1]) if pictures.is_signal(heat) else \
        (pictures.VIEW_SIZE, pictures.VIEW_SIZE)
    difference = pictures.difference_picture(heat, other_heat, size)
    names = backend.label_names
    caption = (f"run `{other.run}`: layer `{other_step.layer}` (depth {other_step.depth}) · predicts "
               f"**{label_name(names, other.prediction)}** · difference = `{view.run}` − `{other.run}` "
               "(each scaled to its maximum; red: this run hotter, blue: the other)")
    return picture, difference, caption


def depth_strip(backend: Backend, view: SampleView, controls: Controls) -> list[tuple[np.ndarray, str]]:
    """Every depth step of the chosen label, connection and algorithm, input side first."""
    strip = []
    for step in view.maps.steps(controls.connection):
        heat = step_heat(view, controls, step)
        if heat is not None:
            picture = picture_of(backend, view, controls, heat, OVERLAY, STRIP_SIZE)
            strip.append((picture, f"depth {step.depth}\n{_short(step.title)}"))
    return strip


def _short(text: str, limit: int = 21) -> str:
    """A step title in at most two caption lines (merged names wrap at their " = ")."""
    lines, line = [], ""
    for part in text.split(" = "):
        piece = part if not line else f"{line} = {part}"
        if len(piece) <= limit or not line:
            line = piece
        else:
            lines.append(line + " =")
            line = part
    lines.append(line)
    lines = [item if len(item) <= limit else item[: limit - 1] + "…" for item in lines]
    return "\n".join(lines[:2]) + ("…" if len(lines) > 2 else "")


def grid(backend: Backend, views: Sequence[SampleView], controls: Controls,
         follow: str = GRID_CONTROLLER) -> list[tuple[np.ndarray, str]]:
    """One overlay per selected sample at the controller's depth, for the controller's Label (or,
    with ``follow=GRID_PREDICTED``, for each sample's own prediction)."""
    names, cells = backend.label_names, []
    for view in views:
        step = choose_step(view, controls.connection, controls.depth_mode, controls.position)
        label = view.prediction if follow == GRID_PREDICTED else controls.label
        heat = step_heat(view, controls, step, label)
        if heat is None:
            continue
        mark = "right" if view.gt == view.prediction else "wrong"
        cells.append((picture_of(backend, view, controls, heat, OVERLAY, GRID_SIZE),
                      f"{view.sample_id} · label {label_name(names, label)} · pred "
                      f"{label_name(names, view.prediction)} ({mark})"))
    return cells


def summary(backend: Backend, view: SampleView, others: Sequence[SampleView] = ()) -> str:
    """Prediction vs ground truth, confidence and loss, as Markdown; one row per run (``others``: the
    compared runs' views of the same sample)."""
    names = backend.label_names
    truth = label_name(names, view.gt) if view.gt is not None else "unknown"
    verdict = "" if view.gt is None else _coloured(*(("correct", pictures.CORRECT) if view.gt == view.prediction
                                                     else ("wrong", pictures.WRONG)))
    rows = ""
    for one in (view, *others):
        confidence = f"{one.confidence:.3f}" if one.confidence is not None else "n/a"
        loss = f"{one.loss:.3f}" if one.loss is not None else "n/a"
        rows += f"| `{one.run}` | **{label_name(names, one.prediction)}** | **{truth}** | {confidence} | {loss} |\n"
    return (f"### Sample `{view.sample_id}` {verdict}\n"
            f"| run | prediction | ground truth | confidence | loss |\n|---|---|---|---|---|\n{rows}\n"
            f"run `{view.run}` · slice `{view.slice}`")


def _coloured(text: str, colour: str) -> str:
    return f'<span style="color:{colour}">{text}</span>'


def topk(backend: Backend, view: SampleView) -> np.ndarray:
    """The top-k probability bars, or a blank picture without probabilities."""
    if view.probabilities is None:
        return pictures.blank_picture(160)
    return pictures.topk_picture(view.probabilities, backend.label_names, view.gt)


def confusion(backend: Backend, view: SampleView) -> np.ndarray:
    """The slice's confusion matrix with this sample's cell marked."""
    cell = (view.gt, view.prediction) if view.gt is not None else None
    return pictures.confusion_picture(backend.confusion(view.run, view.slice), backend.label_names, cell)
