"""``permute`` against NumPy's own ``np.ascontiguousarray(np.transpose(a, axes))``, byte for byte."""

import contextlib
import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optstate.converters.layout import transpose
from optstate.converters.layout.transpose import permute

DTYPES = [
    np.dtype(t)
    for t in (
        np.bool_,
        np.uint8,
        ml_dtypes.float8_e4m3fn,
        np.int16,
        ml_dtypes.bfloat16,
        np.float16,
        np.float32,
        ">f4",
        np.complex64,
        np.float64,
        np.complex128,
        "V3",
        [("a", "<i2"), ("b", "u1")],
    )
]


def random_array(shape, dtype, seed=0) -> np.ndarray:
    """Random bytes as ``dtype`` (NaN payloads, subnormals, every bit pattern); bools 0 or 1."""
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    count = int(np.prod(shape))
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype, count=count).reshape(shape).copy()


def assert_permuted(result, array, axes):
    expected = np.ascontiguousarray(np.transpose(array, axes)).reshape(np.transpose(array, axes).shape)
    assert result.dtype == array.dtype
    assert result.shape == expected.shape
    assert result.flags.c_contiguous
    assert result.tobytes() == expected.tobytes()
    assert not np.shares_memory(result, array)


@contextlib.contextmanager
def tiny_blocks(run_bytes, block_bytes):
    """Block and thread even tiny arrays, so that small cases cover every edge of the blocking."""
    names = ("_THREAD_MIN_BYTES", "_L1_LINES", "_RUN_BYTES", "_LONG_RUN_BYTES", "_BLOCK_BYTES")
    saved = [getattr(transpose, name) for name in names]
    for name, value in zip(names, (0, 0, run_bytes, 2 * run_bytes, block_bytes), strict=True):
        setattr(transpose, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(transpose, name, value)


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 6))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 16, 33]), min_size=ndim, max_size=ndim))
    if np.prod(shape) > 5000:
        shape = [min(size, 4) for size in shape]
    shape = tuple(shape)
    dtype = draw(st.sampled_from(DTYPES))
    axes = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.sampled_from([1, 1, 2, -1, -2])) for _ in range(ndim))
    array = random_array(tuple(size * abs(step) for size, step in zip(shape, steps, strict=True)), dtype)
    array = array[tuple(slice(None, None, step) for step in steps)]  # non-contiguous when a step is not 1
    blocking = draw(st.sampled_from([1, 8, 64])), draw(st.sampled_from([64, 1024, 1 << 20]))
    return array, axes, draw(st.integers(1, 3)), blocking


@settings(max_examples=300, deadline=None)
@given(cases())
def test_equals_numpy_for_any_shape_dtype_permutation_and_strides(case):
    array, axes, threads, blocking = case
    assert_permuted(permute(array, axes, threads=threads), array, axes)
    with tiny_blocks(*blocking):
        assert_permuted(permute(array, axes, threads=threads), array, axes)


# Large enough for NumPy's own order to miss the cache, so that these go through the real blocks
# (runs of one line for power-of-two rows, of eight lines for the others).
@pytest.mark.parametrize("shape", [(1024, 1024), (1031, 1500), (2000, 700), (1100, 1000)])
def test_matrix_transpose_torch_linear_to_flax_dense(shape):
    weight = random_array(shape, np.dtype(np.float32))
    assert_permuted(permute(weight, (1, 0)), weight, (1, 0))


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((600, 8000), np.float32),  # rows wider than one tile; 19 MB: two threads
        ((520, 9000), ml_dtypes.float8_e4m3fn),  # 1-byte elements: taller tiles
        ((1500, 2999), np.float64),  # 36 MB: split between threads, odd sizes
        ((4099, 257), np.complex128),  # 16-byte elements
    ],
)
def test_matrix_transposes_tile_by_tile(shape, dtype):
    array = random_array(shape, np.dtype(dtype))
    for threads in (1, 2):
        assert_permuted(permute(array, (1, 0), threads=threads), array, (1, 0))
        assert_permuted(permute(array.T, (1, 0), threads=threads), array.T, (1, 0))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize(
    "shape, axes",
    [
        ((256, 256, 3, 3), (2, 3, 1, 0)),  # conv2d [O, I, H, W] -> Flax [H, W, I, O]
        ((600, 200, 7), (2, 1, 0)),  # conv1d [O, I, W] -> [W, I, O]
        ((256, 96, 3, 3, 3), (2, 3, 4, 1, 0)),  # conv3d [O, I, D, H, W] -> [D, H, W, I, O]
        ((1400, 389), (1, 0)),
        ((33, 1, 257, 1, 65), (4, 2, 1, 0, 3)),  # size-1 axes and odd sizes
        ((3, 5, 131, 257), (0, 1, 3, 2)),  # a batch of small transposes: NumPy's own order
    ],
)
def test_layout_permutations(shape, axes, dtype):
    array = random_array(shape, np.dtype(dtype))
    for threads in (1, 2):
        assert_permuted(permute(array, axes, threads=threads), array, axes)


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16, np.float32], ids=["f8", "bf16", "f32"])
def test_every_permutation_of_a_4d_array(dtype):
    array = random_array((160, 40, 30, 9), np.dtype(dtype))
    for axes in itertools.permutations(range(4)):
        assert_permuted(permute(array, axes), array, axes)


