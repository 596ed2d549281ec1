"""Focus LayerCAM's rule on hand-made maps with known values, in the engine, and on held-out demo samples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camscope import CamEngine
from camscope.algorithms import ALGORITHMS, FocusLayerCAM
from camscope.graph import LayerInfo

ROOT = Path(__file__).resolve().parents[1]


def info(name: str, order: int, **depth: int) -> LayerInfo:
    return LayerInfo(name=name, depth=depth, shape=(1, 2, 2), order=order)


def grid(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# the gating step alone (no floor, no detail), one layer gated by the nearest deeper one at its resolution
UNIT = FocusLayerCAM(gate="cascade", gate_power=1.0, floor=0.0, detail_power=0.0)

# a chain input -> a (depth 1) -> b (2) -> c (3, the reference)
CHAIN = [info("a", 0, x=1), info("b", 1, x=2), info("c", 2, x=3)]
A, B, C = grid([2, 4], [6, 8]), grid([1, 3], [1, 1]), grid([2, 1], [0, 0])


def test_cascade_gates_each_layer_by_the_focused_map_above_it():
    out = UNIT.refine({"a": A, "b": B, "c": C}, "c", CHAIN)
    assert torch.equal(out["c"], C)                                    # the reference is LayerCAM
    assert torch.allclose(out["b"], grid([1, 1.5], [0, 0]))            # B * C / max C
    assert torch.allclose(out["a"], grid([4 / 3, 4], [0, 0]))          # A * F_b / max F_b = A * (2/3, 1)


def test_the_shipped_rule_at_one_resolution_gates_every_layer_by_the_reference():
    shipped = ALGORITHMS["focus_layercam"]
    assert (shipped.gate, shipped.gate_power, shipped.floor, shipped.detail_power, shipped.target) == (
        "stage", 1.0, 0.01, 0.2, "logit")
    # one resolution: the stage's last layer (the reference) gates all; no floor (reference's resolution),
    # no detail (no finer layer)
    out = shipped.refine({"a": A, "b": B, "c": C}, "c", CHAIN)
    assert torch.equal(out["c"], C)
    assert torch.allclose(out["b"], grid([1, 1.5], [0, 0]))            # B * C / max C
    assert torch.allclose(out["a"], grid([2, 2], [0, 0]))              # A * C / max C


def test_the_shipped_rule_floor_and_detail_on_two_resolutions():
    # 1-D: s (length 4, depth 1) and d (length 2, depth 2, the reference)
    layers = [LayerInfo("s", {"x": 1}, (1, 4), 0), LayerInfo("d", {"x": 2}, (1, 2), 1)]
    s, d = torch.tensor([[[1.0, 0.0, 2.0, 1.0]]]), torch.tensor([[[1.0, 2.0]]])
    out = ALGORITHMS["focus_layercam"].refine({"s": s, "d": d}, "d", layers)
    # step 1 (no floor): D_s = s * resize(d / 2) = s * (1/2, 5/8, 7/8, 1) = (1/2, 0, 7/4, 1)
    # step 2: D_s / max = (2/7, 0, 1, 4/7), pooled in pairs (1/7, 11/14), / max = (2/11, 1); F_d = d * that^0.2
    f_d = torch.tensor([[[(2 / 11) ** 0.2, 2.0]]])
    assert torch.allclose(out["d"], f_d)
    # step 3: F_s = (s + 0.01 * max s) * resize(F_d / max F_d); linear resize of (v, 1): v + (0, 1/4, 3/4, 1) * (1 - v)
    v = (2 / 11) ** 0.2 / 2
    gate = v + torch.tensor([0.0, 0.25, 0.75, 1.0]) * (1 - v)
    assert torch.allclose(out["s"], (s + 0.02) * gate)
    assert out["s"][0, 0, 1] > 0                                       # LayerCAM's zero ranked by the gate
    plain = FocusLayerCAM(floor=0.0, detail_power=0.0).refine({"s": s, "d": d}, "d", layers)
    assert torch.allclose(plain["s"], torch.tensor([[[0.5, 0.0, 1.75, 1.0]]])) and torch.equal(plain["d"], d)


def test_ref_gate_power_weakens_the_gate_only_at_the_reference_resolution():
    # one resolution: b and a are at the reference's resolution, gated by C / max C = (1, 1/2 / 0, 0) to the power
    out = FocusLayerCAM(ref_gate_power=0.5, floor=0.0, detail_power=0.0).refine({"a": A, "b": B, "c": C}, "c", CHAIN)
    assert torch.equal(out["c"], C)
    assert torch.allclose(out["b"], grid([1, 3 * 0.5**0.5], [0, 0]))
    assert torch.allclose(out["a"], grid([2, 4 * 0.5**0.5], [0, 0]))
    ungated = FocusLayerCAM(ref_gate_power=0.0, floor=0.0, detail_power=0.0).refine({"a": A, "c": C}, "c", CHAIN[::2])
    assert torch.equal(ungated["a"], A)
    # a finer layer keeps the full gate: s (length 4) under d (length 2, the reference) as with ref_gate_power 1
    layers = [LayerInfo("s", {"x": 1}, (1, 4), 0), LayerInfo("d", {"x": 2}, (1, 2), 1)]
    maps = {"s": torch.ones(1, 1, 4), "d": torch.tensor([[[2.0, 0.0]]])}
    weak = FocusLayerCAM(ref_gate_power=0.5, floor=0.0, detail_power=0.0).refine(maps, "d", layers)
    assert torch.allclose(weak["s"], torch.tensor([[[1.0, 0.75, 0.25, 0.0]]]))


def test_detail_sums_the_finest_map_of_each_input():
    # two 4x4 branches (l, r) fused at 2x2 (the reference): the fused map takes both branches' detail
    layers = [info("l", 0, left=1), info("r", 1, right=1), info("fused", 2, left=2, right=2)]
    fused = torch.ones(1, 1, 2, 2)
    left, right = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    left[0, 0, 0, 0] = 4.0      # top-left cell: pooled 1/4 of the peak
    right[0, 0, 3, 2:] = 1.0    # bottom-right cell: pooled 2/4 of the peak
    out = FocusLayerCAM(floor=0.0).refine({"l": left, "r": right, "fused": fused}, "fused", layers)
    assert torch.allclose(out["fused"], grid([0.5**0.2, 0], [0, 1]))  # (1/4, 0 / 0, 1/2) / (1/2), ^0.2


def test_gate_power_and_the_previous_deepest_gate():
    squared = FocusLayerCAM(gate="cascade", gate_power=2.0, floor=0.0, detail_power=0.0).refine(
        {"a": A, "b": B, "c": C}, "c", CHAIN)
    assert torch.allclose(squared["b"], grid([1, 0.75], [0, 0]))       # B * (1, 1/2)^2
    assert torch.allclose(squared["a"], grid([2, 2.25], [0, 0]))       # A * (1, 3/4)^2
    deepest = FocusLayerCAM(gate="deepest", gate_power=1.0, floor=0.0, detail_power=0.0).refine(
        {"a": A, "b": B, "c": C}, "c", CHAIN)
    assert torch.allclose(deepest["a"], grid([2, 2], [0, 0]))          # A * C / max C, b ignored
    assert torch.equal(FocusLayerCAM(gate_power=0).refine({"a": A, "c": C}, "c", CHAIN[::2])["a"], A)
    with pytest.raises(ValueError, match="gate"):
        FocusLayerCAM(gate="sideways")


def test_aliases_take_the_focused_map_and_are_never_gated_by_themselves():
    # b2 has b's LayerCAM map (a batch norm and its ReLU; or a container and its last child), pool is 1x1
    layers = [*CHAIN[:2], info("b2", 2, x=2), LayerInfo("c", {"x": 3}, (1, 2, 2), 3),
              LayerInfo("top", {"x": 3}, (1, 2, 2), 4), LayerInfo("pool", {"x": 4}, (1, 1, 1), 5)]
    maps = {"a": A, "b": B, "b2": B.clone(), "c": C, "top": C.clone(), "pool": torch.full((1, 1, 1, 1), 7.0)}
    out = UNIT.refine(maps, "c", layers)
    assert torch.equal(out["top"], C) and torch.equal(out["pool"], maps["pool"])
    assert torch.allclose(out["b"], grid([1, 1.5], [0, 0])) and torch.equal(out["b2"], out["b"])
    assert torch.allclose(out["a"], grid([4 / 3, 4], [0, 0]))


def test_resizing_and_an_empty_gate():
    coarse = torch.tensor([[[[4.0]], [[0.0]]]]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    coarse[0, 0] = grid([4, 0], [0, 0])[0, 0]           # label 0: evidence top-left; label 1: none
    fine = torch.ones(1, 2, 4, 4)
    out = UNIT.refine({"fine": fine, "c": coarse}, "c", [info("fine", 0, x=1), info("c", 1, x=2)])
    # bilinear (align_corners=False) of (1, 0 / 0, 0) to 4x4: rows and columns weigh 1, 3/4, 1/4, 0
    weights = torch.tensor([1.0, 0.75, 0.25, 0.0])
    assert torch.allclose(out["fine"][0, 0], weights[:, None] * weights[None, :])
    assert torch.equal(out["fine"][0, 1], fine[0, 1])    # an all-zero gate leaves the layer as it was


def test_one_dimensional_maps():
    layers = [LayerInfo("s", {"x": 1}, (1, 4), 0), LayerInfo("d", {"x": 2}, (1, 2), 1)]
    out = UNIT.refine({"s": torch.ones(1, 1, 4), "d": torch.tensor([[[2.0, 0.0]]])}, "d", layers)
    assert torch.allclose(out["s"], torch.tensor([[[1.0, 0.75, 0.25, 0.0]]]))   # linear resize of (1, 0)


def test_gating_layer_steps_within_a_resolution_and_hops_to_the_last_layer_of_the_next():
    # 1-D chain: a, b at length 4 (depths 1, 2); c, d at length 2 (depths 3, 4; d is the reference)
    layers = [LayerInfo("a", {"x": 1}, (1, 4), 0), LayerInfo("b", {"x": 2}, (1, 4), 1),
              LayerInfo("c", {"x": 3}, (1, 2), 2), LayerInfo("d", {"x": 4}, (1, 2), 3)]
    maps = {"a": torch.full((1, 1, 4), 2.0), "b": torch.ones(1, 1, 4), "c": torch.tensor([[[1.0, 4.0]]]),
            "d": torch.tensor([[[1.0, 0.5]]])}
    cascade = UNIT.refine(maps, "d", layers)
    assert torch.allclose(cascade["c"], torch.tensor([[[1.0, 2.0]]]))              # c * d / max d
    # b's nearest deeper layer c is coarser: b hops to the last layer of that resolution, d
    assert torch.allclose(cascade["b"], torch.tensor([[[1.0, 0.875, 0.625, 0.5]]]))
    assert torch.allclose(cascade["a"], torch.tensor([[[2.0, 1.75, 1.25, 1.0]]]))  # a * F_b / max F_b
    nearest = FocusLayerCAM(gate="nearest", gate_power=1.0, floor=0.0, detail_power=0.0).refine(maps, "d", layers)
    assert torch.allclose(nearest["b"], torch.tensor([[[0.5, 0.625, 0.875, 1.0]]]))  # gated by F_c = (1, 2)
    stage = FocusLayerCAM(gate="stage", gate_power=1.0, floor=0.0, detail_power=0.0).refine(maps, "d", layers)
    assert torch.allclose(stage["a"], cascade["a"])   # a's nearest (b) has a's resolution and is its last


def test_two_inputs_each_branch_is_gated_within_its_own_path():
    layers = [info("l1", 0, left=1), info("l2", 1, left=2), info("r1", 2, right=1), info("r2", 3, right=2),
              info("fused", 4, left=3, right=3)]
    maps = {"l1": torch.ones(1, 1, 2, 2), "l2": grid([1, 0], [0, 0]), "r1": torch.ones(1, 1, 2, 2),
            "r2": grid([0, 0], [0, 1]), "fused": grid([1, 1], [1, 2])}
    out = UNIT.refine(maps, "fused", layers)
    assert torch.equal(out["l1"], grid([1, 0], [0, 0]))   # gated by l2, not by r2 at the same depth
    assert torch.equal(out["r1"], grid([0, 0], [0, 1]))


def test_the_engine_passes_depths_one_forward_and_one_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.rand(2, 1, 16, 16)
    ex = CamEngine(model).explain(x, labels=[0, 2], algorithms=["layercam", "focus_layercam"])
    lc, focus = ex.maps["layercam"], ex.maps["focus_layercam"]

    def norm(m):
        return m / m.amax(dim=(-2, -1), keepdim=True)

    def gated(layer, gate, floor=0.01):
        resized = nn.functional.interpolate(norm(gate), size=layer.shape[-2:], mode="bilinear").clamp(min=0)
        return (layer + floor * layer.amax(dim=(-2, -1), keepdim=True)) * resized

    # layers: 0 conv (16x16), 1 ReLU, 2 conv (8x8), 3 ReLU, 4 conv (4x4, the reference), 5 global pool;
    # LayerCAM cannot tell a conv from the ReLU after it, so each pair is one focused map
    assert torch.equal(lc["2"], lc["3"]) and torch.equal(lc["0"], lc["1"])
    fine = gated(lc["1"], gated(lc["3"], lc["4"], floor=0), floor=0)          # step 1 without the floor
    f4 = lc["4"] * norm(nn.functional.adaptive_avg_pool2d(norm(fine), 4)) ** 0.2  # step 2: the finest, pooled
    assert torch.allclose(focus["4"], f4, atol=1e-6) and torch.equal(focus["5"], lc["5"])
    assert torch.allclose(focus["3"], gated(lc["3"], f4), atol=1e-6) and torch.equal(focus["2"], focus["3"])
    assert torch.allclose(focus["1"], gated(lc["1"], focus["3"]), atol=1e-6) and torch.equal(focus["0"], focus["1"])


def test_the_engine_focuses_one_dimensional_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 6, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    ex = CamEngine(model).explain(torch.rand(2, 2, 32), labels=[1], algorithms=["layercam", "focus_layercam"])
    lc, focus = ex.maps["layercam"], ex.maps["focus_layercam"]
    def norm(m):
        return m / m.amax(dim=-1, keepdim=True)

    def gated(layer, gate, floor=0.01):
        resized = nn.functional.interpolate(norm(gate), size=32, mode="linear").clamp(min=0)
        return (layer + floor * layer.amax(dim=-1, keepdim=True)) * resized

    assert focus["0"].shape == (2, 1, 32) and torch.equal(lc["2"], lc["3"])
    f3 = lc["3"] * norm(nn.functional.adaptive_avg_pool1d(norm(gated(lc["1"], lc["3"], floor=0)), 16)) ** 0.2
    assert torch.allclose(focus["3"], f3, atol=1e-6) and torch.equal(focus["2"], focus["3"])
    assert torch.allclose(focus["1"], gated(lc["1"], f3), atol=1e-6) and torch.equal(focus["0"], focus["1"])


@pytest.fixture(scope="module")
def focus_eval():
    spec = importlib.util.spec_from_file_location("focus_eval", ROOT / "benchmarks" / "focus_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_splits_are_disjoint_fixed_and_from_validation(focus_eval):
    tuning, held = focus_eval.splits(500, 500)
    assert len(set(tuning) | set(held)) == 1000 and min(tuning.min(), held.min()) >= 4000
    again_tuning, again_held = focus_eval.splits(500, 500)
    assert np.array_equal(tuning, again_tuning) and np.array_equal(held, again_held)
    # round three tunes on round two's tuning (200) and held-out (300) scenes, in that order
    old_tuning, old_held = focus_eval.splits(200, 300)
    assert np.array_equal(tuning, np.concatenate([old_tuning, old_held]))


@pytest.mark.slow
def test_shipped_rule_beats_layercam_on_held_out_demo_samples(focus_eval):
    """A small version of the evaluation: 36 fixed held-out samples, the demo's cached ``cnn``."""
    from camscope.demo import project

    _, held = focus_eval.splits(500, 500)
    subject = focus_eval.Subject("cnn", project.model("cnn"))
    previous = focus_eval.PREVIOUS
    with focus_eval.registered({previous: focus_eval.VARIANTS[previous]}):
        frame = focus_eval.evaluate(subject, held[:36], ["gradcam", "layercam", previous, "focus_layercam"],
                                    "held-out")
    below_last = frame[frame["step"] < frame["step"].max()]
    means = below_last.groupby("algorithm")[["energy", "inbox_auc"]].mean()
    print(means)
    assert means.loc["focus_layercam", "energy"] > means.loc["layercam", "energy"] + 0.1
    assert means.loc["focus_layercam", "inbox_auc"] > means.loc["layercam", "inbox_auc"]
    assert means.loc["focus_layercam", "energy"] > means.loc[previous, "energy"]
    assert means.loc["focus_layercam", "inbox_auc"] > means.loc[previous, "inbox_auc"]
    last = frame[frame["step"] == frame["step"].max()].groupby("algorithm")[["energy", "inbox_auc"]].mean()
    for metric in ("energy", "inbox_auc"):
        assert last.loc["focus_layercam", metric] > max(last.loc["layercam", metric], last.loc["gradcam", metric])
