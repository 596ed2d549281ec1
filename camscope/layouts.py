"""How a layer's raw output is laid out, and how to read it as the ``[B, C, h, w]`` the CAM rules use.

camscope explains any layer whose output has positions and channels:

- ``[B, C, H, W]`` convolution maps (``channels_first``);
- ``[B, H, W, C]`` channels-last maps such as torchvision's Swin blocks (``channels_last``);
- ``[B, N, C]`` transformer tokens (``tokens``), ``N = p + h * w``: ``p`` leading prefix tokens
  (class, distillation, register tokens) are dropped and the ``h x w`` grid is inferred from the
  patch embedding (a convolution whose stride equals its kernel) or, failing that, from ``N`` and
  the input's aspect ratio;
- ``[B, C, L]`` 1-D maps of signal and sequence networks (``channels_first`` with one spatial axis),
  or ``[B, L, C]`` after a per-step ``Linear``/``LayerNorm`` (``channels_last``);
- anything else through a user's ``reshape(name, output)`` (``custom``).

Every layout is a selection and permutation of the output, so the same function turns the gradients
into the same layout. 1-D layers are handled as ``[B, C, 1, L]`` inside the engine and returned as
``[B, K, L]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

#: ``reshape(layer_name, output) -> [B, C, h, w] | [B, C, L] | None`` (None: infer the layout).
Reshape = Callable[[str, torch.Tensor], "torch.Tensor | None"]

#: At most this many leading prefix tokens (class + distillation + register tokens) are dropped.
MAX_PREFIX_TOKENS = 16
#: A grid read off a layer's shape counts as the input's grid when their aspect ratios agree this closely.
ASPECT_TOLERANCE = math.log(1.5)
#: Token grids are searched at the patch grid and at these downsamplings of it (patch merging).
MERGE_FACTORS = (1, 2, 4, 8, 16, 32)

# Leaf modules whose type tells which axis holds the channels of what they produce.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)


def channel_axis_hint(module: nn.Module) -> str | None:
    """``"first"`` or ``"last"`` when ``module``'s type reveals where its output's channels are."""
    if isinstance(module, _CHANNELS_FIRST):
        return "first"
    if isinstance(module, _CHANNELS_LAST):
        return "last"
    if isinstance(module, nn.RNNBase):
        return "last" if module.batch_first else None
    dims = getattr(module, "dims", None)  # torchvision.ops.Permute
    if isinstance(dims, (list, tuple)) and len(dims) >= 3 and list(dims)[0] == 0:
        if list(dims[1:]) == list(range(2, len(dims))) + [1]:
            return "last"
        if list(dims[1:]) == [len(dims) - 1] + list(range(1, len(dims) - 1)):
            return "first"
    return None


def patch_grid(module: nn.Module, output: torch.Tensor) -> tuple[int, int] | None:
    """The token grid ``(h, w)`` of a patch embedding: a 2-D convolution whose stride equals its kernel."""
    if isinstance(module, nn.Conv2d) and output.dim() == 4 and module.stride == module.kernel_size \
            and max(module.kernel_size) > 1:
        return int(output.shape[-2]), int(output.shape[-1])
    return None


@dataclass(frozen=True)
class Layout:
    """How one layer's raw output ``[B, ...]`` maps to ``[B, C, *grid]``.

    Attributes:
        layer: the layer's name (for error messages).
        kind: ``"channels_first"``, ``"channels_last"``, ``"tokens"`` or ``"custom"``.
        shape: ``(C, h, w)`` or ``(C, L)``: the layer's shape as explained.
        prefix: leading tokens dropped (``tokens`` only).
        reshape: the user's function (``custom`` only).
    """

    layer: str
    kind: str
    shape: tuple[int, ...]
    prefix: int = 0
    reshape: Reshape | None = None

    @property
    def one_d(self) -> bool:
        """True for ``[B, C, L]`` layers, whose maps are ``[B, K, L]``."""
        return len(self.shape) == 2

    def spatial(self, output: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` raw output (or gradient) -> ``[B, C, h, w]``; 1-D layers as ``[B, C, 1, L]``."""
        if self.kind == "custom":
            result = self.reshape(self.layer, output)
            if not isinstance(result, torch.Tensor) or tuple(result.shape) != (output.shape[0], *self.shape):
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise ValueError(f"reshape() of layer {self.layer!r} returned {got} for an output of shape "
                                 f"{tuple(output.shape)}; expected [B, {', '.join(map(str, self.shape))}]")
        elif self.kind == "tokens":
            channels, height, width = self.shape
            result = output[:, self.prefix:].reshape(output.shape[0], height, width, channels).permute(0, 3, 1, 2)
        elif self.kind == "channels_last":
            result = output.movedim(-1, 1)
        else:
            result = output
        return result.unsqueeze(-2) if self.one_d else result

    def spatial_batched(self, grads: torch.Tensor) -> torch.Tensor:
        """The same for gradients ``[K, B, ...]`` -> ``[K, B, C, h, w]``."""
        k, b = grads.shape[:2]
        return self.spatial(grads.flatten(0, 1)).unflatten(0, (k, b))