def test_threads_give_identical_bytes():
    array = random_array((2900, 2900), np.dtype(ml_dtypes.bfloat16))  # 16.8 MB: above _THREAD_MIN_BYTES
    one, two = permute(array, (1, 0), threads=1), permute(array, (1, 0), threads=2)
    assert one.tobytes() == two.tobytes()
    assert_permuted(two, array, (1, 0))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0, 3), (0,), (4, 0)])
def test_zero_size(shape):
    array = np.zeros(shape, np.float32)
    axes = tuple(reversed(range(len(shape))))
    assert_permuted(permute(array, axes), array, axes)


def test_zero_dimensional_stays_zero_dimensional():
    array = np.array(2.5, ml_dtypes.bfloat16)
    result = permute(array, ())
    assert result.shape == () and result.tobytes() == array.tobytes() and not np.shares_memory(result, array)


def test_identity_returns_a_copy_not_a_view():
    array = random_array((600, 700), np.dtype(np.float32))
    result = permute(array, (0, 1))
    assert_permuted(result, array, (0, 1))
    before = array.copy()
    result[...] = 0
    assert array.tobytes() == before.tobytes()


def test_stepped_reversed_and_unaligned_input():
    base = random_array((900, 1200), np.dtype(np.float32))
    unaligned = np.frombuffer(b"\0" + base.tobytes(), np.float32, offset=1).reshape(base.shape)
    for array in (base[::2, 1::3], base[::-1, ::-2], base[100:700, 3:1000].T, base[:, 5], unaligned):
        axes = tuple(reversed(range(array.ndim)))
        assert_permuted(permute(array, axes), array, axes)


def test_read_only_memmap_input_and_writable_memmap_out(tmp_path):
    source = random_array((640, 480), np.dtype(ml_dtypes.bfloat16))
    source.tofile(tmp_path / "in.bin")
    mapped = np.memmap(tmp_path / "in.bin", dtype=source.dtype, mode="r", shape=source.shape)
    out = np.memmap(tmp_path / "out.bin", dtype=source.dtype, mode="w+", shape=(480, 640))
    assert permute(mapped, (1, 0), out=out) is out
    out.flush()
    written = np.fromfile(tmp_path / "out.bin", dtype=source.dtype).reshape(480, 640)
    assert_permuted(written, source, (1, 0))
    assert_permuted(permute(mapped[::3, 10:], (1, 0)), mapped[::3, 10:], (1, 0))


def test_out_receives_the_result():
    array = random_array((5, 6, 7), np.dtype(np.float64))
    out = np.empty((7, 5, 6), np.float64)
    assert permute(array, (2, 0, 1), out=out) is out
    assert_permuted(out, array, (2, 0, 1))


@pytest.mark.parametrize(
    "out, message",
    [
        (np.empty((3, 4), np.float32), r"out has shape \(3, 4\), expected \(4, 3\)"),
        (np.empty((4, 3), np.float64), "out has dtype float64, expected float32"),
        (np.empty((4, 3), ">f4"), "out has dtype >f4, expected float32"),
        (np.empty((3, 4), np.float32).T, "out must be C-contiguous"),
        (np.empty((4, 6), np.float32)[:, ::2], "out must be C-contiguous"),
        (np.broadcast_to(np.zeros((4, 3), np.float32), (4, 3)), "out is read-only"),
        ([[0.0] * 3] * 4, "out must be a NumPy array, got list"),
    ],
)
def test_bad_out(out, message):
    with pytest.raises(ValueError, match=message):
        permute(np.zeros((3, 4), np.float32), (1, 0), out=out)


def test_out_overlapping_the_input():
    buffer = np.zeros(24, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        permute(buffer[:12].reshape(3, 4), (1, 0), out=buffer[6:18].reshape(4, 3))


@pytest.mark.parametrize("axes", [(0, 0, 1), (0, 1), (0, 1, 3), (1, 2, 0, 3), (0.0, 1, 2), "012", 1])
def test_bad_axes_name_axes_and_ndim(axes):
    with pytest.raises(ValueError, match=r"is not a permutation of range\(3\), the axes of a 3-d array") as caught:
        permute(np.zeros((2, 3, 4)), axes)
    assert f"axes {axes!r} " in str(caught.value)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(threads):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        permute(np.zeros((2, 3)), (1, 0), threads=threads)


def test_object_arrays_are_copied_by_numpy():
    array = np.array([[object(), "a"], [None, 3]], dtype=object)
    result = permute(array, (1, 0))
    assert all(result[j, i] is array[i, j] for i, j in itertools.product(range(2), range(2)))
