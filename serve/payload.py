"""What travels in request and reply bodies: base64 ``.npy`` inputs in, base64 uint8 maps out."""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import torch

from camscope.heatmap import quantize
from serve.errors import BadRequest

NPY_MAGIC = b"\x93NUMPY"


def decode_npy(text: str, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """One connection's input from base64 ``.npy`` text, as an array of ``shape`` ready for a model of ``dtype``.

    The order keeps memory and the batch safe: the ``.npy`` header (dtype, shape) is checked before any
    array is allocated, the data must be exactly as long as the header says, and finiteness is checked
    after the cast to the model's dtype (``1e300`` is finite as float64, not as float32). A leading batch
    axis of 1 is accepted. The array travels as float32 (float64 for a float64 model). Raises BadRequest
    for anything else: not base64, not an ``.npy`` file, pickled objects, a non-float dtype, another
    shape, values that are NaN or infinite in the model's dtype.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"inputs.{name}: not valid base64") from None
    stored_dtype, stored_shape, fortran, offset = _npy_header(raw, name)
    if stored_dtype.kind != "f":
        raise BadRequest(f"inputs.{name}: dtype {stored_dtype} is not a float type (float16/32/64 expected)")
    if len(stored_shape) == len(shape) + 1 and stored_shape[:1] == (1,):
        stored_shape = stored_shape[1:]
    if tuple(stored_shape) != tuple(shape):
        raise BadRequest(f"inputs.{name}: shape {tuple(stored_shape)} does not match the connection's {tuple(shape)}")
    expected = int(np.prod(stored_shape, dtype=np.int64)) * stored_dtype.itemsize
    if len(raw) - offset != expected:
        raise BadRequest(f"inputs.{name}: .npy data is {len(raw) - offset} bytes, its header promises {expected}")
    array = np.frombuffer(raw, dtype=stored_dtype, offset=offset).reshape(stored_shape, order="F" if fortran else "C")
    wire = np.float64 if dtype == torch.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(array, dtype=wire, order="C")  # a writable copy, off the request's buffer
    if not bool(torch.from_numpy(array).to(dtype).isfinite().all()):
        raise BadRequest(f"inputs.{name}: contains values that are NaN or infinite as {str(dtype).removeprefix('torch.')}")
    return array


def _npy_header(raw: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, data offset) of an ``.npy`` file, read without touching its data."""
    if not raw.startswith(NPY_MAGIC):
        raise BadRequest(f"inputs.{name}: not a .npy file (base64 of numpy.save output expected)")
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
        shape, fortran, dtype = readers[version](stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadRequest(f"inputs.{name}: unreadable .npy ({reason})") from None
    if dtype.hasobject:
        raise BadRequest(f"inputs.{name}: pickled objects are not accepted")
    return dtype, tuple(int(n) for n in shape), bool(fortran), stream.tell()


def encode_npy(array: np.ndarray) -> str:
    """Base64 ``.npy`` text of an array (what a client sends as an input)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_map(raw: np.ndarray) -> tuple[str, float]:
    """A raw 2-D map as (base64 of its row-major uint8 quantization, scale)."""
    values, scale = quantize(raw)
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii"), scale


def encode_bytes(data: bytes) -> str:
    """Base64 text of already quantized map bytes (from the store)."""
    return base64.b64encode(bytes(data)).decode("ascii")


def decode_map(text: str, scale: float, height: int, width: int) -> np.ndarray:
    """Inverse of the reply encoding: the dequantized float32 map ``(height, width)``."""
    values = np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(height, width)
    return values.astype(np.float32) * (float(scale) / 255.0)


def decode_binary_reply(data: bytes) -> dict:
    """A binary /v1/analyze reply (``Accept: application/octet-stream``) as the JSON reply's dict, with
    each map's ``heatmap`` as uint8 bytes instead of base64 text."""
    size = int.from_bytes(data[:4], "little")
    reply = json.loads(data[4:4 + size])
    maps = memoryview(data)[4 + size:]
    for record in reply["maps"]:
        start = record.pop("offset")
        record["heatmap"] = bytes(maps[start:start + record.pop("length")])
    return reply
