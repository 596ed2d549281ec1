"""The Sample Analysis UI: its pieces, then `camscope ui --store` in real Chromium, pixel-true.

One UI process (a `camscope ui` subprocess over a real demo store) and one browser page serve the
browser tests of this module. After each change of label, depth, connection, algorithm and run, the
raw heatmap the page shows is compared with the engine's own map for that choice (computed here with
`CamEngine` on the project's model): mean absolute error under 4/255 after the same normalisation,
while the previous choice's map must not match. Each test declares the "Problem:" lines it provokes;
any other one fails the test at teardown. Screenshots land in test-artifacts/ui/.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from camscope.heatmap import quantize
from camscope.similar import similar_ids
from chromium import require_browser
from ui import browser as drive
from ui import pictures, population
from ui import export as ui_export
from ui.export import export_files
from ui.sample_maps import SampleMaps

ARTIFACTS = drive.ROOT / "test-artifacts" / "ui"
PORTS = range(17100, 17200)
STORE_LIMIT = 24  # samples with maps in run "cnn" (the population is the whole slice when the store has it)
STEP_MS = 30_000
LABEL = "Label (default: the predicted label)"
MAE_LIMIT = 4.0  # out of 255


# -- fast tests of the pieces ------------------------------------------------------------------
def _rows(maps: dict, depths: dict) -> list[dict]:
    rows = []
    for (connection, layer, label), heat in maps.items():
        data, scale = quantize(heat)
        rows.append({"connection": connection, "algorithm": "gradcam", "layer": layer, "label": label,
                     "depth": depths[(connection, layer)], "height": heat.shape[0], "width": heat.shape[1],
                     "heatmap": data.tobytes(), "scale": scale})
    return rows


def test_sample_maps_make_one_step_per_depth_and_merge_identical_maps():
    rng = np.random.default_rng(0)
    shared = rng.random((4, 4))
    raw = {("left", "conv1", 3): rng.random((8, 8)), ("left", "block.1", 3): shared, ("left", "block", 3): shared,
           ("left", "pool", 3): np.ones((1, 1)), ("right", "block", 3): shared}
    depths = {("left", "conv1"): 1, ("left", "block.1"): 2, ("left", "block"): 2, ("left", "pool"): 3,
              ("right", "block"): 1}
    maps = SampleMaps.from_rows(_rows(raw, depths))
    assert maps.connections == ["left", "right"] and maps.labels == [3] and maps.algorithms == ["gradcam"]
    steps = maps.steps("left")
    assert [(step.depth, step.title) for step in steps] == [(1, "conv1"), (2, "block = block.1"), (3, "pool")]
    assert maps.default_position("left") == 2  # the 1x1 pool is never the default
    decoded = maps.heat("left", "gradcam", "conv1", 3)
    np.testing.assert_allclose(decoded, raw[("left", "conv1", 3)], atol=raw[("left", "conv1", 3)].max() / 500)
    assert maps.heat("left", "gradcam", "conv1", 4) is None


class FakeBackend:  # the little of ui.backend.Backend that the viewer reads
    label_names = [str(i) for i in range(10)]

    @staticmethod
    def input_image(slice, sample_id, connection):
        return None

    @staticmethod
    def input_signal(slice, sample_id, connection):
        return None

    @staticmethod
    def faithfulness_note():
        return "prob. drop, top 10%"


def _merged_view():
    """A sample whose two deepest layers (``b`` and its last child ``b.0``) have one map, with a score."""
    from ui.backend import SampleView

    rng = np.random.default_rng(1)
    deep = rng.random((4, 4))
    raw = {("left", "conv1", 3): rng.random((4, 4)), ("left", "b.0", 3): deep, ("left", "b", 3): deep}
    depths = {("left", "conv1"): 1, ("left", "b.0"): 2, ("left", "b"): 2}
    scores = {("left", "gradcam", "b", 3): 0.4213}
    return SampleView("cnn", "validation", "7", SampleMaps.from_rows(_rows(raw, depths)), 3, 3, 0.1, 0.9, None, scores)


def test_the_layer_info_line_lists_merged_layers_and_a_stored_faithfulness_score():
    from ui import views

    Backend, view = FakeBackend, _merged_view()
    controls = views.Controls(label=3, connection="left", depth_mode=views.LAST_LAYER, position=1, algorithm="gradcam")
    _, info = views.main_picture(Backend(), view, controls, views.OVERLAY)
    assert "layer `b` = `b.0`" in info and "(2/2)" in info and "faithfulness **0.42** (prob. drop, top 10%)" in info
    custom = views.Controls(label=3, connection="left", depth_mode=views.CUSTOM, position=1, algorithm="gradcam")
    _, info = views.main_picture(Backend(), view, custom, views.OVERLAY)
    assert "layer `conv1`" in info and "faithfulness" not in info


def test_the_viewer_payload_holds_each_steps_map_and_the_servers_info_lines():
    """What the page draws its switches from (ui/viewer.js): one map per depth step, the jet table, and
    the info line :func:`ui.views.step_info` writes for each choice; other visualizers as pictures."""
    import base64
    import json

    from camscope.heatmap import colorize
    from ui import viewer_data, views

    view = _merged_view()
    data = json.loads(viewer_data.payload(FakeBackend(), view, views.RAW))
    left = data["connections"]["left"]
    assert data["kind"] == "maps" and left["steps"] == ["conv1", "b"] and left["default"] == 2
    assert left["image"] is None and sorted(data["maps"]) == ["left|gradcam|b|3", "left|gradcam|conv1|3"]
    height, width, text = data["maps"]["left|gradcam|b|3"]
    sent = np.frombuffer(base64.b64decode(text), np.uint8).reshape(height, width)
    heat = view.maps.heat("left", "gradcam", "b", 3)
    np.testing.assert_allclose(sent / 255, heat / heat.max(), atol=0.5 / 255 + 1e-6)
    lut = np.frombuffer(base64.b64decode(data["lut"]), np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(lut, colorize(np.arange(256, dtype=np.uint8)))
    controls = views.Controls(3, "left", views.CUSTOM, 2, "gradcam")
    info = data["info"]["left|gradcam|2|3"]
    assert info == views.step_info(FakeBackend(), view, controls, view.maps.steps("left")[1])
    assert "faithfulness **0.42**" in info and "`b` = `b.0`" in info
    pictured = json.loads(viewer_data.payload(FakeBackend(), view, views.INPUT))
    assert pictured["kind"] == "picture" and pictured["visualizers"] == [views.INPUT]
    shown = pictured["connections"]["left"]["picture"]
    assert shown["src"].startswith("data:image/png;base64,") and "needs the project's data" in shown["info"]


def test_one_dimensional_maps_draw_a_signal_over_a_colour_band_and_a_raw_strip():
    heat = np.zeros((1, 50), np.float32)
    heat[0, 40:] = 1.0  # hot at the end of the signal only
    signal = np.sin(np.linspace(0, 6, 200))[None]
    picture = pictures.overlay_picture(None, heat, 0.5, signal=signal)
    assert picture.shape == (*pictures.SIGNAL_SIZE, 3)
    left, right = picture[:, :100].astype(int), picture[:, -60:].astype(int)
    assert (right[..., 0] - right[..., 2]).mean() > 40 > (left[..., 0] - left[..., 2]).mean()  # red band at the end
    assert (picture.sum(axis=-1) < 150).sum() > 200  # the signal's dark line is drawn
    strip = pictures.raw_picture(heat)
    assert strip.shape == (pictures.STRIP_HEIGHT, pictures.SIGNAL_SIZE[1], 3)
    np.testing.assert_array_equal(strip[0], strip[-1])  # a strip: every row alike


def test_the_difference_picture_is_signed():
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[0, 0], b[3, 3] = 1.0, 1.0
    picture = pictures.difference_picture(a, b, (40, 40)).astype(int)
    assert picture[2, 2, 0] > picture[2, 2, 2] + 60  # a hotter: red
    assert picture[37, 37, 2] > picture[37, 37, 0] + 60  # b hotter: blue
    assert abs(picture[2, 37, 0] - picture[2, 37, 2]) < 30  # agreement: white-ish


def test_population_figure_carries_every_sample_its_id_and_the_colouring():
    n = 5000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"sample_id": [str(i) for i in range(n)], "gt": rng.integers(0, 10, n),
                          "prediction": rng.integers(0, 10, n), "loss": rng.random(n), "x": rng.random(n),
                          "y": rng.random(n), "pca_x": rng.random(n), "pca_y": rng.random(n),
                          "umap_x": np.full(n, np.nan), "umap_y": np.full(n, np.nan)})
    assert population.projections(frame) == ["PCA"]
    assert population.projections(frame.drop(columns=["pca_x", "pca_y"])) == ["default"]
    metadata = pd.DataFrame({"view": rng.choice(["left", "right"], n), "area": rng.random(n)},
                            index=frame["sample_id"])
    assert population.colour_fields(frame, metadata)[-2:] == ["meta: view", "meta: area"]
    names = [str(d) for d in range(10)]
    fig = population.figure(frame, "PCA", "correctness", names)
    assert all(trace.type == "scattergl" for trace in fig.data)
    ids = np.concatenate([np.asarray(trace.customdata)[:, 0] for trace in fig.data])
    assert sorted(ids, key=int) == frame["sample_id"].tolist()
    assert [trace.name for trace in fig.data] == ["correct", "wrong"]
    right = frame["gt"] == frame["prediction"]
    assert len(fig.data[0].x) == right.sum()
    np.testing.assert_allclose(np.asarray(fig.data[0].x), frame.loc[right, "pca_x"])
    assert "loss" in fig.data[0].hovertext[0] and "gt" in fig.data[0].hovertext[0]
    by_view = population.figure(frame, "PCA", "meta: view", names, metadata)
    assert sorted(trace.name for trace in by_view.data) == ["left", "right"]
    assert population.figure(frame, "PCA", "loss", names).data[0].marker.showscale


def test_export_writes_pictures_raw_maps_and_the_sample_list(tmp_path):
    heat = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    samples = pd.DataFrame({"sample_id": ["1", "2"], "gt": [1, 2], "prediction": [1, 3], "confidence": [0.9, 0.4],
                            "loss": [0.1, 1.2]})
    paths = export_files("cnn-1-gradcam-layer/4", [("view", pictures.raw_picture(heat))], [("map", heat)], samples,
                         ["2", "9"])
    names = [Path(p).name for p in paths]
    assert names == ["cnn-1-gradcam-layer_4-view.png", "cnn-1-gradcam-layer_4-map.npy", "sample-list.csv"]
    np.testing.assert_array_equal(np.load(paths[1], allow_pickle=False), heat)
    table = pd.read_csv(paths[2], dtype={"sample_id": str})
    assert table["sample_id"].tolist() == ["2", "9"] and table["prediction"].iloc[0] == 3
    assert np.isnan(table["loss"].iloc[1])


def test_exports_share_one_folder_per_process_and_old_ones_are_removed(monkeypatch):
    samples = pd.DataFrame({"sample_id": ["1"], "gt": [1], "prediction": [1], "confidence": [0.9], "loss": [0.1]})
    first = Path(export_files("a", [], [], samples, ["1"])[0]).parent
    second = Path(export_files("b", [], [], samples, ["1"])[0]).parent
    assert first != second and first.parent == second.parent == ui_export.export_root()
    assert first.exists()  # recent: a browser may still be fetching it
    monkeypatch.setattr(ui_export, "KEEP_EXPORTS_S", -1.0)
    third = Path(export_files("c", [], [], samples, ["1"])[0]).parent
    assert not first.exists() and not second.exists() and third.exists()


def test_a_click_on_the_depth_strip_finds_its_tile():
    tiles = [(np.full((16, 16, 3), i * 20, np.uint8), f"depth {i}\nlayer{i}") for i in range(11)]
    sheet = pictures.tile_sheet(tiles, columns=4)
    cell_w = pictures.SHEET_TILE + pictures.SHEET_GAP
    cell_h = pictures.SHEET_TILE + pictures.SHEET_CAPTION + pictures.SHEET_GAP
    assert sheet.shape == (3 * cell_h + pictures.SHEET_GAP, 4 * cell_w + pictures.SHEET_GAP, 3)
    for index in range(11):
        row, column = divmod(index, 4)
        x, y = pictures.SHEET_GAP + column * cell_w + 60, pictures.SHEET_GAP + row * cell_h + 60
        assert pictures.sheet_index(x, y, 4, 11) == index
        assert tuple(sheet[y, x]) == (index * 20,) * 3
    assert pictures.sheet_index(3 * cell_w + 60, 2 * cell_h + 60, 4, 11) is None  # the empty 12th cell


def test_similar_ids_are_the_nearest_embeddings_without_the_query():
    ids = ["a", "b", "c", "d"]
    embeddings = [[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.3]]
    assert similar_ids(ids, embeddings, "a", k=2) == ["b", "d"]
    with pytest.raises(ValueError, match="unknown sample id 'z'"):
        similar_ids(ids, embeddings, "z")


# -- the browser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """A real store: the batch job over the demo's validation slice, maps for its first samples in runs
    "cnn" and "cnn-small" (the samples table holds the whole slice)."""
    if os.environ.get("CAMSCOPE_UI_TEST_STORE"):  # reuse a store built this way (while developing the UI)
        return Path(os.environ["CAMSCOPE_UI_TEST_STORE"])
    out = tmp_path_factory.mktemp("ui-store") / "store"
    # `camscope run` in its own process (and its own Ray instance), as a user runs it
    command = [sys.executable, "-m", "camscope.cli", "run", "--project", "camscope.demo:project", "--out", str(out),
               "--run", "cnn", "--run", "cnn-small", "--slice", "validation", "--limit", str(STORE_LIMIT)]
    job = subprocess.run(command, cwd=drive.ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                         text=True, timeout=1200)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def ui_url(demo_store, tmp_path_factory):
    """`camscope ui --store` on a port of the UI's range."""
    process, url = drive.start_ui(["--store", str(demo_store)], tmp_path_factory.mktemp("ui-log") / "ui.log", PORTS)
    yield url
    drive.stop(process)


