"""The engine on transformers and 1-D networks, against the references people use: pytorch-grad-cam
with its documented ViT and Swin ``reshape_transform`` and Captum's ``LayerGradCam`` on a 1-D CNN.
No reshape code is given to camscope; tolerance is the contract's (1e-3 of each map's maximum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camscope import CamEngine

VIT_SIZE = 64  # vit_b_16 at 64x64: a 4x4 grid of patches plus the class token
VIT_GRID = VIT_SIZE // 16
LABELS = [1, 6]
VIT_BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
SWIN_STAGES = ["features.0", "features.1", "features.3", "features.5", "features.7", "norm"]


def vit_reshape_transform(tensor, height=VIT_GRID, width=VIT_GRID):
    """pytorch-grad-cam's documented ViT reshape (tutorials/vit_example.py): drop the class token."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    result = result.transpose(2, 3).transpose(1, 2)
    return result


def swin_reshape_transform(tensor):
    """The documented reshape for torchvision's Swin, whose blocks are channels-last [B, H, W, C]."""
    return tensor.permute(0, 3, 1, 2)


def reference_maps(cam_class, model, layers, reshape, x, labels) -> dict[str, torch.Tensor]:
    """Raw maps [B, K, h, w] from pytorch-grad-cam (its get_cam_image before it normalises and resizes)."""
    modules = dict(model.named_modules())
    targets_layers = [modules[name] for name in layers]
    per_label = {name: [] for name in layers}
    with cam_class(model=model, target_layers=targets_layers, reshape_transform=reshape) as cam:
        for label in labels:
            targets = [ClassifierOutputTarget(label)] * len(x)
            outputs = cam.activations_and_grads(x)
            model.zero_grad()
            sum(target(output) for target, output in zip(targets, outputs)).backward()
            for i, name in enumerate(layers):
                acts = cam.activations_and_grads.activations[i].numpy()
                grads = cam.activations_and_grads.gradients[i].numpy()
                raw = cam.get_cam_image(x, targets_layers[i], targets, acts, grads, False)
                per_label[name].append(torch.from_numpy(np.maximum(raw, 0)))
    return {name: torch.stack(maps, dim=1) for name, maps in per_label.items()}


def assert_close_per_map(got: torch.Tensor, reference: torch.Tensor, where: str) -> None:
    """Each [h, w] map within 1e-3 of that map's largest reference value."""
    assert got.shape == reference.shape, (where, got.shape, reference.shape)
    peak = reference.flatten(2).abs().amax(-1).clamp(min=1e-12)
    error = (got - reference).flatten(2).abs().amax(-1) / peak
    assert float(error.max()) < 1e-3, (where, error)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=VIT_SIZE).eval()
    # torchvision initialises the head to zeros, which makes every gradient zero
    nn.init.normal_(model.heads.head.weight, std=0.05)
    x = torch.rand(2, 3, VIT_SIZE, VIT_SIZE)
    engine = CamEngine(model)
    return model, x, engine, engine.explain(x, labels=LABELS, algorithms=["gradcam", "layercam"])


@pytest.mark.parametrize("algorithm,cam_class", [("gradcam", GradCAM), ("layercam", LayerCAM)])
def test_vit_every_encoder_block_equals_pytorch_grad_cam(vit, algorithm, cam_class):
    model, x, _, explanation = vit
    reference = reference_maps(cam_class, model, VIT_BLOCKS, vit_reshape_transform, x, LABELS)
    for name in VIT_BLOCKS:
        assert_close_per_map(explanation.maps[algorithm][name], reference[name], f"{algorithm} {name}")
    # the comparison is not vacuous: the early blocks' maps are not all zero
    assert float(reference[VIT_BLOCKS[0]].amax()) > 0


def test_vit_layers_tokens_depth_and_default_layer(vit):
    _, _, engine, explanation = vit
    block = engine.layer("encoder.layers.encoder_layer_3")
    assert block.shape == (768, VIT_GRID, VIT_GRID) and block.layout.kind == "tokens" and block.layout.prefix == 1
    depths = [engine.layer(name).depth["x"] for name in VIT_BLOCKS]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)
    # The last block's output reaches the logits only through the class token: its map is zero, so the
    # default layer is the deepest one whose positions matter (pytorch-grad-cam's advice: the last block's norm1).
    last = engine.last_layer()
    assert last.name == "encoder.layers.encoder_layer_11.ln_1"
    assert not engine.layer(VIT_BLOCKS[-1]).reaches_output
    assert float(explanation.maps["gradcam"][last.name].amax()) > 0
    assert explanation.maps["gradcam"]["encoder.layers.encoder_layer_11.mlp"].amax() == 0


