"""The CAM weighting rules. The engine owns hooks, forward and the batched backward; each
algorithm here is only its rule for turning one layer's activation and gradients into a map.

Shapes: ``activation`` is ``[B, C, H, W]``; ``grads`` is ``[K, B, C, H, W]`` (one gradient per
requested label, batched); every rule returns raw maps ``[B, K, H, W]`` (>= 0, not normalised).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F


class CamAlgorithm:
    """Base class: a CAM method is its weighting rule plus the target it differentiates.

    ``target`` is ``"logit"`` (d y_c / dA) or ``"log_softmax"`` (d log p_c / dA, which subtracts
    the probability-weighted gradient of every class, so evidence shared with other classes cancels).
    """

    key: ClassVar[str]
    title: ClassVar[str]
    target: ClassVar[str] = "logit"

    def layer_map(self, activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Raw map ``[B, K, H, W]`` of one layer."""
        raise NotImplementedError

    def refine(self, maps: dict[str, torch.Tensor], reference: str | None) -> dict[str, torch.Tensor]:
        """Cross-layer step after every layer's map exists; identity by default."""
        return maps


class GradCAM(CamAlgorithm):
    """Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391).

    ``relu(sum_k mean_ij(dy_c/dA_k) * A_k)``: channels weighted by their spatially averaged gradient.
    Equals Captum's ``LayerGradCam(..., relu_attributions=True)``.
    """

    key = "gradcam"
    title = "GradCAM"

    def layer_map(self, activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        weights = grads.mean(dim=(-2, -1))  # [K, B, C]
        return torch.einsum("kbc,bchw->bkhw", weights, activation).clamp_(min=0)


class LayerCAM(CamAlgorithm):
    """LayerCAM (Jiang et al. 2021, https://ieeexplore.ieee.org/document/9462463).

    ``relu(sum_k relu(dy_c/dA_k) * A_k)``: each position weighted by its own positive gradient.
    """

    key = "layercam"
    title = "LayerCAM"

    def layer_map(self, activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        # relu() makes a fresh tensor, so the in-place product never touches the shared gradients;
        # multiply-and-sum is ~10x faster than einsum here (einsum batches over every pixel).
        return torch.relu(grads).mul_(activation).sum(dim=2).transpose(0, 1).clamp_(min=0)


class FocusLayerCAM(LayerCAM):
    """Focus LayerCAM: LayerCAM at every layer, gated by the deepest layer's LayerCAM map.

    Shallow layers respond to every edge, clutter included; the deepest layer knows where the
    label's evidence is, but only coarsely. Focus LayerCAM keeps a layer's detail where the deepest
    layer agrees:

    ``M_l = LayerCAM_l * norm(up(LayerCAM_ref))^gate_power``, with ``gate_power = 1``

    - ``LayerCAM_l = relu(sum_k relu(dy_c/dA_k) * A_k)`` at layer ``l``, for label ``c``;
    - ``ref`` is the deepest layer with spatial extent (the engine's reference layer);
    - ``up`` resizes bilinearly to layer ``l``'s size; ``norm`` divides by the maximum per sample
      and label (an all-zero reference leaves the layer ungated).

    The reference layer (and a container that merely returns its output) is not gated, so at the
    last layer Focus LayerCAM equals LayerCAM; nor is a 1x1 map (a global pool: no location).
    Chosen with ``benchmarks/focus_eval.py`` (see
    ``benchmarks/results/focus_eval.md``): a contrastive ``log p_c`` target lost localization at
    the deepest layers, and gate powers 0.5 and 2 won at fewer depths.

    Args:
        gate_power: exponent of the gate; 0 disables gating (plain LayerCAM).
        contrastive: differentiate ``log p_c = y_c - logsumexp(y)`` instead of ``y_c`` (a design
            variant, off by default).
    """

    key = "focus_layercam"
    title = "Focus LayerCAM"
    target = "logit"

    def __init__(self, gate_power: float = 1.0, contrastive: bool = False) -> None:
        self.gate_power = gate_power
        self.target = "log_softmax" if contrastive else "logit"

    def refine(self, maps: dict[str, torch.Tensor], reference: str | None) -> dict[str, torch.Tensor]:
        if reference is None or reference not in maps or self.gate_power == 0:
            return maps
        deepest = maps[reference]
        gate = _unit_peak(deepest)
        refined = {}
        for name, layer_map in maps.items():
            # an alias of the reference (a container returning it) must not be gated by itself,
            # and a 1x1 map (a global pool) has no location to focus
            if name == reference or layer_map.shape[-2:].numel() == 1 or torch.equal(layer_map, deepest):
                refined[name] = layer_map
                continue
            resized = F.interpolate(gate, size=layer_map.shape[-2:], mode="bilinear", align_corners=False)
            refined[name] = layer_map * resized.clamp_(min=0).pow_(self.gate_power)
        return refined


def _unit_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[h, w]`` map divided by its maximum; an all-zero map becomes all ones (no gating)."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp(min=torch.finfo(maps.dtype).tiny), torch.ones_like(maps))


ALGORITHMS: dict[str, CamAlgorithm] = {
    algorithm.key: algorithm for algorithm in (GradCAM(), LayerCAM(), FocusLayerCAM())
}
ALGORITHM_TITLES: dict[str, str] = {key: algorithm.title for key, algorithm in ALGORITHMS.items()}