@pytest.fixture(scope="module")
def shared_page(ui_url):
    """One headless Chromium page on the UI for the whole module (the tests run in order)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = drive.launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.set_default_timeout(STEP_MS)
        page.goto(ui_url)
        drive.viewer_src(page)
        drive.idle(page)
        drive.watch_problems(page)
        yield page
        browser.close()


@pytest.fixture
def page(shared_page):
    """The shared page; at teardown, every "Problem:" line shown during the test must be one the test
    declared in ``page.expected_problems`` (substrings)."""
    shared_page.expected_problems = []
    drive.reset_problems(shared_page)
    yield shared_page
    drive.idle(shared_page)
    problems = drive.problems(shared_page)
    unexpected = [p for p in problems if not any(e in p for e in shared_page.expected_problems)]
    assert not unexpected, f"unprovoked problems shown: {unexpected}"
    assert "Traceback" not in shared_page.locator("body").inner_text()


@pytest.fixture(scope="module")
def engine_maps():
    """The engine's own maps for a (run, sample): every layer, label and algorithm, computed here."""
    from camscope import CamEngine
    from camscope.demo import project

    cache: dict = {}

    def maps(run: str, sample_id: str):
        key = (run, sample_id)
        if key not in cache:
            engine = CamEngine(project.model(run))
            explanation = engine.explain(project.load_batch("validation", [sample_id]))
            cache[key] = (engine, {alg: {layer: m[0].numpy() for layer, m in by_layer.items()}
                                   for alg, by_layer in explanation.maps.items()})
        return cache[key]

    return maps