def test_swin_equals_pytorch_grad_cam():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    engine = CamEngine(model, layers=SWIN_STAGES)
    explanation = engine.explain(x, labels=LABELS, algorithms=["gradcam"])
    reference = reference_maps(GradCAM, model, SWIN_STAGES[1:], swin_reshape_transform, x, LABELS)
    for name in SWIN_STAGES[1:]:
        assert engine.layer(name).layout.kind == "channels_last"
        assert_close_per_map(explanation.maps["gradcam"][name], reference[name], name)
    assert engine.layer("features.0").shape == (96, 16, 16)
    assert engine.layer("norm").shape == (768, 2, 2)


class SignalCNN(nn.Module):
    """A small 1-D CNN: [B, 2, 96] -> logits [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 5, padding=2)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).amax(dim=-1))


def test_1d_cnn_gradcam_equals_captum():
    torch.manual_seed(0)
    model = SignalCNN().eval()
    x = torch.randn(3, 2, 96)
    engine = CamEngine(model)
    explanation = engine.explain(x, labels=[0, 2, 3])
    assert [(info.name, info.shape, info.depth["x"]) for info in engine.layers] == [
        ("conv1", (8, 96), 1), ("act1", (8, 96), 2), ("pool", (8, 48), 3), ("conv2", (16, 48), 4), ("act2", (16, 48), 5)
    ]
    assert engine.last_layer().name == "act2"
    for info in engine.layers:
        module = dict(model.named_modules())[info.name]
        reference = torch.cat(
            [LayerGradCam(model, module).attribute(x, target=c, relu_attributions=True) for c in [0, 2, 3]], dim=1
        ).detach()
        for algorithm in ("gradcam", "layercam", "focus_layercam"):
            assert explanation.maps[algorithm][info.name].shape == (3, 3, info.shape[1])
        assert_close_per_map(explanation.maps["gradcam"][info.name], reference, info.name)
    assert float(explanation.maps["gradcam"]["conv2"].amax()) > 0


class TokensWithoutGrid(nn.Module):
    """A token-like output [B, 8, 7] from an image: 8 tokens fit no grid of a 16x16 input with a 4x4 patch embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(16, 7)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.patch(x).flatten(2)).transpose(1, 2)  # mix: [B, 8, 7]
        return self.head(tokens.mean(1))


def test_token_count_that_fits_no_grid_is_a_value_error_naming_layer_and_shape():
    with pytest.raises(ValueError, match=r"layer 'mix': 8 tokens of 7 channels \(output shape \(8, 7\)\)") as error:
        CamEngine(TokensWithoutGrid().eval(), layers=["mix"], example=torch.rand(1, 3, 16, 16))
    assert "16x16" in str(error.value)


def test_reshape_escape_hatch_and_its_wrong_shape():
    model = TokensWithoutGrid().eval()
    x = torch.rand(2, 3, 16, 16)

    def as_grid(name, output):  # mix: [B, 8, 7] read as 8 channels over a 1 x 7 grid
        return output.unflatten(-1, (1, 7)) if name == "mix" else None

    engine = CamEngine(model, reshape=as_grid)
    explanation = engine.explain(x, labels=[0])
    assert engine.layer("mix").shape == (8, 1, 7) and engine.layer("mix").layout.kind == "custom"
    assert explanation.maps["gradcam"]["mix"].shape == (2, 1, 1, 7)
    assert explanation.maps["gradcam"]["patch"].shape == (2, 1, 4, 4)

    with pytest.raises(ValueError, match=r"reshape\(\) of layer 'mix' returned \(1, 56\)"):
        CamEngine(model, reshape=lambda name, out: out.flatten(1) if name == "mix" else None, example=x[:1])


def test_1d_connection_given_an_image_is_a_value_error():
    engine = CamEngine(SignalCNN().eval(), example=torch.randn(1, 2, 96))
    with pytest.raises(ValueError, match=r"connection 'x' expects \[B, 2, 96\], got \(2, 2, 96, 96\)"):
        engine.explain(torch.randn(2, 2, 96, 96))


def test_token_count_that_fits_no_grid_is_left_out_by_default_with_a_warning():
    with pytest.warns(UserWarning, match=r"leaves out 1 layer\(s\) with no layout .*layer 'mix': 8 tokens"):
        engine = CamEngine(TokensWithoutGrid().eval(), example=torch.rand(1, 3, 16, 16))
    assert [info.name for info in engine.layers] == ["patch"]
    assert list(engine.skipped_layers) == ["mix"] and "fit no h x w grid" in engine.skipped_layers["mix"]
