"""The README's bring-your-own-project example loads and explains, as documented."""

from __future__ import annotations

import sys

from camscope import CamEngine
from camscope.project import load_project
from camscope.rows import explain_samples
from ui.browser import ROOT


def test_example_project_loads_and_explains(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # what PYTHONPATH=. does in the README
    project = load_project("examples.my_project:project")
    batch = project.load_batch("test", ["16", "17"])
    engine = CamEngine(project.model("resnet18"))
    explanation = engine.explain(batch, labels=None)
    assert explanation.logits.shape == (2, 3)
    assert engine.last_layer().name == "layer4"
    heatmaps, samples = explain_samples(project, "resnet18", "test", ["16", "17"], engine=engine)
    assert samples.num_rows == 2
    assert heatmaps.num_rows == 2 * len(engine.layers) * 3 * 3  # samples x layers x algorithms x labels
    assert "examples.my_project" in sys.modules
