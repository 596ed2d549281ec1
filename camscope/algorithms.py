"""The CAM weighting rules. The engine owns hooks, forward and the batched backward; each
algorithm here is only its rule for turning one layer's activation and gradients into a map.

Shapes: ``activation`` is ``[B, C, H, W]``; ``grads`` is ``[K, B, C, H, W]`` (one gradient per
requested label, batched); every rule returns raw maps ``[B, K, H, W]`` (>= 0, not normalised).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from camscope.graph import LayerInfo


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

    def refine(self, maps: dict[str, torch.Tensor], reference: str | None,
               layers: Sequence[LayerInfo] | None = None) -> dict[str, torch.Tensor]:
        """Cross-layer step after every layer's map exists; identity by default.

        ``reference`` is the deepest layer with extent; ``layers`` describe the maps' layers (depths).
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
        # relu() makes a fresh tensor, so the in-place product never touches the shared gradients;
        # multiply-and-sum is ~10x faster than einsum here (einsum batches over every pixel).
        return torch.relu(grads).mul_(activation).sum(dim=2).transpose(0, 1).clamp_(min=0)


GATES = ("cascade", "nearest", "stage", "deepest")


class FocusLayerCAM(LayerCAM):
    """Focus LayerCAM: LayerCAM at every layer, gated by the focused map of the layer above it.

    Shallow layers respond to every edge, clutter included; deeper layers know better where the
    label's evidence is, but more coarsely. Focus LayerCAM walks from the output towards the input
    and keeps each layer's detail where the (already focused) layer above it agrees:

    ``F_ref = LayerCAM_ref``;  ``F_l = LayerCAM_l * norm(resize(F_g(l)))^gate_power``, ``gate_power = 1.5``

    - ``LayerCAM_l = relu(sum_k relu(dy_c/dA_k) * A_k)`` at layer ``l``, for label ``c``;
    - ``ref`` is the deepest layer with extent (the engine's reference layer): there Focus LayerCAM
      equals LayerCAM;
    - ``g(l)``, the gating layer, is the nearest deeper layer (one that depends on every input ``l``
      depends on) when it has ``l``'s resolution; when it is coarser, the deepest layer of that
      coarser resolution. So layers are gated step by step at their own resolution, and the last
      layer of each resolution by the last layer of the next: the gate never comes from a
      convolution whose output a batch norm is still to rescale (whose LayerCAM is poor);
    - a layer whose LayerCAM map equals its gating layer's (a container returning its last child,
      a batch norm before a ReLU) takes that layer's focused map instead of gating itself;
    - ``resize`` is bilinear (linear for 1-D maps) to layer ``l``'s size; ``norm`` divides by the
      maximum per sample and label (an all-zero gate leaves the layer ungated); a map with one
      position (a global pool) is left as it is.

    So ``F_l`` is ``LayerCAM_l`` times a normalised product of the LayerCAM maps of the chain of
    gating layers up to the output: one forward and one batched backward, like LayerCAM. Chosen on
    a tuning split (200 demo validation scenes, two architectures) with ``benchmarks/focus_eval.py``
    against the other ``gate`` rules and powers 0.75, 1, 1.5 and 2 (power 1 was a close second: fewer
    depths beaten, slightly higher in-box AUC); the held-out numbers are in
    ``benchmarks/results/focus_eval.md``.

    Args:
        gate: how ``g(l)`` is chosen: ``"cascade"`` (above, the default), ``"nearest"`` (always the
            nearest deeper layer), ``"stage"`` (always the deepest layer of the nearest's
            resolution) or ``"deepest"`` (every layer gated by the reference's LayerCAM: the first
            version).
        gate_power: exponent of the gate (default 1.5); 0 disables gating (plain LayerCAM).
        contrastive: differentiate ``log p_c = y_c - logsumexp(y)`` instead of ``y_c`` (a design
            variant, off by default).

    Examples:
        >>> ex = CamEngine(model).explain(x, labels=[3], algorithms=["focus_layercam"])
        >>> ex.maps["focus_layercam"]["layer1"].shape     # [B, K, h, w], like LayerCAM's
    """

    key = "focus_layercam"
    title = "Focus LayerCAM"
    target = "logit"

    def __init__(self, gate: str = "cascade", gate_power: float = 1.5, contrastive: bool = False) -> None:
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self.gate_power = gate_power
        self.target = "log_softmax" if contrastive else "logit"

    def refine(self, maps: dict[str, torch.Tensor], reference: str | None,
               layers: Sequence[LayerInfo] | None = None) -> dict[str, torch.Tensor]:
        if reference is None or reference not in maps or self.gate_power == 0:
            return maps
        deepest = maps[reference]
        cascade = self.gate != "deepest" and layers is not None
        plan = _gate_sources(layers, maps, reference, self.gate) if cascade else [(n, reference) for n in maps]
        refined: dict[str, torch.Tensor] = {}
        for name, source in plan:
            layer_map = maps[name]
            # the reference and its aliases (a container returning it) are not gated by themselves,
            # and a map with one position (a global pool) has no location to focus
            if name == reference or not _has_positions(layer_map) or _same(layer_map, deepest):
                refined[name] = layer_map
            elif _same(layer_map, maps[source]):
                refined[name] = refined[source]
            elif layer_map.dim() != deepest.dim():
                refined[name] = layer_map  # a 1-D layer in a 2-D model (or back): no common geometry
            else:
                gate = _resized(_unit_peak(refined.get(source, maps[source])), layer_map.shape[2:])
                refined[name] = layer_map * gate.pow_(self.gate_power)
        return {name: refined[name] for name in maps}


