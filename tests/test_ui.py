"""The Sample Analysis UI in a real browser: `camscope ui` over a real demo store, driven by Chromium.

One UI process (a `camscope ui` subprocess) serves the module; each test opens a fresh page, which
first shows the default sample. Screenshots of every step land in test-artifacts/ui/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from camscope.heatmap import quantize
from camscope.similar import similar_ids
from ui import browser as drive
from ui import pictures
from ui.sample_maps import LayerStep, SampleMaps

sync_api = pytest.importorskip("playwright.sync_api")

ARTIFACTS = drive.ROOT / "test-artifacts" / "ui"
PORTS = range(17100, 17200)
STORE_LIMIT = 40  # samples per slice: a population to click in, small enough for 2 CPU cores
STEP_MS = 30_000
LABEL = "Label (default: the predicted label)"


def in_browser(test):
    """Mark a test as an end-to-end browser test (slow; needs Debian's Chromium)."""
    no_chromium = pytest.mark.skipif(not Path(drive.CHROMIUM).exists(),
                                     reason=f"no Chromium at {drive.CHROMIUM} (make test installs it)")
    return pytest.mark.slow(no_chromium(test))


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """A real store: the batch job over the first samples of the demo's validation slice, both runs."""
    from workflows.batch_job import run_job

    out = tmp_path_factory.mktemp("ui-store") / "store"
    summary = run_job("camscope.demo:project", out, slices=["validation"], limit=STORE_LIMIT)
    assert not summary["failed"], summary["failed"]
    return out


@pytest.fixture(scope="module")
def ui_url(demo_store, tmp_path_factory):
    """`camscope ui --store` on a port of the UI's range."""
    process, url = drive.start_ui(["--store", str(demo_store)], tmp_path_factory.mktemp("ui-log") / "ui.log", PORTS)
    yield url
    drive.stop(process)


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless."""
    with sync_api.sync_playwright() as playwright:
        browser = drive.launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, ui_url):
    """A fresh page on the UI, once the default sample's overlay is shown and the page is idle."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1500, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(STEP_MS)
    page.goto(ui_url)
    drive.viewer_src(page)
    drive.idle(page)
    yield page
    assert "Traceback" not in page.locator("body").inner_text()
    context.close()


def shot(page, name: str) -> None:
    """Full-page screenshot under test-artifacts/ui/."""
    drive.idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def layer_info(page) -> str:
    return page.locator("#layer-info").inner_text()


def summary_shows(page, sample_id: str, run: str | None = None) -> None:
    """Wait until the error-analysis summary is about ``sample_id`` (and ``run``)."""
    text = f"Sample {sample_id}"
    page.wait_for_function("t => document.body.innerText.includes(t)", arg=text)
    if run:
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=f"run {run}")


def at_last_layer(page) -> bool:
    """Whether the layer info's "(i/n)" says the deepest layer."""
    position = layer_info(page).split("(")[1].split(")")[0]
    return position.split("/")[0] == position.split("/")[1]


def checkboxes(page):
    return page.locator("input[type=checkbox]")


# -- fast tests of the pieces ------------------------------------------------------------------
def test_sample_maps_decode_rows_and_order_layers_from_the_input():
    rng = np.random.default_rng(0)
    raw = {("left", "conv2", 3): rng.random((4, 4)), ("left", "conv1", 3): rng.random((8, 8)),
           ("right", "conv2", 3): rng.random((4, 4))}
    depths = {("left", "conv1"): 1, ("left", "conv2"): 2, ("right", "conv2"): 1}
    rows = []
    for (connection, layer, label), heat in raw.items():
        data, scale = quantize(heat)
        rows.append({"connection": connection, "algorithm": "gradcam", "layer": layer, "label": label,
                     "depth": depths[(connection, layer)], "height": heat.shape[0], "width": heat.shape[1],
                     "heatmap": data.tobytes(), "scale": scale})
    maps = SampleMaps.from_rows(rows)
    assert maps.connections == ["left", "right"] and maps.labels == [3] and maps.algorithms == ["gradcam"]
    assert maps.steps("left") == [LayerStep("conv1", 1), LayerStep("conv2", 2)]
    assert maps.steps("right") == [LayerStep("conv2", 1)]
    decoded = maps.heat("left", "gradcam", "conv1", 3)
    np.testing.assert_allclose(decoded, raw[("left", "conv1", 3)], atol=raw[("left", "conv1", 3)].max() / 500)
    assert maps.heat("left", "gradcam", "conv1", 4) is None


