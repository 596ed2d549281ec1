"""The demo's hybrid vision-transformer run: trained like the CNNs, explained with no reshape code."""

from __future__ import annotations

import torch

from camscope import CamEngine
from camscope.analysis import correct
from camscope.project import load_project

VIT_FLOOR = 0.5  # validation accuracy the ViT run must reach (chance is 0.10)


def test_vit_run_learns_and_its_token_layers_are_an_8x8_grid():
    project = load_project("camscope.demo:project")
    model = project.model("vit")
    ids = project.slices["validation"].sample_ids
    with torch.no_grad():
        logits = model(**project.load_batch("validation", ids))
    accuracy = float(correct(logits, [project.ground_truth("validation", i) for i in ids]).mean())
    print(f"validation accuracy: vit {accuracy:.3f}")
    assert accuracy >= VIT_FLOOR

    engine = CamEngine(model)
    explanation = engine.explain(project.load_batch("validation", ["4000", "4001"]), labels=[3], algorithms=["gradcam"])
    blocks = [engine.layer(f"blocks.{i}") for i in range(2)]
    # [B, 65, 64] tokens: the class token dropped, 64 positions read as 8x8 from the count and the aspect ratio
    assert all(b.layout.kind == "tokens" and b.layout.prefix == 1 and b.shape == (64, 8, 8) for b in blocks)
    for view in ("left", "right"):
        depths = [b.depth[view] for b in blocks]
        assert depths == sorted(depths) and len(set(depths)) == 2
        assert set(engine.layer(f"{view}_branch").depth) == {view}  # a branch depends on its own view only
        assert engine.last_layer(view).name == "norm"
    assert explanation.maps["gradcam"]["blocks.1"].shape == (2, 1, 8, 8)
