"""The CAM weighting rules. The engine owns hooks, forward and the batched backward; each
algorithm here is only its rule for turning one layer's activation and gradients into a map.

Shapes: ``activation`` is ``[B, C, H, W]``; ``grads`` is ``[K, B, C, H, W]`` (one gradient per
requested label, batched); every rule returns raw maps ``[B, K, H, W]`` (>= 0, not normalised).
"""

from __future__ import annotations

from collections.abc import Mapping
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

    def refine(self, maps: dict[str, torch.Tensor], references: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Cross-layer step after every layer's map exists; identity by default.

        ``references[layer]`` names the deepest layer that depends on the same inputs as ``layer``.
        """
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
    """Focus LayerCAM: LayerCAM gated by the deepest map on the same input path.

    Shallow layers respond to every edge (clutter included); the deepest layer knows where the
    label's evidence is but only at coarse resolution. Focus LayerCAM keeps the shallow layer's
    detail where the deep layer agrees:

    ``M_l = LayerCAM_l * norm(up(LayerCAM_ref(l)))^gate_power``

    - ``LayerCAM_l = relu(sum_k relu(dy_c/dA_k) * A_k)`` at layer ``l``;
    - ``ref(l)`` is the deepest layer (with spatial extent) that depends on exactly the same
      inputs as ``l``: in a two-view model a view's branch is gated by that branch's last layer,
      the layers after the views merge by the last merged layer;
    - ``up`` resizes bilinearly to layer ``l``'s size, ``norm`` divides by the maximum per sample
      and label (an all-zero reference leaves the layer ungated).

    The reference layer itself (and a container that merely returns it) is not gated, so there
    Focus LayerCAM *is* LayerCAM. Chosen by ``benchmarks/focus_eval.py`` over a contrastive
    ``log p_c`` target (which lost localization at the deep layers) and over gating every layer by
    the network's single deepest layer (which, in a two-view model, mixes in the other view).

    Args:
        gate_power: exponent of the gate; 0 disables gating.
        contrastive: differentiate ``log p_c`` instead of ``y_c`` (a design variant; off).
        gate_by: ``"path"`` (default, as above) or ``"last"``: every layer gated by the reference
            of the last layer to run (a design variant).
    """

    key = "focus_layercam"
    title = "Focus LayerCAM"
    target = "logit"

    def __init__(self, gate_power: float = 1.0, contrastive: bool = False, gate_by: str = "path") -> None:
        if gate_by not in ("path", "last"):
            raise ValueError(f"gate_by must be 'path' or 'last', got {gate_by!r}")
        self.gate_power = gate_power
        self.target = "log_softmax" if contrastive else "logit"
        self.gate_by = gate_by

    def refine(self, maps: dict[str, torch.Tensor], references: Mapping[str, str]) -> dict[str, torch.Tensor]:
        if not maps or self.gate_power == 0:
            return maps
        if self.gate_by == "last":
            references = dict.fromkeys(maps, references[list(maps)[-1]])
        gates = {ref: _unit_peak(maps[ref]) for ref in set(references.values())}
        refined = {}
        for name, layer_map in maps.items():
            reference = maps[references[name]]
            # a container whose output is its reference's (an alias) must not be gated by itself
            if name == references[name] or torch.equal(layer_map, reference):
                refined[name] = layer_map
                continue
            gate = F.interpolate(gates[references[name]], size=layer_map.shape[-2:], mode="bilinear", align_corners=False)
            refined[name] = layer_map * gate.clamp_(min=0).pow_(self.gate_power)
        return refined


def _unit_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[h, w]`` map divided by its maximum; an all-zero map becomes all ones (no gating)."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp(min=torch.finfo(maps.dtype).tiny), torch.ones_like(maps))


ALGORITHMS: dict[str, CamAlgorithm] = {
    algorithm.key: algorithm for algorithm in (GradCAM(), LayerCAM(), FocusLayerCAM())
}
ALGORITHM_TITLES: dict[str, str] = {key: algorithm.title for key, algorithm in ALGORITHMS.items()}
