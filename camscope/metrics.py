"""How good is a CAM map? Localization against a known answer and faithfulness to the model.

Localization (needs a bounding box): the pointing game (Zhang et al. 2016,
https://arxiv.org/abs/1608.00507), the energy-based pointing game (Wang et al. 2020, Score-CAM,
https://arxiv.org/abs/1910.01279) and :func:`in_box_auc`, which depends only on the ranking of the
pixels, so that sharpening a map (any increasing transform) cannot raise it. Faithfulness (needs only the model): deletion and insertion
curves and their area under the curve (Petsiuk et al. 2018, RISE, https://arxiv.org/abs/1806.07421),
and a one-forward-pass per-map score, :func:`top_fraction_drop`. Sanity check (Adebayo et al. 2018,
https://arxiv.org/abs/1810.03292): rank correlation between the maps of a model and of its
weight-randomized copy, :func:`randomized_copy` + :func:`rank_correlation`. Uncertainty:
:func:`bootstrap_ci`, a percentile bootstrap over samples.

Conventions: maps are at the input's resolution (upsample a raw map first with
:func:`camscope.heatmap.upsample`), 2-D ``(H, W)`` for the localization metrics and batched
``(B, H, W)`` for the perturbation metrics. Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``
and ``y1`` exclusive, i.e. the box is ``heat[y0:y1, x0:x1]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Box = Sequence[float]
Map = np.ndarray | torch.Tensor
#: A model as the perturbation metrics see it: a batch of one connection's inputs -> logits [N, classes].
ModelFn = Callable[[torch.Tensor], torch.Tensor]

BASELINES = ("zeros", "mean", "blur")


# ----------------------------------------------------------------------------- localization
def _as_map(heat: Map) -> np.ndarray:
    values = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    if values.ndim != 2:
        raise ValueError(f"a map must be 2-D (H, W), got shape {values.shape}")
    return np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def box_mask(shape: tuple[int, int], box: Box, tolerance: int = 0) -> np.ndarray:
    """Boolean ``(H, W)`` mask of ``box = (x0, y0, x1, y1)`` (x1, y1 exclusive), grown by ``tolerance`` px."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box!r}: need x0 < x1 and y0 < y1")
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y0 - tolerance, 0) : max(y1 + tolerance, 0), max(x0 - tolerance, 0) : max(x1 + tolerance, 0)] = True
    return mask


def pointing_game(heat: Map, box: Box, tolerance: int = 0) -> float:
    """Pointing game: does the map's maximum fall inside the box?

    Args:
        heat: ``(H, W)`` map at the input's resolution.
        box: ``(x0, y0, x1, y1)``, x1 and y1 exclusive.
        tolerance: pixels the box is grown by (Zhang et al. use 15 at 224 px).

    Returns:
        1.0 for a hit, 0.0 for a miss; when several pixels share the maximum, the share of them
        inside the box. A map with no positive value points nowhere and scores 0.0.
    """
    values = _as_map(heat)
    peak = values.max()
    if peak <= 0:
        return 0.0
    top = values == peak
    return float(top[box_mask(values.shape, box, tolerance)].sum() / top.sum())


def energy_pointing_game(heat: Map, box: Box) -> float:
    """Energy-based pointing game: the share of the map's (positive) mass inside the box, in [0, 1].

    A uniform map scores the box's share of the image area; a map with no mass scores 0.0.
    """
    values = np.clip(_as_map(heat), 0, None)
    total = values.sum()
    if total <= 0:
        return 0.0
    return float(values[box_mask(values.shape, box)].sum() / total)


