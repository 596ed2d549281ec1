"""The Sample Analysis UI (``camscope ui``): population | sample list | viewer | controller | error analysis.

Modelled on Tensorleap's Sample Analysis dashlet. Layout first (:func:`_layout`), then every event
wired in one place (:func:`_wire`); the handlers live on :class:`Handlers` and only translate
between Gradio values and :mod:`ui.views` / :class:`ui.backend.Backend`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page server

import gradio as gr
import numpy as np

from camscope.algorithms import ALGORITHM_TITLES
from ui import pictures, views
from ui.backend import Backend, SampleView, UIError
from ui.views import CUSTOM, INPUT, LAST_LAYER, OVERLAY, RAW, Controls

NO_COMPARE = "(none)"
STRIP_COLUMNS = 9
GRID_COLUMNS, GRID_ROW_PX = 6, 215
SIMILAR_K = 5
DEFAULT_ALGORITHM = "gradcam"
TITLE = "camscope · Sample Analysis"
CSS = """
.gradio-container {max-width: 1500px !important}
#header {padding: 4px 0 0 0}
#status p {color: #b42318; font-weight: 600; margin: 0}
#layer-info p {font-size: 0.92em; margin: 0}
.panel-title p {font-weight: 700; font-size: 1.02em; margin: 0; border-bottom: 2px solid #ff7f0e}
"""


def _friendly(handler, outputs: list, status: gr.Markdown):
    """Show any failure as one readable line (a warning toast and the status line), never a traceback,
    and leave the other outputs as they were so the page stays usable."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the page must always get a readable message
            message = " ".join(str(error).split()) or type(error).__name__
            gr.Warning(message)
            values = [f"**Problem:** {message}" if output is status else gr.skip() for output in outputs]
            return values[0] if len(values) == 1 else tuple(values)

    return wrapped


@dataclass
class Panels:
    """Every component the handlers read or write."""

    state: gr.State
    status: gr.Markdown
    run: gr.Dropdown
    compare: gr.Dropdown
    slice: gr.Dropdown
    colour: gr.Radio
    population: gr.Image
    picked: gr.Markdown
    analyze_picked: gr.Button
    sample_id: gr.Textbox
    analyze: gr.Button
    select_all: gr.Button
    add_sample: gr.Button
    fetch_similar: gr.Button
    listed: gr.CheckboxGroup
    visualizer: gr.Radio
    image: gr.Image
    compare_image: gr.Image
    layer_info: gr.Markdown
    grid: gr.Gallery
    label: gr.Dropdown
    connection: gr.Radio
    depth_mode: gr.Radio
    depth: gr.Slider
    algorithm: gr.Radio
    opacity: gr.Slider
    summary: gr.Markdown
    topk: gr.Image
    confusion: gr.Image
    strip: gr.Image

    @property
    def controls(self) -> list:
        """The inputs every render reads, in :meth:`Handlers.controls` order."""
        return [self.label, self.connection, self.depth_mode, self.depth, self.algorithm, self.opacity]


class Handlers:
    """Event handlers over one :class:`Backend`; per-user state is a plain dict in ``gr.State``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- choosing run, slice, sample ------------------------------------------------------
    def start(self) -> tuple:
        """Fill the run choosers on page load."""
        runs = self.backend.runs()
        return gr.update(choices=runs, value=runs[0]), gr.update(choices=[NO_COMPARE, *runs], value=NO_COMPARE)

    def pick_run(self, run: str) -> Any:
        """The slices of the chosen run."""
        slices = self.backend.slices(run)
        return gr.update(choices=slices, value=slices[0] if slices else None)

    def open_slice(self, run: str, slice: str, colour: str, current: str) -> tuple:
        """New run/slice: reset the session, draw the population, keep the sample if it is there too."""
        if not slice:
            raise UIError(f"run {run!r} has no data slices")
        sample = current if self.backend.has_sample(run, slice, current) else self.backend.default_sample(run, slice)
        if sample is None:
            raise UIError(f"slice {slice!r} of run {run!r} is empty: no samples to analyze")
        state = {"run": run, "slice": slice, "current": None, "listed": [], "pixels": None}
        picture = self._population(state, colour)
        return state, picture, sample, gr.update(choices=[], value=[]), "", "Click a dot to pick a sample."

    def _population(self, state: dict, colour: str, marked: list[str] = ()) -> np.ndarray:
        frame = self.backend.population(state["run"], state["slice"])
        if frame.empty or frame[["x", "y"]].isna().all().all():
            state["pixels"], state["ids"] = None, []
            return pictures.blank_picture(360)
        picture, pixels = pictures.population_picture(frame, colour, self.backend.label_names, marked, state["current"])
        state["pixels"], state["ids"] = pixels.tolist(), frame["sample_id"].tolist()
        return picture

    def recolour(self, state: dict, colour: str) -> tuple:
        """Redraw the population with another colouring."""
        return state, self._population(state, colour, state["listed"])

    def pick(self, state: dict, evt: gr.SelectData) -> tuple:
        """A click on the population picture picks the nearest dot."""
        if not state.get("pixels"):
            raise UIError("this slice has no 2-D projection to click on")
        x, y = evt.index[:2]
        distances = np.hypot(*(np.asarray(state["pixels"]) - [x, y]).T)
        sample = state["ids"][int(np.argmin(distances))]
        row = self.backend.population(state["run"], state["slice"]).set_index("sample_id").loc[sample]
        names = self.backend.label_names
        text = (f"Picked **{sample}**: ground truth {views.label_name(names, int(row['gt']))}, "
                f"prediction {views.label_name(names, int(row['prediction']))}, loss {row['loss']:.3f}")
        return sample, text

    def analyze(self, state: dict, sample_id: str, colour: str) -> tuple:
        """Analyze a sample: reset the controller to its defaults (predicted label, last layer)."""
        view = self._view(state, sample_id)
        state = {**state, "current": view.sample_id}
        if view.sample_id not in state["listed"]:
            state["listed"] = [*state["listed"], view.sample_id]
        names = self.backend.label_names
        labels = view.maps.labels or list(range(len(names)))
        connections = view.maps.connections
        steps = view.maps.steps(connections[0]) if connections else []
        algorithms = [(ALGORITHM_TITLES.get(a, a), a) for a in ALGORITHM_TITLES if a in view.maps.algorithms]
        return (
            state,
            gr.update(choices=[(views.label_name(names, i), i) for i in labels], value=view.prediction),
            gr.update(choices=connections, value=connections[0] if connections else None),
            LAST_LAYER,
            gr.update(minimum=1, maximum=max(len(steps), 2), value=max(len(steps), 1)),
            gr.update(choices=algorithms),
            views.summary(self.backend, view),
            views.topk(self.backend, view),
            views.confusion(self.backend, view),
            self._population(state, colour, state["listed"]),
            gr.update(choices=state["listed"], value=[view.sample_id]),
            "",
        )

    def _view(self, state: dict, sample_id: str) -> SampleView:
        if not state or not state.get("slice"):
            raise UIError("choose a model run and a data slice first")
        try:
            return self.backend.view(state["run"], state["slice"], str(sample_id or "").strip())
        except ValueError as error:
            message = " ".join(str(error).split())
            if "unknown sample" in message.lower() and not message.startswith("Unknown"):
                message = f"Unknown sample id {str(sample_id).strip()!r}: {message}"
            raise UIError(message) from error

    # -- viewer ---------------------------------------------------------------------------
    @staticmethod
    def controls(label, connection, depth_mode, depth, algorithm, opacity) -> Controls:
        """The controller's values as :class:`Controls`."""
        return Controls(int(label), connection, depth_mode, int(depth), algorithm or DEFAULT_ALGORITHM, float(opacity))

    def render(self, state: dict, visualizer: str, compare: str, *values) -> tuple:
        """The viewer (and the comparison run's view): the part that must switch instantly."""
        view = self._view(state, state.get("current"))
        controls = self.controls(*values)
        picture, info = views.main_picture(self.backend, view, controls, visualizer)
        if compare in (None, NO_COMPARE, state["run"]):
            return picture, info, gr.update(visible=False)
        try:
            other = self.backend.view(compare, state["slice"], view.sample_id)
        except ValueError:
            return picture, info, gr.update(value=pictures.blank_picture(), visible=True,
                                            label=f"Run {compare}: no maps for sample {view.sample_id}")
        other_picture, _ = views.main_picture(self.backend, other, controls, visualizer)
        return picture, info, gr.update(value=other_picture, visible=True, label=f"Run: {compare}")

    def extras(self, state: dict, checked: list[str], *values) -> tuple:
        """The depth strip and, for two or more checked samples, the grid."""
        view = self._view(state, state.get("current"))
        controls = self.controls(*values)
        tiles = views.depth_strip(self.backend, view, controls)
        strip = pictures.tile_sheet(tiles, STRIP_COLUMNS) if tiles else pictures.blank_picture(64)
        chosen = [self._view(state, sid) for sid in checked or []]
        cells = views.grid(self.backend, chosen, controls) if len(chosen) > 1 else []
        return strip, gr.update(value=cells, visible=bool(cells), height=_gallery_height(len(cells)))

    def connection_steps(self, state: dict, connection: str) -> Any:
        """Another connection has other layers: reset the slider to its deepest layer."""
        steps = self._view(state, state.get("current")).maps.steps(connection)
        return gr.update(maximum=max(len(steps), 2), value=max(len(steps), 1))

    def render_custom(self, state: dict, visualizer: str, compare: str, label, connection, depth_mode, depth,
                      algorithm, opacity) -> tuple:
        """Moving the depth slider means a custom depth: switch the mode and render in one step."""
        return CUSTOM, *self.render(state, visualizer, compare, label, connection, CUSTOM, depth, algorithm, opacity)

    # -- sample list ----------------------------------------------------------------------
    def add_sample(self, state: dict, sample_id: str, checked: list[str]) -> tuple:
        """Add the id in the text field (or the picked dot) to the list."""
        view = self._view(state, sample_id)
        return self._listed(state, [view.sample_id], checked)

    def select_all(self, state: dict) -> tuple:
        """Check every listed sample."""
        return state, gr.update(choices=state["listed"], value=list(state["listed"])), ""

    def fetch_similar(self, state: dict, checked: list[str]) -> tuple:
        """Add the current sample's nearest neighbours in embedding space."""
        if not state.get("current"):
            raise UIError("analyze a sample first")
        found = self.backend.similar(state["run"], state["slice"], state["current"], SIMILAR_K)
        return self._listed(state, [state["current"], *found], checked)

    @staticmethod
    def _listed(state: dict, ids: list[str], checked: list[str]) -> tuple:
        listed = list(dict.fromkeys([*state["listed"], *ids]))
        value = list(dict.fromkeys([*(checked or []), *ids]))
        return {**state, "listed": listed}, gr.update(choices=listed, value=value), ""

    def jump_to_depth(self, state: dict, label, connection, depth_mode, depth, algorithm, opacity,
                      evt: gr.SelectData) -> tuple:
        """Clicking a tile of the depth strip shows that layer in the viewer (custom depth)."""
        view = self._view(state, state.get("current"))
        controls = self.controls(label, connection, depth_mode, depth, algorithm, opacity)
        steps = [step for step in view.maps.steps(controls.connection)
                 if view.maps.heat(controls.connection, controls.algorithm, step.layer, controls.label) is not None]
        index = pictures.sheet_index(*evt.index[:2], STRIP_COLUMNS, len(steps))
        if index is None:
            return gr.skip(), gr.skip()
        return CUSTOM, view.maps.steps(controls.connection).index(steps[index]) + 1

    def open_cell(self, state: dict, checked: list[str], evt: gr.SelectData) -> str:
        """Clicking a grid cell puts that sample in the text field (then it is analyzed)."""
        return list(checked or [])[evt.index] if evt.index is not None else state.get("current")


def _gallery_height(items: int) -> int:
    """Pixels that show every row of the grid without scrolling."""
    return max(1, -(-items // GRID_COLUMNS)) * GRID_ROW_PX + 60


def _layout(backend: Backend) -> tuple[gr.Blocks, Panels]:
    """The components, mirroring the dashlet: choosers, population + sample list, viewer, controller, errors."""
    visualizers = [OVERLAY, RAW, *backend.visualizers(), INPUT]
    algorithms = [(title, key) for key, title in ALGORITHM_TITLES.items()]
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        state = gr.State({})
        gr.Markdown(f"## {TITLE}\n{backend.describe()}", elem_id="header")
        status = gr.Markdown("", elem_id="status")
        with gr.Row(equal_height=True):
            run = gr.Dropdown(label="Model run", scale=2)
            compare = gr.Dropdown(label="Compare with run", scale=2)
            slice_ = gr.Dropdown(label="Data slice", scale=2)
            colour = gr.Radio(list(pictures.COLOUR_BY), value="correctness", label="Colour population by", scale=3)
        with gr.Row(elem_id="population-row"):
            with gr.Column(scale=5):
                gr.Markdown("Population exploration", elem_classes="panel-title")
                population = gr.Image(label="Population (click a dot to pick a sample)", interactive=False,
                                      format="png", height=380, show_label=False, buttons=[],
                                      elem_id="population")
                picked = gr.Markdown("Click a dot to pick a sample.")
                analyze_picked = gr.Button("Analyze sample", variant="primary")
            with gr.Column(scale=4):
                gr.Markdown("Sample list", elem_classes="panel-title")
                with gr.Row(equal_height=True):
                    sample_id = gr.Textbox(label="Sample id", placeholder="e.g. 4000", scale=3)
                    analyze = gr.Button("Analyze", variant="primary", scale=1)
                with gr.Row():
                    select_all = gr.Button("Select all", size="sm")
                    add_sample = gr.Button("Add sample", size="sm")
                    fetch_similar = gr.Button("Fetch similar", size="sm")
                listed = gr.CheckboxGroup(label="Selected samples (checked ones form the grid)", choices=[])
                summary = gr.Markdown()
        with gr.Row(elem_id="viewer-row"):
            with gr.Column(scale=5):
                gr.Markdown("Viewer", elem_classes="panel-title")
                visualizer = gr.Radio(visualizers, value=OVERLAY, label="Visualizer")
                with gr.Row():
                    image = gr.Image(label="Viewer", interactive=False, format="png", height=340, show_label=False,
                                     elem_id="viewer-image")
                    compare_image = gr.Image(label="Comparison run", interactive=False, format="png", height=340,
                                             visible=False, elem_id="compare-image")
                layer_info = gr.Markdown(elem_id="layer-info")
            with gr.Column(scale=3):
                gr.Markdown("Controller", elem_classes="panel-title")
                label = gr.Dropdown(label="Label (default: the predicted label)", choices=[], interactive=True)
                connection = gr.Radio(label="Connection (input the heatmap is overlaid on)", choices=[])
                depth_mode = gr.Radio([LAST_LAYER, CUSTOM], value=LAST_LAYER, label="Depth")
                depth = gr.Slider(1, 2, value=2, step=1, label="Depth position (custom: move left towards the input)")
                algorithm = gr.Radio(algorithms, value=DEFAULT_ALGORITHM, label="Algorithm")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
            with gr.Column(scale=4):
                gr.Markdown("Error analysis", elem_classes="panel-title")
                topk = gr.Image(label="Top-k probabilities", interactive=False, format="png", height=220,
                                show_label=False)
                confusion = gr.Image(label="Confusion matrix", interactive=False, format="png", height=340,
                                     show_label=False)
        gr.Markdown("Depth strip: every layer of the chosen label, input side first (click one to view it)",
                    elem_classes="panel-title")
        strip = gr.Image(label="Depth strip", interactive=False, format="png", show_label=False, buttons=[],
                         elem_id="depth-strip")
        grid = gr.Gallery(label="Grid of the checked samples (each for its predicted label)", columns=GRID_COLUMNS,
                          height=GRID_ROW_PX + 60, object_fit="contain", visible=False, allow_preview=False,
                          elem_id="grid")
    panels = Panels(state, status, run, compare, slice_, colour, population, picked, analyze_picked, sample_id,
                    analyze, select_all, add_sample, fetch_similar, listed, visualizer, image, compare_image,
                    layer_info, grid, label, connection, depth_mode, depth, algorithm, opacity, summary, topk,
                    confusion, strip)
    return demo, panels


def _wire(demo: gr.Blocks, p: Panels, h: Handlers) -> None:
    """All event wiring, in one place. User edits use ``.input`` so programmatic updates don't re-fire."""
    render_in = [p.state, p.visualizer, p.compare, *p.controls]
    extras_in = [p.state, p.listed, *p.controls]
    analyzed = [p.state, p.label, p.connection, p.depth_mode, p.depth, p.algorithm, p.summary, p.topk, p.confusion,
                p.population, p.listed, p.status]

    viewer = [p.image, p.layer_info, p.compare_image]

    def on(trigger, handler, inputs, outputs, **options):
        outputs = list(outputs)
        return trigger(_friendly(handler, outputs, p.status), inputs, outputs, **options)

    def switch(trigger, handler=h.render, outputs=viewer):
        """A controller change: the viewer at once (one round trip, no queue), then the strip and grid."""
        rendered = on(trigger, handler, render_in, outputs, queue=False, show_progress="hidden")
        return on(rendered.then, h.extras, extras_in, [p.strip, p.grid], show_progress="hidden")

    def refresh(event):
        """After an event: the viewer first (fast), then the strip and grid."""
        return switch(event.then)

    def analyze(event):
        return refresh(on(event.then, h.analyze, [p.state, p.sample_id, p.colour], analyzed))

    def open_slice(event):
        return analyze(on(event.then, h.open_slice, [p.run, p.slice, p.colour, p.sample_id],
                          [p.state, p.population, p.sample_id, p.listed, p.status, p.picked]))

    started = on(demo.load, h.start, None, [p.run, p.compare])
    open_slice(on(started.then, h.pick_run, [p.run], [p.slice]))
    open_slice(on(p.run.input, h.pick_run, [p.run], [p.slice]))
    open_slice(p.slice.input(lambda: None, None, None))
    on(p.colour.input, h.recolour, [p.state, p.colour], [p.state, p.population])
    on(p.population.select, h.pick, [p.state], [p.sample_id, p.picked])
    for trigger in (p.analyze.click, p.analyze_picked.click, p.sample_id.submit):
        analyze(trigger(lambda: None, None, None))
    for control in (p.label, p.algorithm, p.depth_mode, p.opacity, p.visualizer, p.compare):
        switch(control.input)
    switch(p.depth.input, h.render_custom, [p.depth_mode, *viewer])
    refresh(on(p.connection.input, h.connection_steps, [p.state, p.connection], [p.depth]))
    refresh(on(p.strip.select, h.jump_to_depth, [p.state, *p.controls], [p.depth_mode, p.depth]))
    on(p.listed.input, h.extras, extras_in, [p.strip, p.grid])
    for button, handler, inputs in ((p.select_all, h.select_all, [p.state]),
                                    (p.add_sample, h.add_sample, [p.state, p.sample_id, p.listed]),
                                    (p.fetch_similar, h.fetch_similar, [p.state, p.listed])):
        listed = on(button.click, handler, inputs, [p.state, p.listed, p.status])
        on(listed.then, h.extras, extras_in, [p.strip, p.grid])
    analyze(on(p.grid.select, h.open_cell, [p.state, p.listed], [p.sample_id]))


def build_app(store: str | None = None, api: str | None = None, project: str | None = None) -> gr.Blocks:
    """The Gradio app over a store directory and/or a Serve endpoint URL (at least one)."""
    backend = Backend(store, api, project)
    demo, panels = _layout(backend)
    with demo:
        _wire(demo, panels, Handlers(backend))
    return demo


def launch(store: str | None = None, api: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           block: bool = False, project: str | None = None) -> gr.Blocks:
    """Build and serve the app at ``http://host:port/``; returns at once unless ``block``."""
    demo = build_app(store=store, api=api, project=project)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=int(port), prevent_thread_lock=not block, quiet=True,
                show_error=True, ssr_mode=False, css=CSS, theme=gr.themes.Soft(primary_hue="orange"),
                footer_links=[])
    return demo


def run_cli(args) -> int:
    """``camscope ui``: serve until interrupted."""
    demo = launch(store=args.store, api=args.api, host=args.host, port=args.port)
    print(f"camscope ui: http://{args.host}:{args.port}/", flush=True)
    demo.block_thread()
    return 0
