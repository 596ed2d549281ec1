"""What the browser needs to draw the viewer itself (``ui/viewer.js``): one analyzed sample's maps.

Sent once per sample, run and visualizer, so that label, depth, connection, algorithm, opacity and
raw/overlay switches need no round trip to the server. The maps travel as they are stored (uint8,
scaled by their maximum) with the jet lookup table and the input picture; the page repeats
:mod:`ui.pictures`' arithmetic. The info lines are written here, by :func:`ui.views.step_info`, so
the page and the server say the same thing. Other visualizers (connection input, the project's) are
sent as finished pictures, one per connection.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from camscope.algorithms import ALGORITHM_TITLES
from camscope.heatmap import colorize, quantize, to_rgb
from ui import pictures, views
from ui.backend import Backend, SampleView

MAP_VISUALIZERS = (views.OVERLAY, views.RAW)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.uint8).tobytes()).decode()


def png_url(picture: np.ndarray) -> str:
    """An RGB uint8 picture as a ``data:image/png`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(to_rgb(picture)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def payload_key(view: SampleView, visualizer: str) -> tuple[str, str, str, str]:
    """What a payload depends on: the sample, its run and the kind of visualizer."""
    return view.run, view.slice, view.sample_id, "maps" if visualizer in MAP_VISUALIZERS else visualizer


def payload(backend: Backend, view: SampleView, visualizer: str) -> str:
    """The JSON the page draws the viewer from (see ``ui/viewer.js`` for how it is read)."""
    names = backend.label_names
    labels = view.maps.labels or list(range(len(names)))
    blank = pictures.blank_picture()
    data = {"custom": views.CUSTOM, "raw": views.RAW, "blank": [*blank.shape[:2], int(blank[0, 0, 0])],
            "labels": {label: views.label_name(names, label) for label in labels}, "titles": ALGORITHM_TITLES}
    if visualizer in MAP_VISUALIZERS:
        data.update(kind="maps", visualizers=list(MAP_VISUALIZERS), **_maps(backend, view, labels))
    else:
        data.update(kind="picture", visualizers=[visualizer], connections={
            connection: {"picture": _picture(backend, view, connection, visualizer)}
            for connection in view.maps.connections})
    return json.dumps(data, separators=(",", ":"))


def _picture(backend: Backend, view: SampleView, connection: str, visualizer: str) -> dict:
    controls = views.Controls(view.prediction, connection, views.LAST_LAYER, 1, "gradcam")
    picture, info = views.main_picture(backend, view, controls, visualizer)
    return {"src": png_url(picture), "info": info}


def _maps(backend: Backend, view: SampleView, labels: list[int]) -> dict:
    """Every map of the sample (one per depth step), the inputs, and the info line of each choice."""
    connections, maps, info = {}, {}, {}
    for connection in view.maps.connections:
        steps = view.maps.steps(connection)
        image = backend.input_image(view.slice, view.sample_id, connection)
        signal = backend.input_signal(view.slice, view.sample_id, connection)
        connections[connection] = {
            "steps": [step.layer for step in steps], "default": view.maps.default_position(connection),
            "image": None if image is None else [*to_rgb(image).shape[:2], _b64(to_rgb(image))],
            "signal": None if signal is None else np.asarray(signal, np.float32).reshape(
                -1, np.shape(signal)[-1]).round(5).tolist()}
        for position, step in enumerate(steps, start=1):
            for algorithm in view.maps.algorithms:
                for label in labels:
                    controls = views.Controls(label, connection, views.CUSTOM, position, algorithm)
                    heat = views.step_heat(view, controls, step)
                    if heat is None:
                        continue
                    heat = np.asarray(heat, np.float32).reshape(heat.shape[0], -1)
                    maps[f"{connection}|{algorithm}|{step.layer}|{label}"] = [*heat.shape, _b64(quantize(heat)[0])]
                    info[f"{connection}|{algorithm}|{position}|{label}"] = views.step_info(backend, view, controls,
                                                                                           step)
    sizes = {"view": pictures.VIEW_SIZE, "strip": [pictures.STRIP_HEIGHT, pictures.SIGNAL_SIZE[1]],
             "signal": list(pictures.signal_size()), "signal_colours": pictures.SIGNAL_COLOURS,
             "signal_margin": pictures.SIGNAL_MARGIN, "signal_min_alpha": pictures.SIGNAL_MIN_ALPHA}
    return {"connections": connections, "maps": maps, "info": info, "sizes": sizes,
            "lut": _b64(colorize(np.arange(256, dtype=np.uint8)))}