def test_the_layer_info_line_shows_a_stored_faithfulness_score_only_when_present():
    from ui import views
    from ui.backend import SampleView

    class Backend:  # the little of ui.backend.Backend that the viewer reads
        label_names = [str(i) for i in range(10)]

        @staticmethod
        def input_image(slice, sample_id, connection):
            return None

        @staticmethod
        def faithfulness_note():
            return "prob. drop, top 10%"

    rows = []
    for layer, depth in (("conv1", 1), ("conv2", 2)):
        data, scale = quantize(np.random.default_rng(depth).random((4, 4)))
        rows.append({"connection": "left", "algorithm": "gradcam", "layer": layer, "label": 3, "depth": depth,
                     "height": 4, "width": 4, "heatmap": data.tobytes(), "scale": scale})
    scores = {("left", "gradcam", "conv2", 3): 0.4213}
    view = SampleView("cnn", "validation", "7", SampleMaps.from_rows(rows), 3, 3, 0.1, 0.9, None, scores)
    controls = views.Controls(label=3, connection="left", depth_mode=views.LAST_LAYER, position=1, algorithm="gradcam")
    _, info = views.main_picture(Backend(), view, controls, views.OVERLAY)
    assert "layer `conv2`" in info and "faithfulness **0.42** (prob. drop, top 10%)" in info
    custom = views.Controls(label=3, connection="left", depth_mode=views.CUSTOM, position=1, algorithm="gradcam")
    _, info = views.main_picture(Backend(), view, custom, views.OVERLAY)  # conv1 has no stored score
    assert "layer `conv1`" in info and "faithfulness" not in info
    view.faithfulness = {}
    assert "faithfulness" not in views.main_picture(Backend(), view, controls, views.RAW)[1]


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


def test_population_pixels_are_where_the_dots_are_drawn():
    import pandas as pd

    samples = pd.DataFrame({"sample_id": ["a", "b", "c"], "gt": [0, 1, 1], "prediction": [0, 1, 0],
                            "loss": [0.1, 0.2, 2.0], "x": [0.0, 1.0, 0.5], "y": [0.0, 0.5, 1.0]})
    picture, pixels = pictures.population_picture(samples, "correctness", ["zero", "one"])
    assert pixels.shape == (3, 2)
    for (x, y), wrong in zip(pixels.round().astype(int), [False, False, True]):
        red, green, _ = picture[y, x].astype(int)
        assert (red > green) == wrong, (x, y, picture[y, x])


def test_similar_ids_are_the_nearest_embeddings_without_the_query():
    ids = ["a", "b", "c", "d"]
    embeddings = [[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.3]]
    assert similar_ids(ids, embeddings, "a", k=2) == ["b", "d"]
    with pytest.raises(ValueError, match="unknown sample id 'z'"):
        similar_ids(ids, embeddings, "z")


# -- tests in the browser ----------------------------------------------------------------------
@in_browser
def test_page_load_shows_default_overlay_and_controls(page):
    """Without any click: an overlay <img>, the controller's labels, the three algorithms, the buttons."""
    body = page.locator("body").inner_text()
    for word in ("Label", "Connection", "Depth", "Algorithm", "Sample id", "GradCAM", "LayerCAM", "Focus LayerCAM",
                 "last layer", "custom", "Model run", "Data slice", "Error analysis"):
        assert word in body, word
    for name in ("Analyze", "Analyze sample", "Select all", "Add sample", "Fetch similar"):
        assert page.get_by_role("button", name=name, exact=True).count() == 1, name
    assert "depth" in layer_info(page) and "GradCAM" in layer_info(page)
    assert at_last_layer(page), layer_info(page)
    assert page.locator("#depth-strip img").first.evaluate("i => i.naturalWidth > 0")
    shot(page, "01-loaded")


