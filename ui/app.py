"""The Sample Analysis UI (``camscope ui``): population | sample list | viewer | controller | error analysis.

Modelled on Tensorleap's Sample Analysis dashlet. Layout first (:func:`_layout`), then every event
wired in one place (:func:`_wire`); the handlers live on :class:`Handlers` and only translate
between Gradio values and :mod:`ui.views` / :class:`ui.backend.Backend`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page server

import gradio as gr

from pathlib import Path

from fastapi import Response

from camscope.algorithms import ALGORITHM_TITLES
from ui import pictures, population, viewer_data, views
from ui.backend import Backend, SampleView, UIError
from ui.export import export_files
from ui.views import CUSTOM, GRID_CONTROLLER, GRID_PREDICTED, INPUT, LAST_LAYER, OVERLAY, RAW, Controls

NO_COMPARE = "(none)"
STRIP_COLUMNS = 9
GRID_COLUMNS, GRID_ROW_PX = 6, 215
GRID_MAX = 24  # cells drawn at most (a lasso may list hundreds of samples)
SIMILAR_K = 5
THUMBNAIL_ROUTE = "/camscope/thumbnail"
SCRIPT = "\n".join(Path(__file__).with_name(name).read_text() for name in ("population.js", "viewer.js"))
VIEWER_HTML = '<canvas aria-label="Viewer"></canvas><div id="layer-info"></div>'  # drawn by ui/viewer.js
# Gradio event js over [viewer_data, visualizer, *controls]: the page draws the viewer itself
DRAW = "(...values) => { window.camscopeViewer.render(...values); }"
DRAW_CUSTOM = ("(...values) => { values[4] = %s; window.camscopeViewer.render(...values); return values[4]; }"
               % json.dumps(CUSTOM))
DRAW_CONNECTION = ("(...values) => { values[4] = %s; values[5] = window.camscopeViewer.defaultPosition(values[0], "
                   "values[3]); window.camscopeViewer.render(...values); return [values[4], values[5]]; }"
                   % json.dumps(LAST_LAYER))
DEFAULT_ALGORITHM = "gradcam"
TITLE = "camscope · Sample Analysis"
CSS = """
.gradio-container {max-width: 1500px !important}
#header {padding: 4px 0 0 0}
#status p {color: #b42318; font-weight: 600; margin: 0}
#viewer-image {min-height: 340px}
#viewer-image canvas {display: block; margin: 0 auto; max-width: 100%; max-height: 340px; object-fit: contain}
#layer-info, #compare-info p {font-size: 0.92em; margin: 0}
.panel-title p {font-weight: 700; font-size: 1.02em; margin: 0; border-bottom: 2px solid #ff7f0e}
"""


class NotReady(UIError):
    """Nothing to do yet because an earlier step (listing runs, opening a slice) failed; it said why."""


def _friendly(handler, outputs: list, status: gr.Markdown):
    """Show any failure as one readable line (a warning toast and the status line), never a traceback,
    and leave the other outputs as they were so the page stays usable."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except NotReady:  # an earlier step failed and said why (its line stays); nothing to do here
            values = [gr.skip() for _ in outputs]
            return values[0] if len(values) == 1 else tuple(values)
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
    projection: gr.Radio
    colour: gr.Dropdown
    population: gr.Plot
    population_click: gr.Textbox
    population_selection: gr.Textbox
    picked: gr.Markdown
    sample_id: gr.Textbox
    analyze: gr.Button
    add_sample: gr.Button
    select_all: gr.Button
    remove: gr.Button
    clear: gr.Button
    add_selection: gr.Button
    similar_k: gr.Number
    fetch_similar: gr.Button
    listed: gr.CheckboxGroup
    visualizer: gr.Radio
    viewer: gr.HTML
    viewer_data: gr.Textbox
    viewer_key: gr.Textbox
    compare_image: gr.Image
    difference: gr.Image
    compare_info: gr.Markdown
    grid: gr.Gallery
    grid_note: gr.Markdown
    label: gr.Dropdown
    connection: gr.Radio
    depth_mode: gr.Radio
    depth: gr.Slider
    algorithm: gr.Radio
    opacity: gr.Slider
    grid_follows: gr.Radio
    export: gr.Button
    exported: gr.File
    summary: gr.Markdown
    topk: gr.Image
    confusion: gr.Image
    strip: gr.Image

    @property
    def controls(self) -> list:
        """The inputs every render reads, in :meth:`Handlers.controls` order."""
        return [self.label, self.connection, self.depth_mode, self.depth, self.algorithm, self.opacity]

    @property
    def drawing(self) -> list:
        """What the page draws the viewer from (ui/viewer.js): the sample's payload, visualizer and controls."""
        return [self.viewer_data, self.visualizer, *self.controls]


class Handlers:
    """Event handlers over one :class:`Backend`; per-user state is a plain dict in ``gr.State``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- choosing run, slice, sample ------------------------------------------------------
    def start(self) -> tuple:
        """Fill the run choosers on page load."""
        runs = self.backend.runs()
        return gr.update(choices=runs, value=runs[0]), gr.update(choices=[NO_COMPARE, *runs], value=NO_COMPARE), ""

    def pick_run(self, run: str) -> tuple:
        """The slices of the chosen run."""
        if not run:
            raise NotReady("no model run chosen")
        slices = self.backend.slices(run)
        return gr.update(choices=slices, value=slices[0] if slices else None), ""

    def open_slice(self, run: str, slice: str, projection: str, colour: str, current: str) -> tuple:
        """New run/slice: reset the session, draw the population, keep the sample if it is there too."""
        if not run:
            raise NotReady("no model run chosen")
        if not slice:
            raise UIError(f"run {run!r} has no data slices")
        sample = current if self.backend.has_sample(run, slice, current) else self.backend.default_sample(run, slice)
        if sample is None:
            raise UIError(f"slice {slice!r} of run {run!r} is empty: no samples to analyze")
        state = {"run": run, "slice": slice, "current": None, "listed": [], "selection": []}
        frame = self.backend.population(run, slice)
        projections = population.projections(frame)
        projection = projection if projection in projections else (projections[0] if projections else None)
        colours = population.colour_fields(frame, self.backend.metadata(slice))
        colour = colour if colour in colours else colours[0]
        return (state, gr.update(choices=projections, value=projection), gr.update(choices=colours, value=colour),
                self._population(state, projection, colour), sample, gr.update(choices=[], value=[]), "",
                f"{len(frame)} samples. Click a point to open it; box or lasso select adds to the sample list.")

    def _population(self, state: dict, projection: str | None, colour: str) -> Any:
        frame = self.backend.population(state["run"], state["slice"])
        if frame.empty or projection is None:
            return None
        thumbnails = self.backend.project is not None and self.backend.thumbnail_ready
        return population.figure(frame, projection, colour, self.backend.label_names, self.backend.metadata(state["slice"]),
                                 meta={"slice": state["slice"], "thumbnails": THUMBNAIL_ROUTE if thumbnails else ""})

    def redraw(self, state: dict, projection: str, colour: str) -> Any:
        """Another projection or colouring of the population."""
        if not state.get("slice"):
            raise UIError("choose a model run and a data slice first")
        return self._population(state, projection, colour)

    def pick(self, state: dict, clicked: str) -> tuple:
        """A click on a population point: its id goes to the Sample id field (then it is analyzed)."""
        sample = str(clicked or "").split("|")[0]
        if not sample:
            return gr.skip(), gr.skip()
        return sample, self._describe(state, sample, "Picked")

    def _describe(self, state: dict, sample: str, verb: str) -> str:
        row = self.backend._population_row(state["run"], state["slice"], sample)
        if row is None:
            return f"{verb} **{sample}**"
        names = self.backend.label_names
        return (f"{verb} **{sample}**: ground truth {views.label_name(names, int(row['gt']))}, "
                f"prediction {views.label_name(names, int(row['prediction']))}, loss {row['loss']:.3f}")

    def select(self, state: dict, selected: str, checked: list[str]) -> tuple:
        """A box or lasso selection on the population: remembered, and added to the sample list."""
        ids = [sid for sid in str(selected or "").split("|")[0].split(",") if sid]
        if not ids or not state.get("slice"):
            return gr.skip(), gr.skip(), gr.skip()
        state = {**state, "selection": ids}
        new_state, listed, _ = self._listed(state, ids, checked, check=False)
        return new_state, listed, f"Selected **{len(ids)}** samples on the population; they are in the sample list."

    def analyze(self, state: dict, sample_id: str) -> tuple:
        """Analyze a sample: reset the controller to its defaults (predicted label, deepest layer with extent)."""
        if not (state or {}).get("slice") and not str(sample_id or "").strip():
            raise NotReady("no slice open and no sample asked for")
        view = self._view(state, sample_id)
        state = {**state, "current": view.sample_id}
        if view.sample_id not in state["listed"]:
            state["listed"] = [*state["listed"], view.sample_id]
        names = self.backend.label_names
        labels = view.maps.labels or list(range(len(names)))
        connections = view.maps.connections
        steps = view.maps.steps(connections[0]) if connections else []
        default = view.maps.default_position(connections[0]) if connections else 1
        algorithms = [(ALGORITHM_TITLES.get(a, a), a) for a in ALGORITHM_TITLES if a in view.maps.algorithms]
        return (
            state,
            gr.update(choices=[(views.label_name(names, i), i) for i in labels], value=view.prediction),
            gr.update(choices=connections, value=connections[0] if connections else None),
            LAST_LAYER,
            gr.update(minimum=1, maximum=max(len(steps), 2), value=max(default, 1)),
            gr.update(choices=algorithms),
            views.topk(self.backend, view),
            views.confusion(self.backend, view),
            gr.update(choices=state["listed"], value=[view.sample_id]),
            "",
        )

    def analyze_clicked(self, state: dict, clicked: str) -> tuple:
        """After a population click: analyze the clicked sample (nothing when the field was only reset)."""
        sample = str(clicked or "").split("|")[0]
        if not sample:
            return tuple(gr.skip() for _ in range(10))
        return self.analyze(state, sample)

    def _view(self, state: dict, sample_id: str, run: str | None = None) -> SampleView:
        if not state or not state.get("slice"):
            raise UIError("choose a model run and a data slice first")
        try:
            return self.backend.view(run or state["run"], state["slice"], str(sample_id or "").strip())
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

    def render(self, state: dict, held: str, visualizer: str, compare: str, *values) -> tuple:
        """The sample's viewer payload and its key (sent unless ``held``, the key of the payload the page
        holds, is the same: the page draws every switch from it) and the comparison run's view."""
        if not (state or {}).get("current"):
            return tuple(gr.skip() for _ in range(6))  # nothing analyzed yet (e.g. no run could be listed)
        view = self._view(state, state.get("current"))
        key = json.dumps(viewer_data.payload_key(view, visualizer))
        if key == held:
            return gr.skip(), gr.skip(), *self.compared(state, visualizer, compare, *values)
        return key, viewer_data.payload(self.backend, view, visualizer), *self.compared(state, visualizer, compare,
                                                                                       *values)

    def compared(self, state: dict, visualizer: str, compare: str, *values) -> tuple:
        """The comparison run's picture, the signed difference, its caption, and the summary of both runs."""
        view = self._view(state, state.get("current"))
        hidden = gr.update(visible=False)
        if compare in (None, NO_COMPARE, state["run"]):
            return hidden, hidden, "", views.summary(self.backend, view)
        try:
            other = self._view(state, view.sample_id, run=compare)
        except UIError as error:
            blank = gr.update(value=pictures.blank_picture(), visible=True, label=f"Run {compare}")
            return blank, hidden, f"**Run `{compare}`:** {error}", views.summary(self.backend, view)
        controls = self.controls(*values)
        other_picture, difference, caption = views.comparison(self.backend, view, other, controls, visualizer)
        return (gr.update(value=other_picture, visible=True, label=f"Run: {compare}"),
                gr.update(value=difference, visible=True, label=f"{state['run']} − {compare}"), caption,
                views.summary(self.backend, view, [other]))

    def after_switch(self, state: dict, visualizer: str, compare: str, checked: list[str], follows: str,
                     *values) -> tuple:
        """After the page drew a controller switch: the comparison (when comparing), the strip and grid."""
        if not (state or {}).get("current"):
            return tuple(gr.skip() for _ in range(7))
        comparing = compare not in (None, NO_COMPARE, state["run"])
        compared = self.compared(state, visualizer, compare, *values) if comparing else (gr.skip(),) * 4
        return *compared, *self.extras(state, checked, follows, *values)

    def extras(self, state: dict, checked: list[str], follows: str, *values) -> tuple:
        """The depth strip and, for two or more checked samples, the grid."""
        if not (state or {}).get("current"):
            return gr.skip(), gr.skip(), gr.skip()
        view = self._view(state, state.get("current"))
        controls = self.controls(*values)
        tiles = views.depth_strip(self.backend, view, controls)
        strip = pictures.tile_sheet(tiles, STRIP_COLUMNS) if tiles else pictures.blank_picture(64)
        checked = list(checked or [])
        chosen, missing = [], []
        for sid in checked[:GRID_MAX]:
            try:
                chosen.append(self._view(state, sid))
            except UIError:
                missing.append(sid)
        cells = views.grid(self.backend, chosen, controls, follows) if len(checked) > 1 else []
        note = ""
        if len(checked) > GRID_MAX:
            note += f"Grid: the first {GRID_MAX} of {len(checked)} checked samples. "
        if missing:
            note += f"No maps for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}."
        return strip, gr.update(value=cells, visible=bool(cells), height=_gallery_height(len(cells))), note

    def connection_steps(self, state: dict, connection: str) -> Any:
        """Another connection has other layers: reset the slider to its default step."""
        maps = self._view(state, state.get("current")).maps
        steps = maps.steps(connection)
        return LAST_LAYER, gr.update(maximum=max(len(steps), 2), value=max(maps.default_position(connection), 1))

    # -- sample list ----------------------------------------------------------------------
    def add_sample(self, state: dict, sample_id: str, checked: list[str]) -> tuple:
        """Add the id in the text field to the list."""
        view = self._view(state, sample_id)
        return self._listed(state, [view.sample_id], checked)

    def select_all(self, state: dict) -> tuple:
        """Check every listed sample."""
        return state, gr.update(choices=state.get("listed", []), value=list(state.get("listed", []))), ""

    def remove(self, state: dict, checked: list[str]) -> tuple:
        """Take the checked samples off the list."""
        if not checked:
            raise UIError("check the samples to remove first")
        listed = [sid for sid in state.get("listed", []) if sid not in set(checked)]
        return {**state, "listed": listed}, gr.update(choices=listed, value=[]), ""

    def clear(self, state: dict) -> tuple:
        """Empty the sample list."""
        return {**state, "listed": []}, gr.update(choices=[], value=[]), ""

    def add_selection(self, state: dict, checked: list[str]) -> tuple:
        """Add the population's current box/lasso selection to the list."""
        if not state.get("selection"):
            raise UIError("select samples on the population first (box or lasso)")
        return self._listed(state, state["selection"], checked, check=False)

    def fetch_similar(self, state: dict, checked: list[str], k) -> tuple:
        """Add the current sample's ``k`` nearest neighbours in embedding space."""
        if not state.get("current"):
            raise UIError("analyze a sample first")
        k = int(k or SIMILAR_K)
        if k < 1:
            raise UIError(f"k must be at least 1, got {k}")
        found = self.backend.similar(state["run"], state["slice"], state["current"], k)
        return self._listed(state, [state["current"], *found], checked)

    @staticmethod
    def _listed(state: dict, ids: list[str], checked: list[str], check: bool = True) -> tuple:
        listed = list(dict.fromkeys([*state.get("listed", []), *ids]))
        value = list(dict.fromkeys([*(checked or []), *(ids if check else [])]))
        return {**state, "listed": listed}, gr.update(choices=listed, value=value), ""

    def jump_to_depth(self, state: dict, label, connection, depth_mode, depth, algorithm, opacity,
                      evt: gr.SelectData) -> tuple:
        """Clicking a tile of the depth strip shows that step in the viewer (custom depth)."""
        view = self._view(state, state.get("current"))
        controls = self.controls(label, connection, depth_mode, depth, algorithm, opacity)
        steps = [step for step in view.maps.steps(controls.connection) if views.step_heat(view, controls, step) is not None]
        index = pictures.sheet_index(*evt.index[:2], STRIP_COLUMNS, len(steps))
        if index is None:
            return gr.skip(), gr.skip()
        return CUSTOM, view.maps.steps(controls.connection).index(steps[index]) + 1

    def open_cell(self, state: dict, checked: list[str], evt: gr.SelectData) -> str:
        """Clicking a grid cell puts that sample in the text field (then it is analyzed)."""
        cells = [sid for sid in list(checked or [])[:GRID_MAX]]
        caption = str((evt.value or {}).get("caption", "")) if isinstance(evt.value, dict) else ""
        sample = caption.split(" · ")[0] if caption else (cells[evt.index] if evt.index is not None else None)
        return sample or state.get("current")

    def export(self, state: dict, visualizer: str, compare: str, checked: list[str], *values) -> list[str]:
        """The shown maps (PNG and raw .npy, both runs when comparing) and the sample list (CSV)."""
        view = self._view(state, state.get("current"))
        controls = self.controls(*values)
        step = views.choose_step(view, controls.connection, controls.depth_mode, controls.position)
        heat = views.step_heat(view, controls, step)
        if heat is None:
            raise UIError("nothing to export: no map for this choice")
        stem = f"{view.run}-{view.sample_id}-{controls.algorithm}-{step.layer}-label{controls.label}"
        picture, _ = views.main_picture(self.backend, view, controls, visualizer)
        shown = [("view", picture), ("raw", pictures.raw_picture(heat))]
        maps = [("map", heat)]
        if compare not in (None, NO_COMPARE, state["run"]):
            other = self._view(state, view.sample_id, run=compare)
            other_picture, difference, _ = views.comparison(self.backend, view, other, controls, visualizer)
            other_heat = views.step_heat(other, controls, views.matching_step(other, controls.connection, step,
                                                                               controls.position))
            shown += [(f"{compare}-view", other_picture), (f"minus-{compare}", difference)]
            maps += [(f"{compare}-map", other_heat)] if other_heat is not None else []
        listed = state.get("listed", [])
        return export_files(stem, shown, maps, self.backend.population(state["run"], state["slice"]), listed)


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
        with gr.Row(elem_id="population-row"):
            with gr.Column(scale=5):
                gr.Markdown("Population exploration", elem_classes="panel-title")
                with gr.Row(equal_height=True):
                    projection = gr.Radio([], label="Projection", scale=2, elem_id="projection")
                    colour = gr.Dropdown(list(population.BASE_COLOURS), value="correctness",
                                         label="Colour population by", scale=2, elem_id="colour")
                plot = gr.Plot(label="Population", show_label=False, elem_id="population")
                population_click = gr.Textbox(visible="hidden", elem_id="population-click")
                population_selection = gr.Textbox(visible="hidden", elem_id="population-selection")
                picked = gr.Markdown("Click a point to open its sample.", elem_id="picked")
            with gr.Column(scale=4):
                gr.Markdown("Sample list", elem_classes="panel-title")
                with gr.Row(equal_height=True):
                    sample_id = gr.Textbox(label="Sample id", placeholder="e.g. 4000", scale=3)
                    analyze = gr.Button("Analyze", variant="primary", scale=1)
                with gr.Row():
                    add_sample = gr.Button("Add sample", size="sm")
                    select_all = gr.Button("Select all", size="sm")
                    remove = gr.Button("Remove checked", size="sm")
                    clear = gr.Button("Clear", size="sm")
                with gr.Row(equal_height=True):
                    add_selection = gr.Button("Add population selection", size="sm", scale=2)
                    similar_k = gr.Number(SIMILAR_K, label="k", precision=0, minimum=1, maximum=200, scale=1,
                                          min_width=60)
                    fetch_similar = gr.Button("Fetch similar", size="sm", scale=2)
                listed = gr.CheckboxGroup(label="Selected samples (checked ones form the grid)", choices=[],
                                          elem_id="sample-list")
                summary = gr.Markdown(elem_id="summary")
        with gr.Row(elem_id="viewer-row"):
            with gr.Column(scale=5):
                gr.Markdown("Viewer", elem_classes="panel-title")
                visualizer = gr.Radio(visualizers, value=OVERLAY, label="Visualizer")
                viewer = gr.HTML(VIEWER_HTML, elem_id="viewer-image", js_on_load=None)
                viewer_payload = gr.Textbox(visible=False, elem_id="viewer-data")
                viewer_key = gr.Textbox(visible=False, elem_id="viewer-key")
                with gr.Row():
                    compare_image = gr.Image(label="Comparison run", interactive=False, format="png", height=260,
                                             visible=False, elem_id="compare-image")
                    difference = gr.Image(label="Difference", interactive=False, format="png", height=260,
                                          visible=False, elem_id="difference-image")
                compare_info = gr.Markdown(elem_id="compare-info")
            with gr.Column(scale=3):
                gr.Markdown("Controller", elem_classes="panel-title")
                label = gr.Dropdown(label="Label (default: the predicted label)", choices=[], interactive=True)
                connection = gr.Radio(label="Connection (input the heatmap is overlaid on)", choices=[])
                depth_mode = gr.Radio([LAST_LAYER, CUSTOM], value=LAST_LAYER,
                                      label="Depth (last layer: the deepest with spatial extent)")
                depth = gr.Slider(1, 2, value=2, step=1, label="Depth step (custom: move left towards the input)")
                algorithm = gr.Radio(algorithms, value=DEFAULT_ALGORITHM, label="Algorithm")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                grid_follows = gr.Radio([GRID_CONTROLLER, GRID_PREDICTED], value=GRID_CONTROLLER,
                                        label="Grid shows the map of")
                export = gr.Button("Export (PNG, .npy, sample list CSV)", size="sm")
                exported = gr.File(label="Exported files", file_count="multiple", interactive=False, height=120,
                                   elem_id="exported")
            with gr.Column(scale=4):
                gr.Markdown("Error analysis", elem_classes="panel-title")
                topk = gr.Image(label="Top-k probabilities", interactive=False, format="png", height=220,
                                show_label=False)
                confusion = gr.Image(label="Confusion matrix", interactive=False, format="png", height=340,
                                     show_label=False)
        gr.Markdown("Depth strip: every depth of the chosen label, input side first (click one to view it)",
                    elem_classes="panel-title")
        strip = gr.Image(label="Depth strip", interactive=False, format="png", show_label=False, buttons=[],
                         elem_id="depth-strip")
        grid_note = gr.Markdown(elem_id="grid-note")
        grid = gr.Gallery(label="Grid of the checked samples", columns=GRID_COLUMNS,
                          height=GRID_ROW_PX + 60, object_fit="contain", visible=False, allow_preview=False,
                          elem_id="grid")
    panels = Panels(state, status, run, compare, slice_, projection, colour, plot, population_click,
                    population_selection, picked, sample_id, analyze, add_sample, select_all, remove, clear,
                    add_selection, similar_k, fetch_similar, listed, visualizer, viewer, viewer_payload, viewer_key,
                    compare_image, difference, compare_info, grid, grid_note, label, connection, depth_mode, depth,
                    algorithm, opacity, grid_follows, export, exported, summary, topk, confusion, strip)
    return demo, panels