def shot(page, name: str) -> None:
    """Full-page screenshot under test-artifacts/ui/."""
    drive.idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def layer_info(page) -> str:
    return page.locator("#layer-info").inner_text()


def shown_layer(page) -> str:
    """The layer the info line names first (the shown one)."""
    return layer_info(page).split("layer ")[1].split(" ")[0].strip("`")


def shown_picture(page) -> np.ndarray:
    """The viewer's picture as the page has it (fetched from its <img> src)."""
    return drive.image_at(drive.viewer_src(page))


def expected_raw(heat: np.ndarray) -> np.ndarray:
    """The raw heatmap picture the engine's map gives after the viewer's normalisation."""
    return pictures.raw_picture(heat)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def assert_shows(page, engine_maps, run: str, sample: str, algorithm: str, label: int, previous=None) -> np.ndarray:
    """The viewer shows the engine's map of (run, sample, shown layer, label, algorithm); not ``previous``."""
    engine, maps = engine_maps(run, sample)
    layer = shown_layer(page)
    expected = expected_raw(maps[algorithm][layer][label])
    shown = shown_picture(page)
    assert mae(shown, expected) < MAE_LIMIT, (run, sample, layer, label, algorithm, mae(shown, expected))
    if previous is not None and mae(previous, expected) >= MAE_LIMIT:  # only choices whose maps differ
        assert mae(shown, previous) >= MAE_LIMIT, "the picture still matches the previous choice"
    return expected