@in_browser
def test_controller_switches_change_the_image(page):
    """Label, connection, depth (custom, slider towards the input), algorithm and visualizer each
    change the picture and say what it shows."""
    src = drive.viewer_src(page)
    predicted = page.get_by_label(LABEL).input_value()
    other = "3" if predicted != "3" else "5"
    src = drive.choose_until_view_changes(page, LABEL, other, src)
    assert f"label {other}" in layer_info(page)
    shot(page, "02-label")

    page.get_by_label("right", exact=True).check()
    src = drive.wait_viewer_change(page, src)
    assert "from right" in layer_info(page)
    shot(page, "03-connection")

    deepest = layer_info(page)
    slider = page.locator("input[type=range]").first
    slider.focus()
    for _ in range(6):
        slider.press("ArrowLeft")
    src = drive.wait_viewer_change(page, src)
    page.wait_for_function("old => document.querySelector('#layer-info').innerText !== old", arg=deepest)
    assert page.get_by_label("custom", exact=True).is_checked()
    assert int(layer_info(page).split("depth ")[1].split()[0]) < int(deepest.split("depth ")[1].split()[0])
    shot(page, "04-depth")

    page.get_by_label("Focus LayerCAM", exact=True).check()
    src = drive.wait_viewer_change(page, src)
    assert "Focus LayerCAM" in layer_info(page)
    shot(page, "05-algorithm")

    page.get_by_label("last layer", exact=True).check()
    src = drive.wait_viewer_change(page, src)
    assert at_last_layer(page), layer_info(page)
    page.get_by_label("Raw heatmap", exact=True).check()
    src = drive.wait_viewer_change(page, src)
    shot(page, "06-raw-heatmap")

    strip = page.locator("#depth-strip img").first
    scale = strip.bounding_box()["width"] / strip.evaluate("i => i.naturalWidth")
    strip.click(position={"x": 40 * scale, "y": 40 * scale})  # inside the first tile
    drive.wait_viewer_change(page, src)
    assert "(1/" in layer_info(page), layer_info(page)


@in_browser
def test_population_click_picks_the_nearest_sample(page, demo_store):
    """Choose another run, click a dot of the population: that sample is picked, then analyzed."""
    from camscope.store import Store
    from ui.pictures import population_picture

    drive.choose(page, "Model run", "cnn-small")
    drive.choose(page, "Data slice", "validation")
    summary_shows(page, "", run="cnn-small")
    drive.idle(page)
    samples = Store(demo_store).samples("cnn-small", "validation")
    samples["sample_id"] = samples["sample_id"].astype(str)
    _, pixels = population_picture(samples, "correctness", [str(d) for d in range(10)])
    target = int(np.argmax(pixels[:, 0]))  # the right-most dot: no legend or neighbour in its way
    image = page.locator("#population img").first
    natural = image.evaluate("i => [i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight]")
    scale = min(natural[2] / natural[0], natural[3] / natural[1])
    offset = ((natural[2] - natural[0] * scale) / 2, (natural[3] - natural[1] * scale) / 2)
    image.click(position={"x": offset[0] + pixels[target, 0] * scale, "y": offset[1] + pixels[target, 1] * scale})
    page.wait_for_function("() => document.body.innerText.includes('Picked')")
    expected = samples["sample_id"].iloc[target]
    assert page.get_by_label("Sample id").input_value() == expected
    page.get_by_role("button", name="Analyze sample", exact=True).click()
    summary_shows(page, expected, run="cnn-small")
    shot(page, "07-population-click")


