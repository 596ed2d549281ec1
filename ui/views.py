"""What each panel shows for a sample and the controller's settings (pure: no Gradio here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from camscope.algorithms import ALGORITHM_TITLES
from ui import pictures
from ui.backend import Backend, SampleView
from ui.sample_maps import LayerStep

OVERLAY, RAW, INPUT = "Heatmap overlay", "Raw heatmap", "Connection input"
LAST_LAYER, CUSTOM = "last layer", "custom"
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


def choose_step(view: SampleView, connection: str, depth_mode: str, position: int) -> LayerStep | None:
    """The layer the controller points at: the deepest one, or the slider's position."""
    steps = view.maps.steps(connection)
    if not steps:
        return None
    if depth_mode != CUSTOM:
        return steps[-1]
    return steps[min(max(int(position), 1), len(steps)) - 1]


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
            return pictures.blank_picture(), f"{visualizer}: needs the project's data (not importable here)"
        return pictures.enlarge(image), f"{visualizer} · sample {view.sample_id}"
    step = choose_step(view, controls.connection, controls.depth_mode, controls.position)
    heat = view.maps.heat(controls.connection, controls.algorithm, step.layer, controls.label) if step else None
    if heat is None:
        return pictures.blank_picture(), (f"no {ALGORITHM_TITLES.get(controls.algorithm, controls.algorithm)} map for "
                                          f"label {label_name(names, controls.label)!r} on {controls.connection!r}")
    if visualizer == RAW:
        picture = pictures.heat_picture(heat)
    else:
        image = backend.input_image(view.slice, view.sample_id, controls.connection)
        picture = pictures.overlay_picture(image, heat, controls.opacity)
    steps = view.maps.steps(controls.connection)
    title = ALGORITHM_TITLES.get(controls.algorithm, controls.algorithm)
    info = (f"layer `{step.layer}` · depth **{step.depth}** from `{controls.connection}` "
            f"({steps.index(step) + 1}/{len(steps)}) · {title} · label **{label_name(names, controls.label)}**")
    score = view.faithfulness.get((controls.connection, controls.algorithm, step.layer, int(controls.label)))
    if score is not None:
        info += f" · faithfulness **{score:.2f}** ({backend.faithfulness_note()})"
    return picture, info


def depth_strip(backend: Backend, view: SampleView, controls: Controls) -> list[tuple[np.ndarray, str]]:
    """Every depth of the chosen label, connection and algorithm, input side first."""
    image = backend.input_image(view.slice, view.sample_id, controls.connection)
    strip = []
    for step in view.maps.steps(controls.connection):
        heat = view.maps.heat(controls.connection, controls.algorithm, step.layer, controls.label)
        if heat is not None:
            picture = pictures.overlay_picture(image, heat, controls.opacity, STRIP_SIZE)
            strip.append((picture, f"depth {step.depth}\n{step.layer}"))
    return strip


def grid(backend: Backend, views: Sequence[SampleView], controls: Controls) -> list[tuple[np.ndarray, str]]:
    """One overlay per selected sample, each for its own predicted label at the controller's depth."""
    names, cells = backend.label_names, []
    for view in views:
        step = choose_step(view, controls.connection, controls.depth_mode, controls.position)
        heat = view.maps.heat(controls.connection, controls.algorithm, step.layer, view.prediction) if step else None
        if heat is None:
            continue
        image = backend.input_image(view.slice, view.sample_id, controls.connection)
        mark = "right" if view.gt == view.prediction else "wrong"
        cells.append((pictures.overlay_picture(image, heat, controls.opacity, GRID_SIZE),
                      f"{view.sample_id} · pred {label_name(names, view.prediction)} ({mark})"))
    return cells


def summary(backend: Backend, view: SampleView) -> str:
    """Prediction vs ground truth, confidence and loss, as Markdown."""
    names = backend.label_names
    predicted = label_name(names, view.prediction)
    truth = label_name(names, view.gt) if view.gt is not None else "unknown"
    verdict = "" if view.gt is None else _coloured(*(("correct", pictures.CORRECT) if view.gt == view.prediction
                                                     else ("wrong", pictures.WRONG)))
    confidence = f"{view.confidence:.3f}" if view.confidence is not None else "n/a"
    loss = f"{view.loss:.3f}" if view.loss is not None else "n/a"
    return (f"### Sample `{view.sample_id}` {verdict}\n"
            f"| prediction | ground truth | confidence | loss |\n|---|---|---|---|\n"
            f"| **{predicted}** | **{truth}** | {confidence} | {loss} |\n\n"
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