def in_box_auc(heat: Map, box: Box) -> float:
    """Area under the in-box fraction curve as the threshold sweeps from the hottest pixel to all.

    Keeping the map's hottest ``q`` of the pixels, the curve is the share of the kept pixels that
    lie inside the box; the score is its mean over ``q`` in ``(0, 1]`` (one step per pixel; pixels
    with equal values are kept together and share their in-box share). Only the pixels' ranking
    counts, so any increasing transform of the map (a power, a softmax) scores the same.

    Returns:
        a value in [0, 1]: 1.0 only if the box is the whole map; a uniform or all-zero map (no
        ranking) scores the box's share of the area ``s``; the best ranking scores
        ``s * (1 + ln(1 / s))``.
    """
    values = _as_map(heat)
    inside = box_mask(values.shape, box).ravel().astype(np.float64)
    flat = values.ravel()
    order = np.argsort(-flat, kind="stable")
    # the sorted values are non-increasing, so each run of equal values is one group of ties
    _, starts, counts = np.unique(-flat[order], return_index=True, return_counts=True)
    shared = np.repeat(np.add.reduceat(inside[order], starts) / counts, counts)
    return float((np.cumsum(shared) / np.arange(1, flat.size + 1)).mean())


# ----------------------------------------------------------------------------- uncertainty
def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-sample ``values`` and its percentile-bootstrap confidence interval.

    NaNs are dropped first. For a paired comparison of two methods pass the per-sample differences.

    Returns:
        ``(mean, low, high)``; all NaN when no value is left.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    data = data[~np.isnan(data)]
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(data.mean()), float(low), float(high)


# ----------------------------------------------------------------------------- faithfulness
def baseline_like(x: torch.Tensor, baseline: str | torch.Tensor = "zeros", sigma: float = 4.0) -> torch.Tensor:
    """What removed pixels are replaced by: ``"zeros"``, the per-image channel ``"mean"``, a Gaussian
    ``"blur"`` of the input (std ``sigma`` px), or a tensor broadcastable to ``x`` ``[B, C, H, W]``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    if baseline == "blur":
        return _gaussian_blur(x, sigma)
    raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES} or pass a tensor")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    # separable blur, one depthwise pass per axis; reflect padding keeps the borders' brightness
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), rows, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), cols, groups=channels)


def _heat_ranks(heat: Map, x: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel by heat, hottest = 0 (ties in raster order), ``[B, H*W]``."""
    heat = torch.as_tensor(heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat))
    batch, _, height, width = x.shape
    if tuple(heat.shape) != (batch, height, width):
        raise ValueError(f"heat must be [B, H, W] = {(batch, height, width)} (upsampled to the input), got {tuple(heat.shape)}")
    flat = torch.nan_to_num(heat.reshape(batch, -1).double(), nan=0.0)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
    return ranks.to(x.device)


