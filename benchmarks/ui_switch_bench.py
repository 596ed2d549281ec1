"""How fast does the UI answer? Viewer switches (goal: label and depth p50 <= 150 ms) and the
population scatter with 5,000 points (goal: hover and click under 100 ms).

Three measurements:
  in-process: the server's render of the same picture (cached decoded maps -> overlay picture), per
              switch kind, and the once-per-sample payload the page draws its switches from;
  browser:    Chromium drives `camscope ui` over a real demo store. Measured in the page: from the
              user's input event (the pointerdown on the option, radio or the slider's key press, its
              event.timeStamp) to the first animation frame after the viewer drew the new choice. The page's
              cache of drawn pictures is emptied before each switch, so every switch is drawn from
              the maps. Also given: the wall time around Playwright's action (its own overhead included);
  population: Chromium on the UI's population scatter (ui.population.figure and ui/population.js, the
              same figure and page script as `camscope ui`) with 5,000 points: mouse move to the
              tooltip naming the point, and click to the server's answer shown in the page.

Usage:
    python benchmarks/ui_switch_bench.py [--store DIR] [--repeats 12] [--ports 17500-17600]
                                         [--out benchmarks/results/ui_switch.json]
Without --store, a small store is built first with the batch job (local Ray, demo project).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui import browser as drive  # noqa: E402
from ui import viewer_data  # noqa: E402
from ui.backend import Backend  # noqa: E402
from ui.views import CUSTOM, LAST_LAYER, OVERLAY, Controls, main_picture  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PORTS = range(17500, 17600)  # --ports overrides
SWITCH_TIMEOUT_MS = 5000


def summarize(samples_ms: list[float]) -> dict:
    """Median, p90 and max of a list of milliseconds."""
    ordered = sorted(samples_ms)
    return {"n": len(ordered), "median_ms": round(statistics.median(ordered), 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1), "max_ms": round(ordered[-1], 1)}


def in_process(store: Path, repeats: int) -> dict:
    """Time the cold sample load and the warm render of each switch kind, without HTTP or browser."""
    backend = Backend(str(store))
    run = backend.runs()[0]
    slice_ = backend.slices(run)[0]
    sample = backend.default_sample(run, slice_)
    started = time.perf_counter()
    view = backend.view(run, slice_, sample)
    cold_ms = (time.perf_counter() - started) * 1000
    connection = view.maps.connections[0]
    steps = len(view.maps.steps(connection))
    algorithms = ("gradcam", "layercam", "focus_layercam")
    label = view.prediction
    switches = {
        "label": [Controls(i % 10, connection, LAST_LAYER, steps, "gradcam") for i in range(repeats)],
        "depth": [Controls(label, connection, CUSTOM, 1 + i % steps, "gradcam") for i in range(repeats)],
        "algorithm": [Controls(label, connection, LAST_LAYER, steps, algorithms[i % 3]) for i in range(repeats)],
    }
    results = {"cold_sample_load_ms": round(cold_ms, 1)}
    payloads = []
    for _ in range(max(3, repeats // 4)):
        started = time.perf_counter()
        text = viewer_data.payload(backend, view, OVERLAY)
        payloads.append((time.perf_counter() - started) * 1000)
    results["sample_payload"] = {**summarize(payloads), "kilobytes": round(len(text) / 1024, 1)}
    for kind, settings in switches.items():
        times = []
        for controls in settings:
            started = time.perf_counter()
            main_picture(backend, backend.view(run, slice_, sample), controls, OVERLAY)
            times.append((time.perf_counter() - started) * 1000)
        results[kind] = summarize(times)
    return results


def in_browser(store: Path, repeats: int, workdir: Path, ports: range = PORTS) -> dict:
    """Time each switch in Chromium: from the user's input event to the new picture shown in the page."""
    from playwright.sync_api import sync_playwright

    process, url = drive.start_ui(["--store", str(store)], workdir / "ui.log", ports)
    try:
        with sync_playwright() as playwright:
            chromium = drive.launch_chromium(playwright)
            page = chromium.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(url)
            drive.viewer_src(page)
            drive.idle(page)
            results = {
                "label": _time_switches(page, repeats, lambda i: _pick_label(page, str(i % 2 * 5 + 1)),
                                        prepare=lambda i: page.get_by_label("Label").first.click()),
                "depth": _time_switches(page, repeats, lambda i: _nudge_slider(page, i)),
                "algorithm": _time_switches(page, repeats, lambda i: page.get_by_label(
                    ("LayerCAM", "Focus LayerCAM", "GradCAM")[i % 3], exact=True).check()),
            }
            chromium.close()
    finally:
        drive.stop(process)
    return results


