"""The engine against references: Captum's LayerGradCam, the LayerCAM formula on Captum's layer
gradients, hand-checked depths, and every bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum.attr import LayerGradCam
from torch import nn

from camscope import CamEngine

torch.manual_seed(0)

RESNET_CHECKED = ["conv1", "bn1", "relu", "layer1", "layer1.0.bn2", "layer2.0.downsample", "layer3.1", "layer4"]


class TwoInput(nn.Module):
    """Two branches (left: 3 layers, right: 1 layer) fused by concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(1, 4, 3, padding=1)
        self.a_act = nn.ReLU()
        self.a2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fuse = nn.Conv2d(8, 8, 3, padding=1)
        self.fuse_act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        a = self.a2(self.a_act(self.a1(left)))
        b = self.b1(right)
        f = self.drop(self.fuse_act(self.fuse(torch.cat([a, b], dim=1))))
        return self.head(f.mean(dim=(2, 3)))


def sequential_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(3, 3, 96, 96)
    engine = CamEngine(model)
    return model, x, engine, engine.explain(x, labels=[0, 3, 7])


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the layer's largest reference value (the contract's tolerance)."""
    reference = reference.detach()
    return float((got - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def layercam_reference(model: nn.Module, module: nn.Module, x, label: int) -> torch.Tensor:
    """relu(sum_k relu(dY_c/dA_k) * A_k) on Captum's layer gradients and activations."""
    (grads,), (acts,) = compute_layer_gradients_and_eval(model, module, x, target_ind=label)
    return (grads.clamp(min=0) * acts).sum(dim=1).clamp(min=0).detach()


@pytest.mark.parametrize("layer", RESNET_CHECKED)
def test_gradcam_equals_captum_on_resnet18(resnet, layer):
    model, x, _, explanation = resnet
    module = dict(model.named_modules())[layer]
    reference = torch.stack(
        [
            LayerGradCam(model, module).attribute(x, target=label, relu_attributions=True)[:, 0]
            for label in explanation.labels
        ],
        dim=1,
    )
    assert reference.abs().max() > 0
    assert relative_error(explanation.maps["gradcam"][layer], reference) < 1e-3


@pytest.mark.parametrize("layer", RESNET_CHECKED)
def test_layercam_matches_the_paper_formula_on_resnet18(resnet, layer):
    model, x, _, explanation = resnet
    module = dict(model.named_modules())[layer]
    reference = torch.stack([layercam_reference(model, module, x, label) for label in explanation.labels], dim=1)
    assert relative_error(explanation.maps["layercam"][layer], reference) < 1e-3


def test_focus_layercam_at_the_last_layer_is_layercam_times_a_unit_detail(resnet):
    from camscope.algorithms import FocusLayerCAM

    model, x, engine, explanation = resnet
    last = engine.last_layer().name
    module = dict(model.named_modules())[last]
    reference = torch.stack([layercam_reference(model, module, x, label) for label in explanation.labels], dim=1)
    # without the detail step it is LayerCAM; the shipped rule scales each position by a detail in [0, 1]
    undetailed = FocusLayerCAM(detail_power=0).refine(explanation.maps["layercam"], engine._reference_layer(),
                                                      engine.layers)
    assert relative_error(undetailed[last], reference) < 1e-3
    focus, layercam = explanation.maps["focus_layercam"][last], explanation.maps["layercam"][last]
    ratio = focus[layercam > 0] / layercam[layercam > 0]
    assert ratio.min() >= 0 and ratio.max() <= 1 + 1e-5 and not torch.allclose(focus, layercam)


def test_maps_shapes_and_outputs(resnet):
    model, x, engine, explanation = resnet
    assert explanation.logits.shape == (3, 10) and not explanation.logits.requires_grad
    torch.testing.assert_close(explanation.logits, model(x))
    assert set(explanation.maps) == {"gradcam", "layercam", "focus_layercam"}
    for algorithm, maps in explanation.maps.items():
        assert set(maps) == {info.name for info in engine.layers}
        for info in engine.layers:
            layer_map = maps[info.name]
            assert layer_map.dtype == torch.float32
            assert tuple(layer_map.shape) == (3, 3, *info.shape[1:])
            assert (layer_map >= 0).all() and torch.isfinite(layer_map).all()
    assert explanation.embedding.shape == (3, 512)


