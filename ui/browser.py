"""Driving the UI in a real browser (Debian's Chromium through Playwright): shared by the browser
tests and the switch-time benchmark. Playwright is a test dependency, imported only by callers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CAMSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_S = 300
VIEWER = "#viewer-image canvas"  # drawn in the page by ui/viewer.js
VIEWER_PICTURE = f"document.querySelector('{VIEWER}')"


def free_port(ports: range) -> int:
    """The first port in ``ports`` nobody listens on."""
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {ports}")


def start_camscope(args: list[str], log: Path, ports: range, ready: str = "/") -> tuple[subprocess.Popen, str]:
    """``camscope ARGS --port P`` in a subprocess (P free in ``ports``); returns it and its base URL
    once ``ready`` answers 200."""
    port = free_port(ports)
    command = [sys.executable, "-m", "camscope.cli", *args, "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"camscope {args[0]} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + ready, timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"camscope {args[0]} did not answer within {START_S}s: {log.read_text()[-2000:]}")


def start_ui(args: list[str], log: Path, ports: range) -> tuple[subprocess.Popen, str]:
    """``camscope ui ARGS`` in a subprocess; returns it and the page's URL once it answers."""
    process, url = start_camscope(["ui", *args], log, ports)
    return process, url + "/"


def stop(process: subprocess.Popen) -> None:
    """Stop a process started by :func:`start_ui`."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def launch_chromium(playwright):
    """Headless Debian Chromium (never Playwright's downloaded browser)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def viewer_src(page) -> str:
    """What the viewer shows, as a PNG data URL (read :func:`image_at`), once it has drawn a picture."""
    page.wait_for_function(f"() => {{ const c = {VIEWER_PICTURE}; return c && c.dataset.choice; }}")
    return page.evaluate(f"() => {VIEWER_PICTURE}.toDataURL('image/png')")


def wait_viewer_change(page, old: str, timeout: float | None = None) -> str:
    """Wait until the viewer shows a picture other than ``old`` (a :func:`viewer_src`); the new one."""
    page.wait_for_function(f"old => {{ const c = {VIEWER_PICTURE}; "
                           "return c && c.dataset.choice && c.toDataURL('image/png') !== old; }", arg=old,
                           timeout=timeout)
    return viewer_src(page)


def idle(page) -> None:
    """Wait until Gradio shows no pending event."""
    page.wait_for_function("() => !document.querySelector('.pending, .eta-bar, .progress-text')")


def choose(page, label: str, option: str, attempts: int = 3) -> None:
    """Pick ``option`` in the dropdown whose label contains ``label``, and wait until it holds it.

    Picked again if the value does not stick: an event still finishing from page load may set the
    dropdown back (what a person would see as a click that did not take).
    """
    field = page.get_by_label(label).first
    for _ in range(attempts):
        field.click()
        page.get_by_role("option", name=option, exact=True).first.click()
        try:
            idle(page)
            page.wait_for_timeout(300)
            if field.input_value() == option:
                return
        except Exception:  # noqa: BLE001 - a timeout while waiting: try again
            pass
    raise AssertionError(f"dropdown {label!r} did not keep {option!r}; it shows {field.input_value()!r}")


def choose_until_view_changes(page, label: str, option: str, old: str, attempts: int = 3) -> str:
    """Pick ``option`` in a dropdown and return the viewer's new src once it changed."""
    for attempt in range(attempts):
        choose(page, label, option)
        try:
            return wait_viewer_change(page, old, timeout=20_000)
        except Exception:  # noqa: BLE001 - the pick was undone before it rendered: pick it again
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


PROBLEM_WATCH = """() => {
  window.camscopeProblems = [];
  const status = document.querySelector('#status');
  const record = () => { const text = status.innerText.trim();
                         if (text.includes('Problem:')) window.camscopeProblems.push(text); };
  new MutationObserver(record).observe(status, {childList: true, subtree: true, characterData: true});
  record();
}"""


def watch_problems(page) -> None:
    """Record every "Problem:" line the page's status shows (read with :func:`problems`)."""
    page.evaluate(PROBLEM_WATCH)


def reset_problems(page) -> None:
    """Forget the recorded "Problem:" lines."""
    page.evaluate("() => { window.camscopeProblems = []; }")


def problems(page) -> list[str]:
    """The "Problem:" lines shown since :func:`watch_problems` / :func:`reset_problems`."""
    return list(dict.fromkeys(page.evaluate("() => window.camscopeProblems || []")))


def image_at(src: str):
    """The RGB uint8 array of the picture an <img> src points to (a data URL or a file the page serves)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    data = base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:") else requests.get(src, timeout=30).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