def population_latency(points: int, repeats: int, workdir: Path, ports: range = PORTS) -> dict:
    """Hover and click times on a ``points``-point population scatter in Chromium."""
    import gradio as gr
    import numpy as np
    import pandas as pd
    from playwright.sync_api import sync_playwright

    from ui import population
    from ui.app import SCRIPT

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"sample_id": [str(i) for i in range(points)], "gt": rng.integers(0, 10, points),
                          "prediction": rng.integers(0, 10, points), "loss": rng.random(points),
                          "x": rng.normal(size=points), "y": rng.normal(size=points)})
    figure = population.figure(frame, "default", "ground truth", [str(d) for d in range(10)])
    with gr.Blocks() as demo:
        plot = gr.Plot(figure, elem_id="population")
        clicked = gr.Textbox(visible="hidden", elem_id="population-click")
        picked = gr.Markdown("none", elem_id="picked")
        clicked.change(lambda value: f"Picked {value}", clicked, picked, queue=False)
    port = drive.free_port(ports)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                head=f"<script>{SCRIPT}</script>")
    hover, click = [], []
    try:
        with sync_playwright() as playwright:
            chromium = drive.launch_chromium(playwright)
            page = chromium.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => { const g = document.querySelector('#population .js-plotly-plot'); "
                                   "return g && g.camscopeHooked && g._fullLayout; }", timeout=60_000)
            box = page.locator("#population .nsewdrag").first.bounding_box()
            for i in range(repeats):
                target = str(rng.integers(points))
                x, y = page.evaluate(POINT_JS, target)
                page.mouse.move(box["x"] + 2, box["y"] + 2)  # an empty corner: no tooltip
                page.wait_for_function("() => !document.querySelector('#population .hovertext')")
                started = time.perf_counter()
                page.mouse.move(x, y)
                page.wait_for_function("() => !!document.querySelector('#population .hovertext')", polling="raf")
                hover.append((time.perf_counter() - started) * 1000)
                before = page.locator("#picked").inner_text()
                started = time.perf_counter()
                page.mouse.click(x, y)
                page.wait_for_function("old => document.querySelector('#picked').innerText !== old", arg=before,
                                       polling="raf")
                click.append((time.perf_counter() - started) * 1000)
            chromium.close()
    finally:
        demo.close()
    return {"points": points, "hover": summarize(hover), "click_to_server_answer": summarize(click)}


# Page coordinates of a population point, from Plotly's own axes.
POINT_JS = """id => {
  const gd = document.querySelector('#population .js-plotly-plot');
  const box = gd.getBoundingClientRect(), L = gd._fullLayout;
  for (const t of gd._fullData) {
    const i = (t.customdata || []).findIndex(c => c[0] === id);
    if (i >= 0) return [box.left + L._size.l + L.xaxis.l2p(t.x[i]), box.top + L._size.t + L.yaxis.l2p(t.y[i])];
  }
  return null; }"""


def _nudge_slider(page, i: int) -> None:
    """Jump between the input side and the output side (neighbouring layers may share one picture)."""
    slider = page.locator("#viewer-row input[type=range]").first
    slider.focus()
    slider.press("Home" if i % 2 == 0 else "End")


def _pick_label(page, option: str) -> None:
    page.get_by_role("option", name=option, exact=True).first.click()


# Armed before each switch: the first pointerdown/keydown's timeStamp, and the first animation frame
# after the viewer's canvas was drawn with the new choice (ui/viewer.js names it in data-choice). Both
# on the page's performance clock.
ARM_JS = """() => {
  const canvas = document.querySelector('#viewer-image canvas'), choice = canvas.dataset.choice;
  const timing = window.camscopeSwitch = {start: null, end: null};
  const start = (event) => { if (timing.start === null) timing.start = event.timeStamp; };
  for (const type of ['pointerdown', 'keydown']) window.addEventListener(type, start, {capture: true, once: true});
  const watch = new MutationObserver(() => {
    if (canvas.dataset.choice === choice) return;
    watch.disconnect();
    requestAnimationFrame(() => { timing.end = performance.now(); });
  });
  watch.observe(canvas, {attributes: true, attributeFilter: ['data-choice']});
  window.camscopeViewer.forget();
}"""


def _time_switches(page, repeats: int, action, prepare=None) -> dict:
    """Median/p90/max ms from the input event of ``action(i)`` (after an untimed ``prepare(i)``, e.g.
    opening a dropdown) to the new picture shown in the viewer, measured in the page; and the wall time
    around Playwright's action. A switch the page does not draw within 5 s is counted in ``missed``."""
    in_page, wall, missed = [], [], 0
    for i in range(repeats):
        try:
            drive.idle(page)
            if prepare:
                prepare(i)
            page.evaluate(ARM_JS)
            started = time.perf_counter()
            action(i)
            page.wait_for_function("() => window.camscopeSwitch.end !== null && window.camscopeSwitch.start !== null",
                                   timeout=SWITCH_TIMEOUT_MS, polling="raf")
        except Exception:  # noqa: BLE001 - Playwright's timeouts: count and go on
            missed += 1
            continue
        wall.append((time.perf_counter() - started) * 1000)
        in_page.append(page.evaluate("() => window.camscopeSwitch.end - window.camscopeSwitch.start"))
    if not in_page:
        return {"n": 0, "missed": missed}
    return {**summarize(in_page), "missed": missed, "with_playwright": summarize(wall)}


def build_store(out: Path) -> Path:
    """A small demo store (maps for the first 24 validation samples of run "cnn")."""
    from workflows.batch_job import run_job

    run_job("camscope.demo:project", out, runs=["cnn"], slices=["validation"], limit=24)
    return out


def main() -> None:
    """Parse arguments, measure, print and optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS / "ui_switch.json")
    parser.add_argument("--ports", default=f"{PORTS.start}-{PORTS.stop}", help="port range FIRST-END for servers")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-population", action="store_true", help="skip the 5,000-point scatter")
    args = parser.parse_args()
    first, end = (int(part) for part in args.ports.split("-"))
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ui-bench-") as tmp:
        store = args.store or build_store(Path(tmp) / "store")
        results = {"in_process": in_process(store, args.repeats)}
        if not args.no_browser:
            results["browser"] = in_browser(store, args.repeats, Path(tmp), range(first, end))
            print(json.dumps(results, indent=2), flush=True)
            if not args.no_population:
                results["population"] = population_latency(5000, args.repeats, Path(tmp), range(first, end))
    results["machine"] = (f"{os.cpu_count()} CPU cores, load average {load_at_start:.1f} at the start and "
                          f"{os.getloadavg()[0]:.1f} at the end")
    text = json.dumps(results, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
