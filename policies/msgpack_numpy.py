"""msgpack with numpy arrays as raw bytes + dtype + shape (openpi wire format). Never pickle.

An array travels as `{b"__ndarray__": True, b"data": <bytes>, b"dtype": "<f4", b"shape": [..]}`
(numpy scalars as `b"__npgeneric__"`), which is byte-compatible with openpi-client. Only
bool / int / uint / float dtypes are accepted in either direction: object, void (structured),
complex, datetime and string dtypes are refused, so a message can never smuggle code or
ambiguous memory layouts. Decoding checks that the byte count matches dtype x shape.
Depends only on numpy (>=1.24) and msgpack, so robot computers can use it.
"""
from __future__ import annotations

import functools

import msgpack
import numpy as np

ALLOWED_KINDS = frozenset("biuf")  # bool, int, uint, float
MAX_NDIM = 32


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"unsupported array dtype {dtype.str!r}: only bool/int/uint/float are allowed")
    return dtype


def pack_array(obj):
    """msgpack `default` hook: numpy arrays and scalars -> tagged dicts."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(),
                b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialise object of type {type(obj).__name__}")


def _parse_dtype(raw) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "strict")
    if not isinstance(raw, str) or len(raw) > 8:
        raise ValueError("array dtype must be a short string like '<f4'")
    try:
        dtype = np.dtype(raw)
    except TypeError as e:
        raise ValueError(f"invalid array dtype {raw!r}") from e
    return _check_dtype(dtype)


def unpack_array(obj: dict):
    """msgpack `object_hook`: tagged dicts -> numpy arrays (read-only views of the message)."""
    if b"__ndarray__" in obj:
        dtype = _parse_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(data, bytes) or not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM \
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError("malformed array: need bytes data and a list of non-negative int shape")
        count = functools.reduce(lambda a, b: a * b, shape, 1)
        if count * dtype.itemsize != len(data):
            raise ValueError(f"array data has {len(data)} bytes, dtype {dtype.str} x shape {list(shape)} "
                             f"needs {count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _parse_dtype(obj.get(b"dtype"))
        data = obj.get(b"data")
        if isinstance(data, (dict, list, bytes, str)) or data is None:
            raise ValueError("malformed numpy scalar")
        return dtype.type(data)
    return obj


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=pack_array, use_bin_type=True)


def unpackb(data: bytes):
    """Decode one message. Raises ValueError (or a msgpack error) on anything malformed."""
    return msgpack.unpackb(data, object_hook=unpack_array, raw=False, strict_map_key=True)


class Packer:
    """Reusable packer (avoids re-creating the C packer for every message)."""

    def __init__(self):
        self._packer = msgpack.Packer(default=pack_array, use_bin_type=True)

    def pack(self, obj) -> bytes:
        return self._packer.pack(obj)