def infer_layout(
    layer: str,
    raw_shape: Sequence[int],
    hint: str | None,
    image_sizes: Sequence[tuple[int, int]],
    patch_grids: Sequence[tuple[int, int]],
) -> Layout | str:
    """The layout of an output of shape ``[B, *raw_shape]``, or why it has none (a one-line reason).

    Args:
        layer: the module's name.
        raw_shape: the output's shape without the batch.
        hint: ``"first"``/``"last"`` from the last module that revealed the channel axis, if any.
        image_sizes: ``(H, W)`` of every image input (``[B, C, H, W]`` connections); empty for 1-D models.
        patch_grids: ``(h, w)`` of every patch embedding that ran.
    """
    raw_shape = tuple(int(d) for d in raw_shape)
    if len(raw_shape) == 3:
        first_ok = _matches_inputs(raw_shape[1:], image_sizes)
        last_ok = _matches_inputs(raw_shape[:2], image_sizes)
        if image_sizes and last_ok and (not first_ok or hint == "last"):
            return Layout(layer, "channels_last", (raw_shape[2], raw_shape[0], raw_shape[1]))
        return Layout(layer, "channels_first", raw_shape)
    if len(raw_shape) != 2:
        return f"layer {layer!r}: output of shape {raw_shape} is neither [C, H, W], [N, C] nor [C, L]"
    if not image_sizes:  # a 1-D network: [C, L], or [L, C] after a per-step Linear/LayerNorm
        if hint == "last":
            return Layout(layer, "channels_last", (raw_shape[1], raw_shape[0]))
        return Layout(layer, "channels_first", raw_shape)
    tokens, channels = raw_shape
    fit = token_grid(tokens, image_sizes, patch_grids)
    if fit is None:
        return (f"layer {layer!r}: {tokens} tokens of {channels} channels (output shape {raw_shape}) fit no "
                f"h x w grid of the input {_sizes(image_sizes)} with up to {MAX_PREFIX_TOKENS} prefix tokens; "
                f"pass reshape= to CamEngine to lay it out")
    prefix, (height, width) = fit
    return Layout(layer, "tokens", (channels, height, width), prefix=prefix)


def token_grid(
    tokens: int, image_sizes: Sequence[tuple[int, int]], patch_grids: Sequence[tuple[int, int]]
) -> tuple[int, tuple[int, int]] | None:
    """``(prefix, (h, w))`` with ``tokens = prefix + h * w`` and the fewest prefix tokens, or None.

    Grids come from the patch embeddings (prefix tokens allowed) and their 2x, 4x, ... merges (no
    prefix: patch merging drops it); only a model without a patch embedding falls back to the token
    count and the aspect ratio of an input.
    """
    fits = [(tokens - h * w, (h, w)) for h, w in patch_grids if 0 <= tokens - h * w <= MAX_PREFIX_TOKENS]
    fits += [(0, (-(-h // f), -(-w // f))) for h, w in patch_grids for f in MERGE_FACTORS[1:]
             if -(-h // f) * -(-w // f) == tokens]
    if fits:
        return min(fits)
    if patch_grids:
        return None
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        grid = _aspect_grid(tokens - prefix, image_sizes)
        if grid is not None:
            return prefix, grid
    return None


def _aspect_grid(count: int, image_sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The factorisation ``h * w = count`` whose aspect ratio matches an input's exactly, if any."""
    for height_in, width_in in image_sizes:
        for h in range(1, int(math.isqrt(count)) + 1):
            for grid in {(h, count // h), (count // h, h)}:
                if grid[0] * grid[1] == count and grid[0] * width_in == grid[1] * height_in:
                    return grid
    return None


def _matches_inputs(grid: Sequence[int], image_sizes: Sequence[tuple[int, int]]) -> bool:
    """Whether ``grid = (h, w)`` is an input's ``(H, W)`` downsampled by about the same stride on both axes."""
    h, w = grid
    return any(abs(math.log((height / h) / (width / w))) < ASPECT_TOLERANCE for height, width in image_sizes)


def _sizes(image_sizes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in image_sizes) or "(none)"


def custom_layout(layer: str, reshape: Reshape, output: torch.Tensor) -> Layout | None:
    """The layout a user's ``reshape`` gives ``layer`` (None when it returns None for this layer)."""
    result = reshape(layer, output)
    if result is None:
        return None
    if not isinstance(result, torch.Tensor) or result.dim() not in (3, 4) or result.shape[0] != output.shape[0]:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise ValueError(f"reshape() of layer {layer!r} returned {got} for an output of shape {tuple(output.shape)}; "
                         f"expected [B, C, h, w] or [B, C, L] with the same batch size")
    return Layout(layer, "custom", tuple(int(d) for d in result.shape[1:]), reshape=reshape)