def test_focus_layercam_is_nonnegative_finite_deterministic_and_differs_from_layercam(resnet):
    _, x, engine, explanation = resnet
    again = engine.explain(x, labels=[0, 3, 7], algorithms=["focus_layercam"])
    for info in engine.layers:
        focus = explanation.maps["focus_layercam"][info.name]
        assert (focus >= 0).all() and torch.isfinite(focus).all()
        torch.testing.assert_close(again.maps["focus_layercam"][info.name], focus, rtol=1e-5, atol=1e-7)
        layercam = explanation.maps["layercam"][info.name]
        # gated everywhere, the deepest layer too (by the finest map's detail), but at 1x1 maps, which have
        # no location
        ungated = info.shape[1:] == (1, 1)
        assert torch.allclose(focus, layercam) == ungated, info.name


def test_resnet18_layers_and_depths(resnet):
    _, _, engine, _ = resnet
    by_name = {info.name: info for info in engine.layers}
    # conv1 -> bn1 -> relu -> maxpool; each BasicBlock adds conv, bn, relu, conv, bn, (+ relu after the sum).
    assert [by_name[n].depth["x"] for n in ("conv1", "bn1", "relu", "maxpool")] == [1, 2, 3, 4]
    assert by_name["layer1.0.conv2"].depth == {"x": 8}
    assert by_name["layer1.0"].depth == {"x": 10}
    assert by_name["layer1"].depth == {"x": 16}
    assert by_name["layer2.0.downsample.0"].depth == {"x": 17}
    assert by_name["layer4"].depth == {"x": 52}
    assert by_name["layer4"].shape == (512, 3, 3)
    # Shared modules (each block's ReLU runs twice) are not layers; the 2-D head is not a layer.
    assert "layer1.0.relu" not in by_name and "fc" not in by_name
    assert engine.last_layer().name == "layer4"
    assert engine.connections == ["x"]


def test_sequential_cnn_layers_and_depths():
    engine = CamEngine(sequential_cnn(), example=torch.rand(2, 3, 16, 16))
    assert engine.connections == ["input"]  # nn.Sequential.forward(self, input)
    assert [(info.name, info.depth["input"]) for info in engine.layers] == [
        ("0", 1), ("1", 2), ("2", 3), ("3", 4), ("4", 5), ("5", 6)
    ]
    assert engine.layer("2").shape == (8, 8, 8)
    assert engine.last_layer().name == "4"  # the 1x1 pool shows no location


def test_two_input_model_depth_per_connection():
    model = TwoInput().eval()
    x = {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(2, 1, 12, 12)}
    engine = CamEngine(model, example=x)
    depths = {info.name: info.depth for info in engine.layers}
    assert depths == {
        "a1": {"left": 1},
        "a_act": {"left": 2},
        "a2": {"left": 3},
        "b1": {"right": 1},
        "fuse": {"left": 4, "right": 2},
        "fuse_act": {"left": 5, "right": 3},
        "drop": {"left": 5, "right": 3},  # a layer, but it computes nothing: no step of depth
    }
    assert engine.last_layer("left").name == "drop"
    assert engine.last_layer("right").name == "drop"
    explanation = engine.explain(x, labels=[1, 4])
    for name in ("a2", "b1", "fuse"):
        module = dict(model.named_modules())[name]
        reference = torch.stack(
            [
                LayerGradCam(model, module).attribute((x["left"], x["right"]), target=label, relu_attributions=True)[:, 0]
                for label in (1, 4)
            ],
            dim=1,
        )
        assert relative_error(explanation.maps["gradcam"][name], reference) < 1e-3


def test_label_chunks_give_the_same_maps_as_one_pass():
    model = TwoInput().eval()
    x = {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(2, 1, 12, 12)}
    whole = CamEngine(model).explain(x)
    chunked = CamEngine(model, gradient_budget=1).explain(x)
    assert whole.labels == chunked.labels == [0, 1, 2, 3, 4]
    for algorithm, maps in whole.maps.items():
        for name, layer_map in maps.items():
            torch.testing.assert_close(chunked.maps[algorithm][name], layer_map)