def _gate_sources(layers: Sequence[LayerInfo], maps: dict[str, torch.Tensor], reference: str,
                  gate: str) -> list[tuple[str, str]]:
    """(layer, the layer whose focused map gates it), deepest first.

    ``nearest`` is the nearest deeper layer with positions that depends on every input the layer
    depends on. ``cascade`` takes it when it has the layer's resolution, and otherwise the deepest
    layer of that coarser resolution (so a stage's last layer is gated by the next stage's last
    layer, never by a pre-normalisation convolution inside it); ``stage`` always takes the deepest
    layer of the nearest's resolution. A layer with no deeper layer is gated by the reference.
    """
    described = tuple(
        (info.name, tuple(sorted(info.depth.items())), info.order, tuple(maps[info.name].shape[2:]))
        for info in layers if info.name in maps
    )
    plan = _plan(described, reference, gate)  # the same model gives the same plan: computed once
    known = {name for name, _ in plan}
    return [*plan, *((name, reference) for name in maps if name not in known)]


@functools.lru_cache(maxsize=64)
def _plan(described: tuple, reference: str, gate: str) -> list[tuple[str, str]]:
    layers = [(name, dict(depth), order, size) for name, depth, order, size in described]
    with_extent = [layer for layer in layers if math.prod(layer[3]) > 1]
    plan = []
    for name, depth, order, size in sorted(layers, key=lambda layer: (-max(layer[1].values(), default=0), -layer[2])):
        deeper = [
            other for other in with_extent
            if other[0] != name and depth.keys() <= other[1].keys()
            and all(other[1][c] > d for c, d in depth.items())
        ]
        if not deeper:
            plan.append((name, reference))
            continue
        nearest = min(deeper, key=lambda o: (max(o[1][c] - d for c, d in depth.items()), -o[2]))
        if gate == "nearest" or (gate == "cascade" and nearest[3] == size):
            plan.append((name, nearest[0]))
            continue
        same_size = [o for o in deeper if o[3] == nearest[3]]
        plan.append((name, max(same_size, key=lambda o: (min(o[1][c] for c in depth), o[2]))[0]))
    return plan


def _has_positions(maps: torch.Tensor) -> bool:
    return maps.shape[2:].numel() > 1


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _resized(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``[B, K, *spatial]`` resized (bilinear, or linear for 1-D) to ``size``; a copy either way."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps.clone()
    mode = "linear" if len(size) == 1 else "bilinear"
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False).clamp_(min=0)


def _unit_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each map (every axis after ``[B, K]``) divided by its maximum; an all-zero map becomes all ones (no gating)."""
    peak = maps.amax(dim=tuple(range(2, maps.dim())), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp(min=torch.finfo(maps.dtype).tiny), torch.ones_like(maps))


ALGORITHMS: dict[str, CamAlgorithm] = {
    algorithm.key: algorithm for algorithm in (GradCAM(), LayerCAM(), FocusLayerCAM())
}
ALGORITHM_TITLES: dict[str, str] = {key: algorithm.title for key, algorithm in ALGORITHMS.items()}