def _wire(demo: gr.Blocks, p: Panels, h: Handlers) -> None:
    """All event wiring, in one place. User edits use ``.input`` so programmatic updates don't re-fire."""
    render_in = [p.state, p.viewer_key, p.visualizer, p.compare, *p.controls]
    extras_in = [p.state, p.listed, p.grid_follows, *p.controls]
    extras_out = [p.strip, p.grid, p.grid_note]
    analyzed = [p.state, p.label, p.connection, p.depth_mode, p.depth, p.algorithm, p.topk, p.confusion,
                p.listed, p.status]
    rendered_out = [p.viewer_key, p.viewer_data, p.compare_image, p.difference, p.compare_info, p.summary]
    compared_out = [p.compare_image, p.difference, p.compare_info, p.summary]

    def on(trigger, handler, inputs, outputs, **options):
        outputs = list(outputs)
        return trigger(_friendly(handler, outputs, p.status), inputs, outputs, **options)

    def draw(trigger, js=DRAW, outputs=()):
        """The page draws the viewer from the payload it holds (ui/viewer.js): no server round trip."""
        return trigger(None, p.drawing, list(outputs), js=js)

    def switch(trigger, js=DRAW, outputs=()):
        """A controller change: drawn in the page at once, then the comparison, strip and grid."""
        drawn = draw(trigger, js, outputs)
        return on(drawn.then, h.after_switch, [p.state, p.visualizer, p.compare, p.listed, p.grid_follows,
                                               *p.controls], [*compared_out, *extras_out], show_progress="hidden",
                  trigger_mode="always_last")

    def render(trigger):
        """The payload (when the sample, run or kind of visualizer changed) and the comparison, then drawn."""
        rendered = on(trigger, h.render, render_in, rendered_out, show_progress="hidden")
        return draw(rendered.success)

    def refresh(event):
        """After an event that changed the sample or the controls: render, draw, then the strip and grid."""
        return on(render(event.success).then, h.extras, extras_in, extras_out, show_progress="hidden")

    def analyze(event):
        return refresh(on(event.success, h.analyze, [p.state, p.sample_id], analyzed))

    def open_slice(event):
        return analyze(on(event.success, h.open_slice, [p.run, p.slice, p.projection, p.colour, p.sample_id],
                          [p.state, p.projection, p.colour, p.population, p.sample_id, p.listed, p.status,
                           p.picked]))

    started = on(demo.load, h.start, None, [p.run, p.compare, p.status])
    open_slice(on(started.success, h.pick_run, [p.run], [p.slice, p.status]))
    open_slice(on(p.run.input, h.pick_run, [p.run], [p.slice, p.status]))
    open_slice(p.slice.input(lambda: None, None, None))
    for chooser in (p.projection, p.colour):
        on(chooser.input, h.redraw, [p.state, p.projection, p.colour], [p.population])
    picked = on(p.population_click.change, h.pick, [p.state, p.population_click], [p.sample_id, p.picked],
                queue=False, show_progress="hidden")
    refresh(on(picked.success, h.analyze_clicked, [p.state, p.population_click], analyzed))
    selected = on(p.population_selection.change, h.select, [p.state, p.population_selection, p.listed],
                  [p.state, p.listed, p.picked])
    on(selected.success, h.extras, extras_in, extras_out, show_progress="hidden")
    for trigger in (p.analyze.click, p.sample_id.submit):
        analyze(trigger(lambda: None, None, None))
    for control in (p.label, p.algorithm, p.depth_mode, p.opacity):
        switch(control.input)
    switch(p.depth.input, DRAW_CUSTOM, [p.depth_mode])
    connected = draw(p.connection.input, DRAW_CONNECTION, [p.depth_mode, p.depth])
    refresh(on(connected.then, h.connection_steps, [p.state, p.connection], [p.depth_mode, p.depth]))
    refresh(on(p.strip.select, h.jump_to_depth, [p.state, *p.controls], [p.depth_mode, p.depth]))
    render(draw(p.visualizer.input).then)
    render(p.compare.input)
    for trigger in (p.listed.input, p.grid_follows.input):
        on(trigger, h.extras, extras_in, extras_out, show_progress="hidden")
    for button, handler, inputs in ((p.select_all, h.select_all, [p.state]),
                                    (p.add_sample, h.add_sample, [p.state, p.sample_id, p.listed]),
                                    (p.remove, h.remove, [p.state, p.listed]),
                                    (p.clear, h.clear, [p.state]),
                                    (p.add_selection, h.add_selection, [p.state, p.listed]),
                                    (p.fetch_similar, h.fetch_similar, [p.state, p.listed, p.similar_k])):
        listed = on(button.click, handler, inputs, [p.state, p.listed, p.status])
        on(listed.success, h.extras, extras_in, extras_out, show_progress="hidden")
    analyze(on(p.grid.select, h.open_cell, [p.state, p.listed], [p.sample_id]))
    on(p.export.click, h.export, [p.state, p.visualizer, p.compare, p.listed, *p.controls], [p.exported])


