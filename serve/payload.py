"""What travels in request and reply bodies: base64 ``.npy`` inputs in, base64 uint8 maps out."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from camscope.heatmap import quantize
from serve.errors import BadRequest

NPY_MAGIC = b"\x93NUMPY"


def decode_npy(text: str, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One connection's input from base64 ``.npy`` text, as float32 ``shape`` (C, H, W).

    A leading batch axis of 1 is accepted. Raises BadRequest for anything else: not base64, not
    an ``.npy`` file, pickled objects, a non-float dtype, another shape, NaN or infinity.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"inputs.{name}: not valid base64") from None
    if not raw.startswith(NPY_MAGIC):
        raise BadRequest(f"inputs.{name}: not a .npy file (base64 of numpy.save output expected)")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadRequest(f"inputs.{name}: unreadable .npy ({str(error).splitlines()[0]})") from None
    if array.dtype.kind != "f":
        raise BadRequest(f"inputs.{name}: dtype {array.dtype} is not a float type (float16/32/64 expected)")
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(shape):
        raise BadRequest(f"inputs.{name}: shape {tuple(array.shape)} does not match the connection's {tuple(shape)}")
    if not np.isfinite(array).all():
        raise BadRequest(f"inputs.{name}: contains NaN or infinite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def encode_npy(array: np.ndarray) -> str:
    """Base64 ``.npy`` text of an array (what a client sends as an input)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_map(raw: np.ndarray) -> tuple[str, float]:
    """A raw 2-D map as (base64 of its row-major uint8 quantization, scale)."""
    values, scale = quantize(raw)
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii"), scale


def quantize_stack(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`camscope.heatmap.quantize` of each map of ``raw`` [K, h, w] at once (same arithmetic,
    same bytes): ``(uint8 [K, h, w], float32 scales [K])``. Numpy, as small maps are many."""
    values = np.nan_to_num(np.asarray(raw, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None)
    scales = values.max(axis=(-2, -1), initial=0.0)
    with np.errstate(divide="ignore"):
        factor = np.where(scales > 0, 255.0 / scales.astype(np.float64), 0.0).astype(np.float32)
    return np.rint(values * factor[:, None, None]).astype(np.uint8), scales


def encode_bytes(data: bytes) -> str:
    """Base64 text of already quantized map bytes (from the store)."""
    return base64.b64encode(bytes(data)).decode("ascii")


def decode_map(text: str, scale: float, height: int, width: int) -> np.ndarray:
    """Inverse of the reply encoding: the dequantized float32 map ``(height, width)``."""
    values = np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(height, width)
    return values.astype(np.float32) * (float(scale) / 255.0)
