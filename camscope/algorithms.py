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
        return torch.einsum("kbchw,bchw->bkhw", grads.clamp(min=0), activation).clamp_(min=0)


class FocusLayerCAM(LayerCAM):
    """Focus LayerCAM: camscope's LayerCAM variant that localizes the evidence of one label.

    Two changes to LayerCAM, each aimed at a way LayerCAM spreads heat beyond the object:

    1. **Contrastive target.** Differentiate ``log p_c = y_c - logsumexp(y)`` instead of ``y_c``:
       ``g = dy_c/dA - sum_j p_j dy_j/dA``. Features that raise every class (edges, clutter, texture)
       cancel; what remains separates class ``c`` from the classes the model is weighing.
    2. **Deep gating.** Shallow layers see every edge. Each layer's map is multiplied by the
       reference (deepest) layer's map of the same label, upsampled to its size and normalised to
       [0, 1] per sample and label, raised to ``gate_power``. The reference layer is left ungated,
       so at the last layer Focus LayerCAM is contrastive LayerCAM.

    ``M_l = relu(sum_k relu(g_k) * A_k) * norm(up(M_ref))^gate_power``
    """

    key = "focus_layercam"
    title = "Focus LayerCAM"
    target = "log_softmax"

    def __init__(self, gate_power: float = 1.0, contrastive: bool = True) -> None:
        self.gate_power = gate_power
        self.target = "log_softmax" if contrastive else "logit"

    def refine(self, maps: dict[str, torch.Tensor], reference: str | None) -> dict[str, torch.Tensor]:
        if reference is None or reference not in maps or self.gate_power == 0:
            return maps
        ref = maps[reference]
        peak = ref.amax(dim=(-2, -1), keepdim=True)
        ref = torch.where(peak > 0, ref / peak.clamp(min=torch.finfo(ref.dtype).tiny), torch.ones_like(ref))
        refined = {}
        for name, layer_map in maps.items():
            # a container whose output is the reference's (an alias) must not be gated by itself
            if name == reference or layer_map is maps[reference] or torch.equal(layer_map, maps[reference]):
                refined[name] = layer_map
                continue
            gate = F.interpolate(ref, size=layer_map.shape[-2:], mode="bilinear", align_corners=False)
            refined[name] = layer_map * gate.clamp_(min=0).pow_(self.gate_power)
        return refined


ALGORITHMS: dict[str, CamAlgorithm] = {
    algorithm.key: algorithm for algorithm in (GradCAM(), LayerCAM(), FocusLayerCAM())
}
ALGORITHM_TITLES: dict[str, str] = {key: algorithm.title for key, algorithm in ALGORITHMS.items()}