def build_app(store: str | None = None, api: str | None = None, project: str | None = None,
              token: str | None = None) -> tuple[gr.Blocks, Backend]:
    """The Gradio app over a store directory and/or a Serve endpoint URL (at least one), and its backend."""
    backend = Backend(store, api, project, token=token)
    demo, panels = _layout(backend)
    with demo:
        _wire(demo, panels, Handlers(backend))
    return demo, backend


def _add_thumbnail_route(app, backend: Backend) -> None:
    """``GET /camscope/thumbnail?slice=S&sample_id=I``: the population's hover picture (PNG)."""

    @app.get(THUMBNAIL_ROUTE)
    def thumbnail(slice: str, sample_id: str) -> Response:
        try:
            data = backend.thumbnail(slice, sample_id)
        except (ValueError, KeyError, OSError):
            data = None
        if data is None:
            return Response(status_code=404, content=b'{"detail": "no thumbnail"}', media_type="application/json")
        return Response(content=data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    backend.thumbnail_ready = True


def launch(store: str | None = None, api: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           block: bool = False, project: str | None = None, token: str | None = None) -> gr.Blocks:
    """Build and serve the app at ``http://host:port/``; returns at once unless ``block``."""
    demo, backend = build_app(store=store, api=api, project=project, token=token)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=host, server_port=int(port), prevent_thread_lock=True, quiet=True,
                    show_error=True, ssr_mode=False, css=CSS, theme=gr.themes.Soft(primary_hue="orange"),
                    footer_links=[], head=f"<script>{SCRIPT}</script>")
    except ValueError as error:
        # Gradio probes its own page once the server runs, giving up after one 3 s timeout; on a loaded
        # machine that probe can time out although the page is served. Anything else is a real error.
        if "shareable link" not in str(error):
            raise
        demo.share_url = None
    _add_thumbnail_route(demo.app, backend)
    if block:
        demo.block_thread()
    return demo


def run_cli(args) -> int:
    """``camscope ui``: serve until interrupted."""
    token = getattr(args, "token", None) or os.environ.get("CAMSCOPE_TOKEN") or None
    demo = launch(store=args.store, api=args.api, host=args.host, port=args.port, token=token)
    print(f"camscope ui: http://{args.host}:{args.port}/", flush=True)
    demo.block_thread()
    return 0