def test_restricted_layers_and_no_weight_gradients():
    model = torchvision.models.resnet18(num_classes=4).eval()
    engine = CamEngine(model, layers=["layer2", "layer4"])
    explanation = engine.explain(torch.rand(1, 3, 64, 64), labels=[2], algorithms=["gradcam"])
    assert [info.name for info in engine.layers] == ["layer2", "layer4"]
    assert set(explanation.maps) == {"gradcam"}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "make_input, labels, algorithms, message",
    [
        (lambda: {"middle": torch.rand(2, 1, 12, 12)}, None, None, "unknown connection"),
        (lambda: torch.rand(2, 1, 12, 12), None, None, "missing connection"),
        (lambda: {"left": torch.rand(2, 1, 12, 12)}, None, None, "missing connection"),
        (lambda: {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(3, 1, 12, 12)}, None, None, "batch size"),
        (lambda: {"left": torch.rand(2, 3, 12, 12), "right": torch.rand(2, 1, 12, 12)}, None, None, "expects"),
        (lambda: {"left": torch.zeros(2, 1, 12, 12, dtype=torch.int64), "right": torch.rand(2, 1, 12, 12)}, None, None, "floating"),
        (lambda: {"left": torch.full((2, 1, 12, 12), float("nan")), "right": torch.rand(2, 1, 12, 12)}, None, None, "NaN"),
        (lambda: {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(2, 1, 12, 12)}, [5], None, "out of range"),
        (lambda: {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(2, 1, 12, 12)}, [-1], None, "out of range"),
        (lambda: {"left": torch.rand(2, 1, 12, 12), "right": torch.rand(2, 1, 12, 12)}, None, ["scorecam"], "unknown algorithm"),
        (lambda: {"left": torch.rand(2, 1, 2, 2), "right": torch.rand(2, 1, 3, 3)}, None, None, "model failed"),
    ],
)
def test_bad_input_is_a_clear_value_error_and_leaves_no_hooks(make_input, labels, algorithms, message):
    model = TwoInput().eval()
    engine = CamEngine(model, example={"left": torch.rand(1, 1, 12, 12), "right": torch.rand(1, 1, 12, 12)})
    kwargs = {"labels": labels} | ({"algorithms": algorithms} if algorithms else {})
    with pytest.raises(ValueError, match=message):
        engine.explain(make_input(), **kwargs)
    assert _hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())
    engine.explain({"left": torch.rand(1, 1, 12, 12), "right": torch.rand(1, 1, 12, 12)}, labels=[0])


def test_model_without_spatial_layers_is_rejected():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    with pytest.raises(ValueError, match="no layer with a spatial"):
        CamEngine(mlp, example=torch.rand(2, 3, 2, 2))
    assert _hook_count(mlp) == 0


def test_unknown_layer_names_are_rejected():
    with pytest.raises(ValueError, match="unknown layer"):
        CamEngine(sequential_cnn(), layers=["nope"])
    with pytest.raises(ValueError, match="no 4-D output"):
        CamEngine(sequential_cnn(), layers=["7"], example=torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda: torch.rand(2, 1, 8, 8), "model failed on inputs of shape"),  # 1 channel for a 3-channel conv
        (lambda: torch.rand(2, 3, 1, 1), "model failed on inputs of shape"),  # too small for the pool
    ],
)
def test_bad_input_on_the_first_explain_without_example_is_a_value_error(make_input, message):
    """Layer discovery runs inside the input checks: the first explain() with a bad input is a ValueError
    (it used to escape as the model's raw RuntimeError), leaves no hooks, and a good input works next."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    engine = CamEngine(model)
    with pytest.raises(ValueError, match=message):
        engine.explain(make_input())
    assert _hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())
    assert engine.explain(torch.rand(2, 3, 8, 8), labels=[1]).maps["gradcam"]["0"].shape == (2, 1, 6, 6)