@in_browser
def test_sample_list_add_fetch_similar_select_all(page, demo_store):
    """Add a sample by id, fetch the current sample's neighbours, select all: the grid shows them all."""
    from camscope.similar import similar_ids
    from camscope.store import Store

    store = Store(demo_store)
    samples = store.samples("cnn", "validation")
    ids = [str(i) for i in samples["sample_id"]]
    current = page.get_by_label("Sample id").input_value()
    extra = next(i for i in ids if i != current)
    page.get_by_label("Sample id").fill(extra)
    page.get_by_role("button", name="Add sample", exact=True).click()
    page.get_by_label(extra, exact=True).wait_for()
    assert page.get_by_label(extra, exact=True).is_checked()

    page.get_by_role("button", name="Fetch similar", exact=True).click()
    neighbours = similar_ids(ids, samples["embedding"].tolist(), current, 5)
    for neighbour in neighbours:
        page.get_by_label(neighbour, exact=True).wait_for()
    listed = {current, extra, *neighbours}
    assert checkboxes(page).count() == len(listed)

    page.get_by_label(current, exact=True).uncheck()
    drive.idle(page)
    page.get_by_role("button", name="Select all", exact=True).click()
    page.wait_for_function("() => [...document.querySelectorAll('input[type=checkbox]')].every(c => c.checked)")
    page.wait_for_function("n => document.querySelectorAll('#grid img').length === n", arg=len(listed))
    shot(page, "08-sample-list-grid")


@in_browser
def test_unknown_id_shows_a_message_and_the_next_id_works(page, demo_store):
    """An unknown id: a clear message naming it (no traceback, no bare "Error"); then a valid id works."""
    valid = page.get_by_label("Sample id").input_value()
    page.get_by_label("Sample id").fill("no-such-sample")
    page.get_by_role("button", name="Analyze", exact=True).click()
    message = page.locator("#status")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Unknown sample id')")
    assert "no-such-sample" in message.inner_text()
    shot(page, "09-unknown-id")
    from camscope.store import Store

    other = next(i for i in Store(demo_store).sample_ids("cnn", "validation") if i != valid)
    page.get_by_label("Sample id").fill(other)
    page.get_by_label("Sample id").press("Enter")
    summary_shows(page, other)
    page.wait_for_function("() => !document.querySelector('#status').innerText.includes('Unknown')")
    drive.viewer_src(page)
    shot(page, "10-next-id")


@pytest.fixture(scope="module")
def api_ui_url(demo_store, tmp_path_factory):
    """`camscope ui --api` (no store of its own) over `camscope serve` (Ray Serve on the demo project;
    its store answers the stored slice, anything else is computed on demand)."""
    logs = tmp_path_factory.mktemp("ui-api-log")
    serve, api = drive.start_camscope(["serve", "--project", "camscope.demo:project", "--store", str(demo_store)],
                                      logs / "serve.log", range(17800, 17900), ready="/healthz")
    try:
        ui, url = drive.start_ui(["--api", api], logs / "ui.log", range(17900, 18000))
        yield url
        drive.stop(ui)
    finally:
        drive.stop(serve)


@in_browser
def test_api_only_ui_analyzes_on_demand(chromium, api_ui_url):
    """Backed by the API alone: the default overlay appears, a sample outside the store is analyzed on
    demand, a label switch works."""
    context = chromium.new_context(viewport={"width": 1500, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(4 * STEP_MS)  # the first analysis and the population are computed on demand
    page.goto(api_ui_url)
    src = drive.viewer_src(page)
    drive.idle(page)
    assert "API" in page.locator("#header").inner_text()
    other = "4900"  # the store holds the first STORE_LIMIT validation samples (4000...): this one is computed
    page.get_by_label("Sample id").fill(other)
    page.get_by_label("Sample id").press("Enter")
    summary_shows(page, other)
    src = drive.wait_viewer_change(page, src)
    predicted = page.get_by_label(LABEL).input_value()
    drive.choose_until_view_changes(page, LABEL, "3" if predicted != "3" else "5", src)
    shot(page, "11-api-only")
    assert "Traceback" not in page.locator("body").inner_text()
    context.close()
