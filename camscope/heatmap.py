"""Turning raw CAM maps into stored bytes and into pictures.

Storage: a raw map is quantized to uint8 with a float32 ``scale`` (the raw value that 255 stands
for), about one byte per pixel. Pictures: upsample to the input's resolution, colour, overlay.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def quantize(raw: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
    """Quantize a raw map (>= 0) to ``(uint8 array of the same shape, scale)``.

    ``scale`` is the map's maximum: ``dequantize`` gives back the map to within scale / 510.
    An all-zero map has scale 0.
    """
    values = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(values.max(initial=0.0))
    if scale <= 0:
        return np.zeros(values.shape, dtype=np.uint8), 0.0
    return np.rint(np.clip(values, 0, None) * (255.0 / scale)).astype(np.uint8), scale


def dequantize(data: np.ndarray | bytes, scale: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of :func:`quantize`: float32 map from uint8 values (or their bytes) and ``scale``."""
    values = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    values = values.astype(np.float32) * (float(scale) / 255.0)
    return values.reshape(shape) if shape is not None else values


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map to ``size = (height, width)``; keeps the dtype's range."""
    tensor = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return resized


def normalize(heat: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its maximum (an all-zero map stays zero)."""
    heat = np.asarray(heat, dtype=np.float32)
    peak = float(heat.max(initial=0.0))
    return heat / peak if peak > 0 else np.zeros_like(heat)


@lru_cache(maxsize=8)
def _lut(colormap: str) -> np.ndarray:
    from matplotlib import colormaps  # imported lazily: only pictures need it

    return (colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def colorize(heat: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` picture of a map in [0, 1] (or uint8 0..255)."""
    heat = np.asarray(heat)
    index = heat if heat.dtype == np.uint8 else np.rint(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    return _lut(colormap)[index]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) or (C, H, W) image, float in [0, 1] or uint8, as RGB uint8."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """The input with a heatmap blended over it, as a PIL image at the input's resolution.

    Args:
        image: the input picture (see :func:`to_rgb` for accepted layouts).
        heat: a raw or normalised 2-D map at any resolution; it is upsampled and scaled to [0, 1].
        alpha: heatmap opacity in [0, 1].
    """
    rgb = to_rgb(image)
    heat01 = normalize(upsample(np.asarray(heat, dtype=np.float32), rgb.shape[:2]))
    coloured = colorize(heat01, colormap).astype(np.float32)
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * coloured
    return Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8))
