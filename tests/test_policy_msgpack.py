"""msgpack-numpy codec: raw-bytes arrays, openpi-compatible layout, no pickle, strict decoding."""
import msgpack
import numpy as np
import pytest

from selfflow_robot.policies import msgpack_numpy as mn


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_])
def test_roundtrip_dtypes(dtype):
    x = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    y = mn.unpackb(mn.packb({"x": x, "s": np.float32(1.5), "n": [1, "a"]}))
    assert y["x"].dtype == x.dtype and y["x"].shape == x.shape and np.array_equal(y["x"], x)
    assert y["s"] == np.float32(1.5) and y["s"].dtype == np.float32 and y["n"] == [1, "a"]


def test_layout_is_openpi_raw_bytes():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(mn.packb(x), raw=False)
    assert raw == {b"__ndarray__": True, b"data": x.tobytes(), b"dtype": "<f4", b"shape": [2, 3]}


def test_non_contiguous_and_big_endian():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert np.array_equal(mn.unpackb(mn.packb(x)), x)
    b = np.arange(3, dtype=">i4")
    assert np.array_equal(mn.unpackb(mn.packb(b)), [0, 1, 2])


@pytest.mark.parametrize("arr", [np.array([object()], dtype=object), np.zeros(2, np.complex64),
                                 np.zeros(2, dtype=[("a", "<i4")]), np.zeros(2, "V4"),
                                 np.array(["ab"]), np.zeros(2, "datetime64[s]")])
def test_pack_rejects_unsafe_dtypes(arr):
    with pytest.raises((ValueError, TypeError)):
        mn.packb(arr)


def test_pack_rejects_arbitrary_objects():
    with pytest.raises(TypeError):
        mn.packb({"f": object()})


def _tagged(data, dtype, shape):
    return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}, use_bin_type=True)


@pytest.mark.parametrize("msg", [
    _tagged(b"\0" * 8, "|O", [1]),            # object dtype would mean pointers
    _tagged(b"\0" * 8, "<c8", [1]),
    _tagged(b"\0" * 8, "V8", [1]),
    _tagged(b"\0" * 8, "i4,i4", [1]),         # structured
    _tagged(b"\0" * 8, "not-a-dtype", [1]),
    _tagged(b"\0" * 7, "<f4", [2]),           # byte count does not match
    _tagged(b"\0" * 8, "<f4", [-2]),
    _tagged(b"\0" * 8, "<f4", "2"),
    _tagged("text", "<f4", [1]),
    _tagged(b"\0" * 8, 5, [2]),
])
def test_unpack_rejects_malformed_arrays(msg):
    with pytest.raises(ValueError):
        mn.unpackb(msg)


def test_unpacked_array_is_read_only_view():
    y = mn.unpackb(mn.packb(np.zeros(3, np.float32)))
    assert not y.flags.writeable  # callers copy before mutating; the message buffer is never changed
