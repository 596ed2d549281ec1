"""`camscope ui --api` against a protected `camscope serve --token` (real Ray Serve over real HTTP) on
the 1-D demo project (GunPoint), in real Chromium: the token from CAMSCOPE_TOKEN opens the page; the
viewer draws each 1-D map as the engine computes it (raw heatmap strip, pixel-true, per label); a wrong
token and an API that is down are one readable line each, and the page stays usable.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from chromium import require_browser
from ui import browser as drive
from ui import pictures

TOKEN = "ui-test-token"
PROJECT = "camscope.demo_signals:project"
SERVE_PORTS = range(18700, 18800)
UI_PORTS = range(17200, 17300)
STEP_MS = 120_000  # analyses are computed on demand by the endpoint
LABEL = "Label (default: the predicted label)"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """`camscope serve --token` on the 1-D demo project (no store: every analysis on demand)."""
    logs = tmp_path_factory.mktemp("ui-api-serve")
    process, url = drive.start_camscope(["serve", "--project", PROJECT, "--token", TOKEN],
                                        logs / "serve.log", SERVE_PORTS, ready="/healthz")
    yield url
    drive.stop(process)


@pytest.fixture(scope="module")
def ui_url(api, tmp_path_factory):
    """`camscope ui --api URL` with the token in CAMSCOPE_TOKEN."""
    os.environ["CAMSCOPE_TOKEN"] = TOKEN
    try:
        process, url = drive.start_ui(["--api", api], tmp_path_factory.mktemp("ui-api-log") / "ui.log", UI_PORTS)
    finally:
        del os.environ["CAMSCOPE_TOKEN"]
    yield url
    drive.stop(process)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = drive.launch_chromium(playwright)
        yield chromium
        chromium.close()


def test_the_api_client_sends_the_token_and_says_plainly_when_it_is_wrong(api):
    from ui.api_client import ApiClient, ApiError

    assert ApiClient(api, token=TOKEN).get("/v1/runs")
    for token in (None, "wrong"):
        with pytest.raises(ApiError, match="refused the token") as error:
            ApiClient(api, token=token).get("/v1/runs")
        assert "\n" not in str(error.value)
    with pytest.raises(ApiError, match="not reachable"):
        ApiClient(f"http://127.0.0.1:{drive.free_port(SERVE_PORTS)}").get("/v1/runs")


def shown_strip(page) -> np.ndarray:
    return drive.image_at(drive.viewer_src(page))


def engine_strip(engine, sample: str, slice: str, layer: str, label: int) -> np.ndarray:
    """The engine's 1-D map of that choice, drawn as the viewer's raw strip."""
    from camscope.demo_signals import project

    heat = engine.explain(project.load_batch(slice, [sample]), labels=[label],
                          algorithms=["gradcam"]).maps["gradcam"][layer][0, 0].numpy()
    assert heat.ndim == 1  # a 1-D map [L]
    return pictures.raw_picture(heat.reshape(1, -1))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_with_the_token_the_1d_viewer_shows_the_engines_maps(browser, ui_url):
    from camscope import CamEngine
    from camscope.demo_signals import project

    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.set_default_timeout(STEP_MS)
    page.goto(ui_url)
    drive.viewer_src(page)
    drive.idle(page)
    drive.watch_problems(page)
    assert "API" in page.locator("#header").inner_text()
    picture = shown_strip(page)  # the overlay: the signal over its heatmap band
    assert picture.shape[1] > 2 * picture.shape[0], picture.shape
    page.screenshot(path=str(drive.ROOT / "test-artifacts" / "ui" / "12-signal-overlay.png"), full_page=True)
    slice = page.get_by_label("Data slice").input_value()
    sample = page.locator("#summary").inner_text().split("Sample ")[1].split()[0]
    old = drive.viewer_src(page)
    page.get_by_label("Raw heatmap", exact=True).check()
    drive.wait_viewer_change(page, old)
    engine = CamEngine(project.model("cnn1d"), example=project.load_batch(slice, [sample]))
    layer = page.locator("#layer-info").inner_text().split("layer ")[1].split(" ")[0]
    label = project.label_names.index(page.get_by_label(LABEL).input_value())
    assert engine.last_layer("signal").name in page.locator("#layer-info").inner_text()
    first = engine_strip(engine, sample, slice, layer, label)
    assert mae(shown_strip(page), first) < 4.0
    other = 1 - label
    old = drive.choose_until_view_changes(page, LABEL, project.label_names[other], drive.viewer_src(page))
    second = engine_strip(engine, sample, slice, layer, other)
    assert mae(shown_strip(page), second) < 4.0
    if mae(first, second) >= 4.0:
        assert mae(shown_strip(page), first) >= 4.0
    page.locator("#depth-strip img").first.wait_for()
    assert drive.problems(page) == []
    page.screenshot(path=str(drive.ROOT / "test-artifacts" / "ui" / "13-signal-raw.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("case", ["wrong token", "API down"])
def test_a_wrong_token_or_a_dead_api_is_one_readable_line(browser, api, case):
    from ui.app import launch

    url = api if case == "wrong token" else f"http://127.0.0.1:{drive.free_port(SERVE_PORTS)}"
    expected = "refused the token" if case == "wrong token" else "not reachable"
    port = drive.free_port(UI_PORTS)
    demo = launch(api=url, port=port, token="wrong" if case == "wrong token" else None)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=expected)
        drive.idle(page)
        lines = [line for line in page.locator("#status").inner_text().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Problem:") and expected in lines[0], lines
        assert "Traceback" not in page.locator("body").inner_text()
        page.get_by_label("Sample id").fill("4000")  # still usable: the next action answers with a message
        page.get_by_label("Sample id").press("Enter")
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('choose a model run')")
        page.close()
    finally:
        demo.close()
