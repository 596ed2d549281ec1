"""The metrics on hand-made maps and hand-made models whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from camscope.metrics import (
    auc,
    baseline_like,
    bootstrap_ci,
    box_mask,
    deletion_curve,
    energy_pointing_game,
    in_box_auc,
    insertion_curve,
    pointing_game,
    randomized_copy,
    rank_correlation,
    top_fraction_drop,
)

BOX = (2, 3, 6, 5)  # x0, y0, x1, y1 on an 8 x 10 (H x W) map: 4 wide, 2 high


def test_box_mask_is_the_slice_and_grows_by_tolerance():
    mask = box_mask((8, 10), BOX)
    assert mask.sum() == 8 and mask[3:5, 2:6].all()
    assert box_mask((8, 10), BOX, tolerance=1).sum() == 6 * 4


def test_map_inside_the_box_scores_one():
    heat = np.zeros((8, 10))
    heat[3:5, 2:6] = np.arange(8).reshape(2, 4) + 1
    assert pointing_game(heat, BOX) == 1.0
    assert energy_pointing_game(heat, BOX) == 1.0


def test_uniform_map_scores_the_box_area_share():
    heat = torch.ones(8, 10)
    assert energy_pointing_game(heat, BOX) == pytest.approx(8 / 80)
    assert pointing_game(heat, BOX) == pytest.approx(8 / 80)  # every pixel is a maximum


def test_peak_outside_the_box_misses_and_tolerance_can_catch_it():
    heat = np.full((8, 10), 0.1)
    heat[5, 6] = 1.0  # just below-right of the box
    assert pointing_game(heat, BOX) == 0.0
    assert pointing_game(heat, BOX, tolerance=1) == 1.0
    assert energy_pointing_game(heat, BOX) == pytest.approx(0.8 / (0.1 * 79 + 1.0))


def test_in_box_auc_known_values():
    # a 1 x 4 map ranked 3 > 2 > 1 > 0 with only the second pixel in the box: the in-box share of the
    # top 1, 2, 3, 4 pixels is 0, 1/2, 1/3, 1/4
    assert in_box_auc(np.array([[3.0, 2.0, 1.0, 0.0]]), (1, 0, 2, 1)) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # ties share their in-box share: the top 1 is half a box pixel
    assert in_box_auc(np.array([[1.0, 1.0, 0.0, 0.0]]), (0, 0, 1, 1)) == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # the box itself: perfect until the 8 box pixels are used, then 8 / k; uniform and empty maps: the area share
    indicator = box_mask((8, 10), BOX).astype(float)
    best = (8 + sum(8 / k for k in range(9, 81))) / 80
    assert in_box_auc(indicator, BOX) == pytest.approx(best)
    assert in_box_auc(np.ones((8, 10)), BOX) == pytest.approx(0.1)
    assert in_box_auc(np.zeros((8, 10)), BOX) == pytest.approx(0.1)
    # the box last: nothing inside until the 72 outside pixels are used
    assert in_box_auc(1 - indicator, BOX) == pytest.approx(sum((k - 72) / k for k in range(73, 81)) / 80)


def test_in_box_auc_ignores_sharpening_but_energy_does_not():
    rng = np.random.default_rng(0)
    heat = rng.random((8, 10))
    heat[3:5, 2:6] += 0.3
    sharper = heat**4 + 1e-3
    assert in_box_auc(sharper, BOX) == pytest.approx(in_box_auc(heat, BOX))
    assert energy_pointing_game(sharper, BOX) > energy_pointing_game(heat, BOX)


def test_bootstrap_ci():
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25, 0.25)
    mean, low, high = bootstrap_ci([0.0, 1.0] * 50 + [float("nan")], seed=1)
    # the normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 100) = 0.5 +- 0.098
    assert mean == 0.5 and low == pytest.approx(0.402, abs=0.03) and high == pytest.approx(0.598, abs=0.03)
    assert bootstrap_ci([0.0, 1.0] * 50, seed=1) == bootstrap_ci([0.0, 1.0] * 50, seed=1)
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


def test_empty_map_points_nowhere_and_bad_input_is_refused():
    assert pointing_game(np.zeros((8, 10)), BOX) == 0.0
    assert energy_pointing_game(np.zeros((8, 10)), BOX) == 0.0
    with pytest.raises(ValueError, match="empty box"):
        pointing_game(np.ones((8, 10)), (5, 3, 5, 6))
    with pytest.raises(ValueError, match="2-D"):
        energy_pointing_game(np.ones((1, 8, 10)), BOX)


class ConstantModel(nn.Module):
    def forward(self, x):
        return torch.tensor([[2.0, 0.0, -1.0]]).expand(len(x), -1)


class RegionModel(nn.Module):
    """Logit of class 0 = sum of the input inside a fixed region; class 1 = 0."""

    def __init__(self, region: torch.Tensor, gain: float = 1.0):
        super().__init__()
        self.register_buffer("region", region.float())
        self.gain = gain

    def forward(self, x):
        evidence = (x[:, 0] * self.region).sum(dim=(-2, -1)) * self.gain
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def _region() -> torch.Tensor:
    region = torch.zeros(8, 8)
    region[0:2, 0:4] = 1  # 8 of 64 pixels: exactly one step when steps = 8
    return region


def test_constant_model_gives_flat_curves():
    x = torch.rand(3, 2, 8, 8)
    heat = torch.rand(3, 8, 8)
    expected = torch.tensor([2.0, 0.0, -1.0]).softmax(0)[0]
    for curve in (deletion_curve(ConstantModel(), x, heat, [0, 0, 0]), insertion_curve(ConstantModel(), x, heat, [0] * 3)):
        assert curve.shape == (3, 17)
        assert torch.allclose(curve, expected.expand(3, 17))
        assert torch.allclose(auc(curve), expected.expand(3))


def test_deletion_of_the_region_map_drops_at_once_and_insertion_rises_at_once():
    region = _region()
    model = RegionModel(region)
    x = torch.ones(1, 1, 8, 8)
    full, none = torch.sigmoid(torch.tensor(8.0)).item(), 0.5
    deletion = deletion_curve(model, x, region[None], [0], steps=8)[0]
    insertion = insertion_curve(model, x, region[None], [0], steps=8)[0]
    assert deletion.tolist() == pytest.approx([full] + [none] * 8, abs=1e-6)
    assert insertion.tolist() == pytest.approx([none] + [full] * 8, abs=1e-6)


def test_a_faithful_map_beats_its_inverse_on_both_curves():
    region = _region()
    model = RegionModel(region, gain=0.5)
    x = torch.rand(4, 1, 8, 8) + 0.5
    good, bad = region.expand(4, 8, 8), (1 - region).expand(4, 8, 8)
    labels = [0] * 4
    assert (auc(deletion_curve(model, x, good, labels)) < auc(deletion_curve(model, x, bad, labels))).all()
    assert (auc(insertion_curve(model, x, good, labels)) > auc(insertion_curve(model, x, bad, labels))).all()


def test_curves_are_the_same_in_small_chunks_and_with_a_tensor_baseline():
    region = _region()
    model = RegionModel(region, gain=0.3)
    x = torch.rand(2, 1, 8, 8)
    heat = torch.rand(2, 8, 8)
    whole = deletion_curve(model, x, heat, [0, 1], steps=4)
    chunked = deletion_curve(model, x, heat, [0, 1], steps=4, batch_size=3)
    explicit = deletion_curve(model, x, heat, [0, 1], steps=4, baseline=torch.zeros(1, 1, 1, 1))
    assert torch.allclose(whole, chunked) and torch.allclose(whole, explicit)


def test_auc_of_known_curves():
    assert auc(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    assert auc(np.array([0.3, 0.3])).item() == pytest.approx(0.3)


def test_baselines():
    x = torch.full((1, 2, 16, 16), 0.7)
    assert torch.allclose(baseline_like(x, "blur"), x)  # blurring a constant image changes nothing
    assert torch.allclose(baseline_like(x, "mean"), x)
    assert baseline_like(x, "zeros").abs().sum() == 0
    spike = torch.zeros(1, 1, 15, 15)
    spike[0, 0, 7, 7] = 1
    blurred = baseline_like(spike, "blur", sigma=1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4) and blurred.max() < 0.2
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_like(x, "noise")


def test_perturbation_input_errors():
    model = ConstantModel()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="heat must be"):
        deletion_curve(model, x, torch.rand(2, 4, 4), [0, 0])
    with pytest.raises(ValueError, match="one label per sample"):
        deletion_curve(model, x, torch.rand(2, 8, 8), [0])


def test_top_fraction_drop():
    region = _region()
    model = RegionModel(region)
    x = torch.ones(2, 1, 8, 8)
    heat = torch.stack([region, 1 - region])
    drop = top_fraction_drop(model, x, heat, [0, 0], fraction=8 / 64)
    assert drop[0].item() == pytest.approx(torch.sigmoid(torch.tensor(8.0)).item() - 0.5, abs=1e-6)
    assert drop[1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(top_fraction_drop(ConstantModel(), x, heat, [1, 1]), torch.zeros(2))


def test_rank_correlation():
    a = np.arange(12.0).reshape(3, 4)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, np.exp(a)) == pytest.approx(1.0)  # ranks only
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(a, np.zeros_like(a)))
    tied = np.array([1.0, 1.0, 2.0, 3.0])
    assert rank_correlation(tied, np.array([0.0, 0.0, 5.0, 9.0])) == pytest.approx(1.0)


def test_randomized_copy_reinitialises_and_leaves_the_original():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.fill_(3.0)
    before = [p.clone() for p in model.parameters()]
    first, second = randomized_copy(model, seed=5), randomized_copy(model, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not torch.equal(first[0].weight, model[0].weight)
    assert torch.equal(first[0].weight, second[0].weight)
    assert first[1].running_mean.abs().sum() == 0 and not first.training


def test_focus_gate_leaves_the_reference_and_its_aliases_and_gates_shallow_maps():
    from camscope.algorithms import FocusLayerCAM

    reference = torch.zeros(1, 1, 2, 2)
    reference[0, 0, 0, 0] = 4.0  # evidence only in the top-left quarter
    shallow = torch.ones(1, 1, 4, 4)
    maps = {"shallow": shallow, "deep": reference, "container": reference.clone()}
    refined = FocusLayerCAM(gate_power=1.0).refine(maps, "deep")
    assert torch.equal(refined["deep"], reference) and torch.equal(refined["container"], reference)
    assert refined["shallow"][0, 0, 0, 0] > refined["shallow"][0, 0, 3, 3] >= 0
    assert energy_pointing_game(refined["shallow"][0, 0], (0, 0, 2, 2)) > energy_pointing_game(shallow[0, 0], (0, 0, 2, 2))