def summary_shows(page, sample_id: str, run: str | None = None) -> None:
    """Wait until the error-analysis summary is about ``sample_id`` (and ``run``)."""
    page.wait_for_function("t => document.querySelector('#summary').innerText.includes(t)",
                           arg=f"Sample {sample_id}")
    if run:
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=f"run {run}")


def current_sample(page) -> str:
    return page.locator("#summary").inner_text().split("Sample ")[1].split()[0]


def checkboxes(page):
    return page.locator("#sample-list input[type=checkbox]")


def test_page_load_shows_the_default_overlay_at_the_deepest_layer_with_extent(page, engine_maps):
    """Without any click: an overlay <img>, the controls, the population of the slice, and the depth
    default that the engine's last_layer() names; merged steps carry both names."""
    require_browser()
    body = page.locator("body").inner_text()
    for word in ("Label", "Connection", "Depth", "Algorithm", "Sample id", "GradCAM", "LayerCAM", "Focus LayerCAM",
                 "last layer", "custom", "Model run", "Data slice", "Error analysis", "Projection"):
        assert word in body, word
    for name in ("Analyze", "Add sample", "Select all", "Remove checked", "Clear", "Add population selection",
                 "Fetch similar"):
        assert page.get_by_role("button", name=name, exact=True).count() == 1, name
    engine, _ = engine_maps("cnn", current_sample(page))
    connection = page.locator("#layer-info").inner_text().split("from ")[1].split()[0].strip("`")
    assert engine.last_layer(connection).name in layer_info(page), layer_info(page)
    assert " = " in layer_info(page)  # the fusion block and its last layer are one step
    position = layer_info(page).split("(")[1].split(")")[0].split("/")
    assert int(position[1]) == len({info.depth[connection] for info in engine.layers if connection in info.depth})
    points = page.evaluate("() => document.querySelector('#population .js-plotly-plot').data"
                           ".reduce((n, t) => n + (t.customdata ? t.customdata.length : 0), 0)")
    assert points >= STORE_LIMIT
    assert page.locator("#depth-strip img").first.evaluate("i => i.naturalWidth > 0")
    shot(page, "01-loaded")