def _label_probability(model: ModelFn, inputs: torch.Tensor, labels: torch.Tensor, softmax: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    out = out.float().softmax(dim=-1) if softmax else out.float()
    return out.gather(1, labels[:, None].to(out.device))[:, 0]


def perturbation_curve(
    model: ModelFn,
    x: torch.Tensor,
    heat: Map,
    labels: Sequence[int],
    mode: str = "deletion",
    steps: int = 16,
    baseline: str | torch.Tensor = "zeros",
    softmax: bool = True,
    batch_size: int = 512,
) -> torch.Tensor:
    """Deletion or insertion curve: the label's probability as pixels go, hottest first.

    ``deletion`` replaces the hottest pixels of ``x`` by the baseline (a faithful map makes the
    probability fall fast: low AUC is good); ``insertion`` starts from the baseline and reveals
    the hottest pixels first (high AUC is good).

    Args:
        model: batch ``[N, C, H, W]`` -> logits ``[N, classes]``. For a multi-input model close
            over the other connections, e.g. ``lambda v: net(left=v, right=r.expand(len(v), -1, -1, -1))``.
        x: inputs ``[B, C, H, W]``.
        heat: maps ``[B, H, W]`` at the input's resolution.
        labels: the class of each sample (B ints).
        mode: ``"deletion"`` or ``"insertion"``.
        steps: the curve has ``steps + 1`` points, at fractions ``0, 1/steps, ..., 1`` of the pixels.
        baseline: see :func:`baseline_like`.
        softmax: score probabilities (True) or the raw model output (False).
        batch_size: most perturbed inputs per forward pass.

    Returns:
        ``[B, steps + 1]`` float32 scores (on ``x``'s device).

    Examples:
        >>> curve = perturbation_curve(net, x, heat, labels=[3, 7], mode="deletion")   # [2, 17]
        >>> auc(curve)                                                                # [2]
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"need one label per sample: {x.shape[0]} samples, {labels.numel()} labels")
    batch, _, height, width = x.shape
    ranks = _heat_ranks(heat, x)
    base = baseline_like(x, baseline)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * (height * width) / steps).long()
    # every (sample, step) pair is one perturbed input; build them lazily in chunks of batch_size
    pairs = [(b, s) for b in range(batch) for s in range(steps + 1)]
    scores = torch.empty(batch, steps + 1, dtype=torch.float32, device=x.device)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        index_b = torch.tensor([b for b, _ in chunk], device=x.device)
        index_s = torch.tensor([s for _, s in chunk])
        gone = (ranks[index_b] < counts[index_s, None].to(x.device)).view(-1, 1, height, width)
        if mode == "insertion":
            gone = ~gone
        perturbed = torch.where(gone, base[index_b], x[index_b])
        scores[index_b, index_s.to(x.device)] = _label_probability(model, perturbed, labels[index_b.cpu()], softmax)
    return scores


def deletion_curve(model: ModelFn, x: torch.Tensor, heat: Map, labels: Sequence[int], **kwargs) -> torch.Tensor:
    """:func:`perturbation_curve` with ``mode="deletion"`` (lower AUC = more faithful)."""
    return perturbation_curve(model, x, heat, labels, mode="deletion", **kwargs)


def insertion_curve(model: ModelFn, x: torch.Tensor, heat: Map, labels: Sequence[int], **kwargs) -> torch.Tensor:
    """:func:`perturbation_curve` with ``mode="insertion"`` (higher AUC = more faithful)."""
    return perturbation_curve(model, x, heat, labels, mode="insertion", **kwargs)


def auc(curve: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Area under curves sampled evenly on [0, 1] (trapezoid rule) over the last axis."""
    curve = torch.as_tensor(curve, dtype=torch.float32)
    if curve.shape[-1] < 2:
        raise ValueError("a curve needs at least 2 points")
    return ((curve[..., 1:] + curve[..., :-1]) / 2).mean(dim=-1)


def top_fraction_drop(
    model: ModelFn,
    x: torch.Tensor,
    heat: Map,
    labels: Sequence[int],
    fraction: float = 0.1,
    baseline: str | torch.Tensor = "zeros",
    batch_size: int = 512,
) -> torch.Tensor:
    """Per-map faithfulness in one forward pass: how much the label's probability falls when the
    map's hottest ``fraction`` of pixels is replaced by the baseline.

    ``p(label | x) - p(label | x without its top pixels)``, in [-1, 1]; higher = the map points at
    pixels the model needs. Cheap enough for the batch job to store one per map.

    Returns:
        ``[B]`` float32.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"need one label per sample: {x.shape[0]} samples, {labels.numel()} labels")
    keep = int(round(fraction * x.shape[-1] * x.shape[-2]))
    top = (_heat_ranks(heat, x) < keep).view(x.shape[0], 1, *x.shape[-2:])
    both = torch.cat([x, torch.where(top, baseline_like(x, baseline), x)])
    both_labels = labels.repeat(2)
    scores = torch.cat([
        _label_probability(model, both[i : i + batch_size], both_labels[i : i + batch_size], softmax=True)
        for i in range(0, len(both), batch_size)
    ])
    return scores[: x.shape[0]] - scores[x.shape[0] :]


# ----------------------------------------------------------------------------- sanity check
def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised (``reset_parameters`` of each module,
    BatchNorm statistics included), in eval mode: the "model randomization" test of Adebayo et al."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            reset_stats = getattr(module, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
    return clone.eval()


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0) - 1)[inverse.reshape(-1)]


def rank_correlation(a: Map, b: Map) -> float:
    """Spearman rank correlation of two maps of the same shape (ties get average ranks).

    NaN when either map is constant (no ranking to compare). A sanity check expects the maps of
    a trained model and of its :func:`randomized_copy` to correlate weakly.
    """
    a_values = (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).ravel()
    b_values = (b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)).ravel()
    if a_values.shape != b_values.shape:
        raise ValueError(f"maps differ in size: {a_values.size} vs {b_values.size}")
    ra, rb = _average_ranks(a_values), _average_ranks(b_values)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
