"""Every fast path of the engine gives the maps of the plain float32 path.

The plain path is written out here as a user would: hooks that keep each layer's output (the
network continues on a copy), the model's own batch norms, one ``torch.autograd.grad`` per label,
and the GradCAM / LayerCAM formulas. Against it: each gradient strategy (sequential, folded,
batched, auto), the clone-only-where-needed capture, the eval batch norms run as affine maps,
bf16 autocast (within its documented tolerance) and ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from camscope import CamEngine
from camscope.algorithms import ALGORITHMS, FocusLayerCAM
from camscope.engine import BF16_TOLERANCE, BF16_TOLERANCE_ANY_LAYER
from camscope.gradients import PROBED

LABELS = [0, 3, 4]


def randomized_batch_norms(model: nn.Module) -> nn.Module:
    """Batch norms whose affine map is far from the identity, so that a wrong formula shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomized_batch_norms(torchvision.models.resnet18(num_classes=5))


def signal_cnn() -> nn.Module:
    """A 1-D model ([B, C, L] layers) with batch norms and in-place ReLUs."""
    torch.manual_seed(0)
    return randomized_batch_norms(nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.MaxPool1d(2),
        nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5),
    ))


def plain_maps(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int],
               target: str = "logit") -> dict[str, dict[str, torch.Tensor]]:
    """GradCAM and LayerCAM the plain way: cloned captures, one autograd.grad per label, float32."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _args, output):
            captured[name] = output
            return output.clone()
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
    try:
        logits = model(x.clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    maps: dict[str, dict[str, list]] = {"gradcam": {n: [] for n in layers}, "layercam": {n: [] for n in layers}}
    for label in labels:
        score = logits[:, label] if target == "logit" else logits.log_softmax(dim=-1)[:, label]
        grads = torch.autograd.grad(score.sum(), [captured[n] for n in layers], retain_graph=True)
        for name, grad in zip(layers, grads):
            activation = captured[name].detach()
            positions = tuple(range(2, activation.dim()))
            weights = grad.mean(dim=positions, keepdim=True)
            maps["gradcam"][name].append((weights * activation).sum(dim=1).clamp(min=0))
            maps["layercam"][name].append((grad.clamp(min=0) * activation).sum(dim=1).clamp(min=0))
    return {key: {n: torch.stack(parts, dim=1) for n, parts in per_layer.items()} for key, per_layer in maps.items()}


def assert_float_tolerance(got: dict, reference: dict) -> None:
    """The contract's float tolerance: max |got - ref| < 1e-3 of the layer's largest reference value."""
    for key, per_layer in reference.items():
        for name, ref in per_layer.items():
            assert got[key][name].dtype == torch.float32
            assert got[key][name].shape == ref.shape, (key, name)
            error = float((got[key][name] - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            assert error < 1e-3, (key, name, error)


@pytest.mark.parametrize("strategy", ["sequential", "folded", "batched", "auto"])
def test_every_gradient_strategy_gives_the_plain_float32_maps(resnet, strategy):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    engine = CamEngine(resnet, strategy=strategy)
    got = engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])
    names = [info.name for info in engine.layers]
    assert "bn1" in names and "layer1.0" in names  # overwritten by an in-place ReLU / not
    assert_float_tolerance(got.maps, plain_maps(resnet, names, x, LABELS))
    if strategy == "auto":
        assert set(engine.chosen_strategies.values()) <= set(PROBED) and len(engine.chosen_strategies) == 1
    else:
        assert engine.chosen_strategies == {}


@pytest.mark.parametrize("strategy", ["sequential", "folded"])
def test_strategies_are_generic_over_one_dimensional_layers(strategy):
    model = signal_cnn()
    x = torch.randn(3, 2, 40, generator=torch.Generator().manual_seed(3))
    engine = CamEngine(model, strategy=strategy)
    got = engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])
    names = [info.name for info in engine.layers]
    assert got.maps["gradcam"][names[0]].shape == (3, len(LABELS), 40)
    assert_float_tolerance(got.maps, plain_maps(model, names, x, LABELS))


def test_captures_are_copied_only_where_a_later_inplace_op_overwrites_them(resnet):
    x = torch.rand(2, 3, 32, 32)
    engine = CamEngine(resnet, strategy="sequential")
    engine.explain(x, labels=[1], algorithms=["gradcam"])
    # batch norms feed ReLU(inplace=True); block outputs, convolutions and pools are never overwritten
    assert "bn1" in engine._clone_layers and "layer1.0.bn1" in engine._clone_layers
    assert not engine._clone_layers & {"conv1", "maxpool", "layer1.0", "layer4", "layer2.0.conv1"}
    assert all(name.split(".")[-1].startswith("bn") for name in engine._clone_layers)
    # the model is left as it was: no hooks, batch norms computing as before
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in resnet.modules())
    assert hooks == 0


def test_contrastive_target_with_sequential_gradients(resnet, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "focus_contrastive", FocusLayerCAM(contrastive=True))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    engine = CamEngine(resnet, strategy="sequential")
    got = engine.explain(x, labels=LABELS, algorithms=["focus_contrastive"]).maps["focus_contrastive"]
    names = [info.name for info in engine.layers]
    plain = plain_maps(resnet, names, x, LABELS, target="log_softmax")["layercam"]
    reference = ALGORITHMS["focus_contrastive"].refine(plain, engine._reference_layer(), engine.layers)
    assert_float_tolerance({"focus": got}, {"focus": reference})


def test_bfloat16_autocast_is_within_its_documented_tolerance(resnet):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    engine = CamEngine(resnet, dtype=torch.bfloat16, strategy="sequential")
    got = engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])
    names = [info.name for info in engine.layers]
    reference = plain_maps(resnet, names, x, LABELS)
    blocks = {"maxpool", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))}
    assert got.logits.dtype == torch.float32
    for key, per_layer in reference.items():
        for name, ref in per_layer.items():
            assert got.maps[key][name].dtype == torch.float32
            error = float((got.maps[key][name] - ref).norm() / ref.norm().clamp(min=1e-12))
            assert error < (BF16_TOLERANCE if name in blocks else BF16_TOLERANCE_ANY_LAYER), (key, name, error)
    # and bf16 is not float32 in disguise: the maps do differ
    assert float((got.maps["gradcam"]["layer4.1"] - reference["gradcam"]["layer4.1"]).abs().max()) > 0


def test_compiled_model_gives_the_plain_float32_maps():
    torch.manual_seed(0)
    model = randomized_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ))
    engine = CamEngine(model, compile=True, strategy="sequential")
    names = ["0", "1", "3", "4"]
    for seed in (6, 7):  # the second call reuses the compiled graph with fresh probes
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        got = engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])
        assert_float_tolerance({k: {n: got.maps[k][n] for n in names} for k in got.maps},
                               plain_maps(model, names, x, LABELS))


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "parallel"}, "strategy must be one of"),
    ({"dtype": torch.int8}, "dtype must be"),
])
def test_bad_speed_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CamEngine(nn.Conv2d(3, 3, 1), **kwargs)