def test_every_controller_switch_shows_the_engines_map(page, engine_maps, demo_store):
    """Raw heatmap visualizer; after each change of label, depth, connection, algorithm and run, the
    picture matches the engine's map for that choice and no longer the previous one."""
    from ui import views
    from ui.backend import Backend

    sample = current_sample(page)
    old = drive.viewer_src(page)
    backend = Backend(str(demo_store))  # the page's overlay (drawn in the page) is the server's picture
    connection = layer_info(page).split("from ")[1].split()[0].strip("`")
    controls = views.Controls(int(page.get_by_label(LABEL).input_value()), connection, views.LAST_LAYER, 1, "gradcam")
    overlay, _ = views.main_picture(backend, backend.view("cnn", "validation", sample), controls, views.OVERLAY)
    assert mae(shown_picture(page), overlay) < MAE_LIMIT
    page.get_by_label("Raw heatmap", exact=True).check()
    old = drive.wait_viewer_change(page, old)
    predicted = int(page.get_by_label(LABEL).input_value())
    previous = assert_shows(page, engine_maps, "cnn", sample, "gradcam", predicted)

    other = next(label for label in (3, 5, 8, 1) if label != predicted)
    old = drive.choose_until_view_changes(page, LABEL, str(other), old)
    previous = assert_shows(page, engine_maps, "cnn", sample, "gradcam", other, previous)
    shot(page, "02-label")

    slider = page.locator("#viewer-row input[type=range]").first
    slider.focus()
    slider.press("Home")
    old = drive.wait_viewer_change(page, old)
    assert page.get_by_label("custom", exact=True).is_checked()
    assert "depth 1 from" in layer_info(page), layer_info(page)
    previous = assert_shows(page, engine_maps, "cnn", sample, "gradcam", other, previous)
    shot(page, "03-depth")

    old = click_strip_tile(page, 4, old)  # the depth strip's fifth tile: depth 5
    assert page.get_by_label("custom", exact=True).is_checked()
    assert "depth 5 from" in layer_info(page), layer_info(page)
    assert int(page.locator("#viewer-row input[type=range]").first.input_value()) == 5
    previous = assert_shows(page, engine_maps, "cnn", sample, "gradcam", other, previous)

    page.get_by_label("right", exact=True).check()
    old = drive.wait_viewer_change(page, old)
    assert "from right" in layer_info(page)
    previous = assert_shows(page, engine_maps, "cnn", sample, "gradcam", other, previous)

    page.get_by_label("LayerCAM", exact=True).check()
    old = drive.wait_viewer_change(page, old)
    assert "LayerCAM" in layer_info(page)
    previous = assert_shows(page, engine_maps, "cnn", sample, "layercam", other, previous)
    shot(page, "04-algorithm")

    drive.choose(page, "Model run", "cnn-small")
    summary_shows(page, sample, run="cnn-small")
    drive.idle(page)
    if not page.get_by_label("Raw heatmap", exact=True).is_checked():
        page.get_by_label("Raw heatmap", exact=True).check()
        drive.idle(page)
    label = int(page.get_by_label(LABEL).input_value())
    algorithm = page.locator("#viewer-row input[type=radio]:checked").evaluate_all(
        "rs => rs.map(r => r.value)")
    algorithm = next(a for a in ("focus_layercam", "layercam", "gradcam") if a in algorithm)
    assert_shows(page, engine_maps, "cnn-small", sample, algorithm, label)
    shot(page, "05-run")
    drive.choose(page, "Model run", "cnn")
    summary_shows(page, sample, run="cnn")


