"""Every fast path of the engine gives the maps of the plain float32 path.

The plain path is written out here as a user would: hooks that keep each layer's output (the
network continues on a copy), the model's own batch norms, one ``torch.autograd.grad`` per label,
and the GradCAM / LayerCAM formulas. Against it: each gradient strategy (sequential, folded,
batched, auto), the clone-only-where-needed capture, the eval batch norms run as affine maps,
bf16 autocast (within its documented tolerance) and ``torch.compile``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from camscope import CamEngine
from camscope.algorithms import ALGORITHMS, FocusLayerCAM
from camscope.engine import BF16_TOLERANCE, BF16_TOLERANCE_ANY_LAYER, _aliases
from camscope import gradients
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


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer, small: 2 blocks of scaled-dot-product attention over 4x4 tokens."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model.eval()


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + 16, C]`` tokens -> ``[B, C, 4, 4]``: the class token dropped (pytorch-grad-cam's ViT reshape)."""
    return tokens[:, 1:].unflatten(1, (4, 4)).permute(0, 3, 1, 2)


def plain_maps(model: nn.Module, layers: list[str], x: torch.Tensor, labels: list[int],
               target: str = "logit", grid=lambda tensor: tensor) -> dict[str, dict[str, torch.Tensor]]:
    """GradCAM and LayerCAM the plain way: cloned captures, one autograd.grad per label, float32;
    ``grid`` lays an output (and its gradient) out as ``[B, C, ...positions]``."""
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
            activation, grad = grid(captured[name].detach()), grid(grad)
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


@pytest.mark.parametrize("strategy", ["sequential", "folded", "batched", "auto"])
def test_strategies_on_attention_layers_give_the_plain_float32_maps(strategy):
    """Scaled-dot-product attention has no vmap batching rule for its CPU backward: "folded" loops over
    the labels for that op alone, silently (no PyTorch performance warning reaches the user)."""
    model = tiny_vit()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    # mlp.4 (an eval-mode Dropout) and mlp (its container) return mlp.3's very tensor: maps computed once
    names = ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.mlp.3",
             "encoder.layers.encoder_layer_0.mlp.4", "encoder.layers.encoder_layer_0.mlp",
             "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.ln_1"]
    engine = CamEngine(model, layers=names, strategy=strategy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])
    assert not [w for w in caught if "performance drop" in str(w.message)]
    if strategy == "folded":  # the fallback is really hit: a bare vmap over autograd.grad warns
        leaf = x.clone().requires_grad_(True)
        logits = model(leaf)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.func.vmap(lambda seed: torch.autograd.grad(logits, leaf, seed, retain_graph=True))(
                gradients.one_hot_seeds(logits, LABELS))
        assert [w for w in caught if "attention" in str(w.message) and "performance drop" in str(w.message)]
    assert got.maps["gradcam"][names[0]].shape == (2, len(LABELS), 4, 4)
    assert_float_tolerance(got.maps, plain_maps(model, names, x, LABELS, grid=token_grid))
    assert float(got.maps["gradcam"][names[-1]].amax()) > 0
    _, _, wrt = engine._forward({"x": x}, names)
    assert _aliases(wrt, engine._layouts_for({"x": x})) == [0, 1, 1, 1, 4, 5]


@pytest.mark.parametrize("once_above_s, runs_each", [(0.0, 1), (float("inf"), 3)])
def test_probe_times_a_long_run_once(monkeypatch, once_above_s, runs_each):
    """On CPU a probe whose warm-ups all take TIME_ONCE_ABOVE_S or more decides by them (a ViT's
    backward takes seconds); shorter ones are timed twice more, interleaved."""
    model = tiny_vit()
    calls = []
    backward = gradients.backward
    monkeypatch.setattr(gradients, "TIME_ONCE_ABOVE_S", once_above_s)
    monkeypatch.setattr(gradients, "backward", lambda name, *args: calls.append(name) or backward(name, *args))
    logits = model(torch.rand(2, 3, 32, 32, requires_grad=True))
    assert gradients.fastest(logits, [logits], LABELS) in PROBED
    assert sorted(calls) == sorted(PROBED * runs_each)


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


def test_compiled_model_runs_its_backward_passes_without_donated_buffers(monkeypatch):
    # On CUDA a backward compiled with donated buffers refuses retain_graph=True, which the engine
    # needs for several labels; the engine turns them off while it compiles and differentiates.
    import torch._functorch.config as functorch_config

    seen = []
    original = gradients.backward

    def recording(*args, **kwargs):
        seen.append(functorch_config.donated_buffer)
        return original(*args, **kwargs)

    monkeypatch.setattr(gradients, "backward", recording)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    CamEngine(model.eval(), compile=True, strategy="sequential").explain(torch.rand(1, 3, 8, 8), labels=[0, 1])
    compiled, seen[:] = list(seen), []
    CamEngine(model.eval(), strategy="sequential").explain(torch.rand(1, 3, 8, 8), labels=[0, 1])
    assert compiled and not any(compiled)
    assert seen and all(seen)  # and left as it was outside a compiled engine


def test_default_gradient_budget_on_cpu_is_the_documented_constant():
    from camscope.engine import DEFAULT_GRADIENT_BUDGET

    engine = CamEngine(nn.Conv2d(3, 3, 1))
    assert engine.gradient_budget is None
    assert engine._budget(torch.zeros(2, 3)) == DEFAULT_GRADIENT_BUDGET
    assert CamEngine(nn.Conv2d(3, 3, 1), gradient_budget=7)._budget(torch.zeros(2, 3)) == 7
