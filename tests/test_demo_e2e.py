"""What a newcomer does after `make demo`: `camscope demo` brings up the batch job, Serve and the
UI; a sample analyzed in a real browser shows the engine's heatmap; Ctrl-C leaves no process behind."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import requests

from camscope import CamEngine
from camscope.heatmap import dequantize
from camscope.project import load_project
from chromium import require_browser
from demo_processes import Demo, processes_with
from ui import browser as drive
from ui import pictures

pytestmark = pytest.mark.slow

ARTIFACTS = drive.ROOT / "test-artifacts" / "demo"
SAMPLE = "4003"
UP_S = 1200  # the job now writes whole-slice sample tables for every run: minutes on 2 busy cores
STOP_S = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`camscope demo` (what `make demo` runs once installed) on free ports, a small subset."""
    marker = f"CAMSCOPE_E2E_{uuid.uuid4().hex}"
    api_port = drive.free_port(range(18900, 19000))
    ui_port = drive.free_port(range(17900, 18000))
    out = tmp_path_factory.mktemp("demo") / "store"
    log = tmp_path_factory.mktemp("demo-log") / "demo.log"
    env = dict(os.environ, **{marker: "1"})
    command = [sys.executable, "-m", "camscope.cli", "demo", "--limit", "4", "--out", str(out),
               "--api-port", str(api_port), "--ui-port", str(ui_port)]
    process = subprocess.Popen(command, cwd=drive.ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + UP_S
    while "camscope demo is up" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"camscope demo did not come up: {log.read_text()[-3000:]}")
        time.sleep(1)
    text = log.read_text()
    urls = {
        "ui": re.search(r"UI\s+(http://\S+)", text).group(1),
        "api": re.search(r"API\s+(http://\S+)", text).group(1),
    }
    yield {"process": process, "marker": marker, "urls": urls, "log": log, "store": out}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    for pid in processes_with(marker):  # only if a test failed before the clean stop was checked
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def engine_map(run: str, layer: str, label: int, algorithm: str = "gradcam") -> np.ndarray:
    project = load_project("camscope.demo:project")
    explanation = CamEngine(project.model(run)).explain(
        project.load_batch("validation", [SAMPLE]), labels=[label], algorithms=[algorithm]
    )
    return explanation.maps[algorithm][layer][0, 0].numpy()


def test_urls_and_api_answer(demo):
    assert demo["urls"]["ui"].startswith("http://127.0.0.1:")
    assert requests.get(demo["urls"]["api"] + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(demo["urls"]["api"] + "/docs", timeout=10).status_code == 200


def test_api_maps_equal_the_engine(demo):
    reply = requests.post(demo["urls"]["api"] + "/v1/analyze", timeout=120, json={
        "run": "cnn", "slice": "validation", "sample_id": SAMPLE, "labels": [5], "algorithms": ["layercam"],
    })
    assert reply.status_code == 200, reply.text
    maps = reply.json()["maps"]
    assert maps
    for item in maps[:: max(1, len(maps) // 6)]:
        got = dequantize(base64.b64decode(item["heatmap"]), item["scale"], (item["height"], item["width"]))
        want = engine_map("cnn", item["layer"], 5, "layercam")
        assert np.abs(got - want).max() <= item["scale"] / 255 + 1e-6 * max(1.0, float(want.max()))


def test_browser_analysis_shows_the_engines_heatmap(demo):
    sync_api = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = drive.launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1500, "height": 1300}).new_page()
        page.set_default_timeout(120_000)
        page.goto(demo["urls"]["ui"])
        first = drive.viewer_src(page)
        drive.idle(page)
        if page.get_by_label("Data slice").input_value() != "validation":
            drive.choose(page, "Data slice", "validation")
            first = drive.wait_viewer_change(page, first)
            drive.idle(page)
        page.get_by_label("Sample id").fill(SAMPLE)
        page.get_by_role("button", name="Analyze", exact=True).click()
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=f"Sample {SAMPLE}")
        drive.wait_viewer_change(page, first)
        page.get_by_label("Raw heatmap").check()
        drive.idle(page)
        time.sleep(1)
        drive.idle(page)
        src = drive.viewer_src(page)
        page.screenshot(path=str(ARTIFACTS / "raw-heatmap.png"), full_page=True)
        info = page.locator("#layer-info").inner_text()
        shown = drive.image_at(src).astype(float)  # what the viewer shows (a data URL of its canvas)
        browser.close()
    layer = re.search(r"layer\s+(\S+)", info).group(1)
    label = int(re.search(r"label\s+(\d+)", info).group(1))
    assert "GradCAM" in info
    expected = pictures.heat_picture(engine_map("cnn", layer, label), shown.shape[:2]).astype(float)
    other = pictures.heat_picture(engine_map("cnn", layer, (label + 1) % 10), shown.shape[:2]).astype(float)
    error = np.abs(shown - expected).mean()
    assert error < 4, f"UI heatmap differs from the engine's by {error:.1f}/255 on average"
    assert np.abs(shown - other).mean() > error  # the comparison can tell labels apart


def test_ctrl_c_stops_everything(demo):
    process = demo["process"]
    assert processes_with(demo["marker"])
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_S  # the demo, Ray, Serve and the UI all gone within STOP_S
    while (process.poll() is None or processes_with(demo["marker"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() == 0, demo["log"].read_text()[-2000:]
    assert processes_with(demo["marker"]) == [], demo["log"].read_text()[-2000:]


def test_sigterm_while_serve_starts_stops_everything(demo, tmp_path):
    """The stage between the batch job and serving (test_demo_stop.py has the earlier ones): a second
    demo on the finished store skips the job and is in Serve's startup within seconds."""
    api_port = drive.free_port(range(18900, 19000))
    args = ["--limit", "4", "--out", str(demo["store"]), "--no-ui", "--api-port", str(api_port)]
    second = Demo(args, tmp_path / "demo.log")
    try:
        second.assert_stops_in("startup", "starting the Serve endpoint", "camscope demo is up", signal.SIGTERM,
                               STOP_S, settle=1.0)
    finally:
        second.kill()


def test_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "camscope.cli", "demo", "--api-port", str(port), "--out", str(tmp_path / "s")],
            cwd=drive.ROOT, capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_store_of_an_older_schema_is_a_one_line_error(tmp_path):
    out = tmp_path / "old-store"
    out.mkdir()
    (out / "_camscope.json").write_text('{"schema_version": 0}')
    result = subprocess.run(
        [sys.executable, "-m", "camscope.cli", "demo", "--out", str(out), "--api-port", "18998", "--ui-port", "17998"],
        cwd=drive.ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "schema_version" in result.stderr and "--fresh" in result.stderr
    assert result.stderr.strip().count("\n") == 0