def click_strip_tile(page, index: int, old: str) -> str:
    """Click the middle of the depth strip's tile ``index`` (0 = input side); the viewer's new src."""
    from ui.app import STRIP_COLUMNS

    drive.idle(page)
    page.wait_for_function("""() => { const i = document.querySelector('#depth-strip img');
        const loaded = i && i.complete && i.naturalWidth > 0 ? i.src : null;  // and not replaced for 300 ms
        if (loaded !== window.stripSeen) { window.stripSeen = loaded; window.stripSince = performance.now(); }
        return loaded !== null && performance.now() - window.stripSince > 300; }""", polling=50)
    strip = page.locator("#depth-strip img").first
    strip.scroll_into_view_if_needed()
    box = strip.bounding_box()
    natural = strip.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    row, column = divmod(index, STRIP_COLUMNS)
    x = pictures.SHEET_GAP + column * (pictures.SHEET_TILE + pictures.SHEET_GAP) + pictures.SHEET_TILE / 2
    y = pictures.SHEET_GAP + row * (pictures.SHEET_TILE + pictures.SHEET_CAPTION + pictures.SHEET_GAP) + \
        pictures.SHEET_TILE / 2
    page.mouse.click(box["x"] + x * box["width"] / natural[0], box["y"] + y * box["height"] / natural[1])
    return drive.wait_viewer_change(page, old)


def plot_point(page, sample_id: str) -> tuple[float, float]:
    """Page coordinates of a population point (from Plotly's own axes)."""
    return tuple(page.evaluate("""id => {
        const gd = document.querySelector('#population .js-plotly-plot');
        const box = gd.getBoundingClientRect(), L = gd._fullLayout;
        for (const t of gd._fullData) {
          const i = (t.customdata || []).findIndex(c => c[0] === id);
          if (i >= 0) return [box.left + L._size.l + L.xaxis.l2p(t.x[i]),
                              box.top + L._size.t + L.yaxis.l2p(t.y[i])];
        }
        return null; }""", sample_id))


def test_a_population_click_opens_that_sample_and_hover_shows_it(page, demo_store):
    from camscope.store import Store

    stored = Store(demo_store).sample_ids("cnn", "validation")
    target = next(sid for sid in reversed(stored) if sid != current_sample(page))
    page.locator("#population").scroll_into_view_if_needed()
    x, y = plot_point(page, target)
    page.mouse.move(x, y)
    page.wait_for_function("id => [...document.querySelectorAll('#population .hovertext')]"
                           ".some(h => h.textContent.includes(id))", arg=target)
    page.wait_for_function("() => { const t = document.querySelector('#population-thumbnail'); "
                           "return t && t.style.display === 'block' && t.complete && t.naturalWidth > 0; }")
    shot(page, "06-population-hover")
    page.mouse.click(x, y)
    summary_shows(page, target)
    assert page.get_by_label("Sample id").input_value() == target
    shot(page, "07-population-click")


def test_sample_list_buttons_and_a_grid_that_follows_the_label(page, demo_store):
    from camscope.store import Store

    store = Store(demo_store)
    samples = store.samples("cnn", "validation")
    stored = store.sample_ids("cnn", "validation")
    current = current_sample(page)
    page.get_by_role("button", name="Clear", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#sample-list input[type=checkbox]').length === 0")

    extra = next(sid for sid in stored if sid != current)
    page.get_by_label("Sample id").fill(extra)
    page.get_by_role("button", name="Add sample", exact=True).click()
    page.get_by_label(extra, exact=True).wait_for()

    page.get_by_label("k", exact=True).fill("3")
    page.get_by_role("button", name="Fetch similar", exact=True).click()
    with_embeddings = samples[samples["embedding"].notna()]
    neighbours = similar_ids([str(i) for i in with_embeddings["sample_id"]], with_embeddings["embedding"].tolist(),
                             current, 3)
    for neighbour in neighbours:
        page.get_by_label(neighbour, exact=True).wait_for()
    listed = {current, extra, *neighbours}
    page.wait_for_function("n => document.querySelectorAll('#sample-list input[type=checkbox]').length === n",
                           arg=len(listed))

    page.get_by_label(current, exact=True).uncheck()
    drive.idle(page)
    page.get_by_role("button", name="Select all", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('#sample-list input')].every(c => c.checked)")
    with_maps = [sid for sid in listed if sid in stored]
    page.wait_for_function("n => document.querySelectorAll('#grid img').length === n", arg=len(with_maps))
    label = page.get_by_label(LABEL).input_value()
    page.wait_for_function("t => document.querySelector('#grid').innerText.includes(t)", arg=f"label {label} ·")
    shot(page, "08-sample-list-grid")
    other = "7" if label != "7" else "2"
    drive.choose(page, LABEL, other)
    page.wait_for_function("t => document.querySelector('#grid').innerText.includes(t)", arg=f"label {other} ·")
    page.get_by_label("each sample's prediction", exact=True).check()
    page.wait_for_function("t => !document.querySelector('#grid').innerText.includes(t)", arg=f"label {other} ·")

    page.get_by_label(extra, exact=True).check()
    page.get_by_role("button", name="Select all", exact=True).click()
    drive.idle(page)
    page.get_by_label(extra, exact=True).uncheck()
    page.get_by_label(current, exact=True).uncheck()
    drive.idle(page)
    page.get_by_role("button", name="Remove checked", exact=True).click()
    page.wait_for_function("n => document.querySelectorAll('#sample-list input[type=checkbox]').length === n",
                           arg=2)
    assert page.get_by_label(extra, exact=True).count() == 1
    page.get_by_label(LABEL).first.click()  # back to the controller's label for the next tests
    page.get_by_label("the controller's Label", exact=True).check()
    drive.idle(page)


def test_a_lasso_on_the_population_adds_its_samples(page):
    page.get_by_role("button", name="Clear", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#sample-list input[type=checkbox]').length === 0")
    box = page.locator("#population .nsewdrag").first.bounding_box()
    corners = [(0.4, 0.4), (0.6, 0.4), (0.6, 0.6), (0.4, 0.6), (0.4, 0.41)]  # a lasso around the middle
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    for fx, fy in corners:
        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, steps=8)
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#picked').innerText.includes('Selected')")
    selected = int(page.locator("#picked").inner_text().split("Selected ")[1].split()[0])
    assert selected > 0
    page.wait_for_function("n => document.querySelectorAll('#sample-list input[type=checkbox]').length === n",
                           arg=selected)
    page.get_by_role("button", name="Clear", exact=True).click()
    page.get_by_role("button", name="Add population selection", exact=True).click()
    page.wait_for_function("n => document.querySelectorAll('#sample-list input[type=checkbox]').length === n",
                           arg=selected)
    shot(page, "09-lasso")
    page.get_by_role("button", name="Clear", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#sample-list input[type=checkbox]').length === 0")


def test_compare_runs_side_by_side_with_a_signed_difference(page, engine_maps, demo_store):
    from camscope.store import Store

    sample = Store(demo_store).sample_ids("cnn-small", "validation")[-1]
    page.get_by_label("Sample id").fill(sample)
    page.get_by_label("Sample id").press("Enter")
    summary_shows(page, sample, run="cnn")
    drive.idle(page)
    drive.choose(page, "Compare with run", "cnn-small")
    page.wait_for_function("() => { const i = document.querySelector('#difference-image img'); "
                           "return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; }")
    page.wait_for_function("() => document.querySelector('#summary').innerText.includes('cnn-small')")
    assert "difference" in page.locator("#compare-info").inner_text()
    difference = page.locator("#difference-image img").first.evaluate("i => i.src")
    shown = drive.image_at(difference)
    assert shown.std() > 5  # not blank
    shot(page, "10-compare")

    drive.choose(page, "Compare with run", "(none)")
    page.wait_for_function("() => { const i = document.querySelector('#difference-image img'); "
                           "return !i || i.getBoundingClientRect().width === 0; }")


def test_export_gives_png_npy_and_csv(page, engine_maps):
    sample = current_sample(page)
    page.get_by_role("button", name="Export (PNG, .npy, sample list CSV)").click()
    page.locator("#exported a").first.wait_for()
    links = page.locator("#exported a").evaluate_all(
        "as => as.map(a => [decodeURIComponent(a.href.split('/').pop().split('?')[0]), a.href])")
    names = [name for name, _ in links]
    assert any(n.endswith("-view.png") for n in names) and "sample-list.csv" in names, names
    npy = next(href for name, href in links if name.endswith("-map.npy"))
    heat = np.load(io.BytesIO(requests.get(npy, timeout=30).content), allow_pickle=False)
    _, maps = engine_maps("cnn", sample)
    layer, label = shown_layer(page), int(page.get_by_label(LABEL).input_value())
    algorithm = next(a for a, title in (("focus_layercam", "Focus LayerCAM"), ("layercam", "LayerCAM"),
                                        ("gradcam", "GradCAM")) if title in layer_info(page))
    reference = maps[algorithm][layer][label]
    np.testing.assert_allclose(heat, reference, atol=float(reference.max()) / 250 + 1e-7)
    csv = next(href for name, href in links if name == "sample-list.csv")
    assert requests.get(csv, timeout=30).text.startswith("sample_id,gt,prediction,confidence,loss")


def test_bad_input_is_one_line_and_the_page_stays_usable(page, demo_store):
    from camscope.store import Store

    page.expected_problems = ["Unknown sample id", "has no maps for sample"]
    valid = current_sample(page)
    page.get_by_label("Sample id").fill("no-such-sample")
    page.get_by_role("button", name="Analyze", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Unknown sample id')")
    message = page.locator("#status").inner_text()
    assert "no-such-sample" in message and "\n" not in message.strip()
    samples = Store(demo_store).samples("cnn", "validation")["sample_id"].astype(str)
    stored = set(Store(demo_store).sample_ids("cnn", "validation"))
    without = [sid for sid in samples if sid not in stored]
    if without:  # the samples table holds the whole slice: a sample without maps
        page.get_by_label("Sample id").fill(without[0])
        page.get_by_role("button", name="Analyze", exact=True).click()
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('has no maps')")
    shot(page, "11-bad-input")
    other = next(sid for sid in sorted(stored) if sid != valid)
    page.get_by_label("Sample id").fill(other)
    page.get_by_label("Sample id").press("Enter")
    summary_shows(page, other)
    page.wait_for_function("() => !document.querySelector('#status').innerText.includes('Problem')")
    drive.viewer_src(page)
