"""Fast, bit-exact axis permutation: ``permute(a, axes)`` is ``np.ascontiguousarray(np.transpose(a, axes))``.

NumPy copies a transposed view in the destination's order, reading one element from each of many
source lines before it comes back for the next element of each. For a large matrix those lines do
not stay in cache, and with a power-of-two row length they all fall into the same few cache sets:
``np.ascontiguousarray(a.T)`` of a 16384 x 16384 float32 matrix runs at 0.15-0.5 GB/s. ``permute``:

1. views the elements as unsigned integers (or raw bytes) of the same size, so that no value is
   ever converted: the copy is bit-exact for every dtype (bfloat16, float8, NaN payloads...);
2. reduces the problem: drops size-1 axes and merges neighbouring axes that are one run in the
   source, so that ``[O, I, H, W] -> [H, W, I, O]`` becomes ``[O, I, HW] -> [HW, I, O]`` and
   ``[out, in] -> [in, out]`` stays 2-D; a short run that stays last becomes one wider element;
3. when NumPy's own order would miss the cache (``_tiling_pays``): a matrix (a Linear kernel, the
   common case) is copied tile by tile through a scratch buffer whose rows do not fall into the same
   cache sets, as a power-of-two row length makes the source's do (``_copy_by_tiles``); other
   permutations are copied in blocks of about L2's size, each a short run of the destination's last
   axis by a stretch of the source read in its memory order (``_axis_blocks``), 1- and 2-byte
   elements first gathered into 8-byte words (``_copy_in_words``), since NumPy takes about as long
   per element whatever its size;
4. shares the blocks out between threads (NumPy releases the GIL while it copies), each thread
   writing its own part of the destination.

The constants below were chosen by measurement (``benchmarks/bench_transpose.py``, whose docstring
has the figures).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import EllipsisType
from typing import TypeVar

import numpy as np

_CACHE_LINE = 64
# Destination elements per row of a block: each is read from its own source line, and those lines
# must stay in L1 until the next rows read the rest of them. One cache line when they would crowd
# into a few of L1's sets (their stride is a multiple of _CROWDED_STRIDE: a power-of-two
# row length, the common case) and for elements moved in words; else 8 lines, which pays NumPy's
# per-row overhead once per 512 bytes: measured 1.2-1.6x faster there, 1.3x slower when crowded.
_RUN_BYTES = 64
_LONG_RUN_BYTES = 512
_CROWDED_STRIDE = 1024
# Source lines that L1 (32 KiB here) holds at once, when they are not crowded.
_L1_LINES = 512
# Bytes per block: about what L2 holds. Measured against 128 KiB to 2 MiB: 1- and 2-byte elements
# gain up to 20% from 256 KiB to 1 MiB, 4- and 8-byte ones do not care.
_BLOCK_BYTES = 1024 * 1024
# A tile of a matrix transpose (``_copy_by_tiles``): this many source rows for elements of 4 bytes
# or more, more for smaller ones (a tile's rows in the destination at least 256 bytes long), each
# _TILE_ROW_BYTES long. Measured against 32 and 128 rows and 1-16 KiB: best or within 15%.
_TILE_ROWS = 64
_TILE_ROW_BYTES = 4096
# Below this a second thread is not worth its start and join (about 0.2 ms) and the risk of waiting
# for a core that another process holds.
_THREAD_MIN_BYTES = 16 * 1024 * 1024
# 1- and 2-byte elements are moved as words of this many bytes (NumPy spends about as long per
# element whatever its size): 2x faster for bfloat16 than element by element.
_WORD = 8

Block = tuple[slice | EllipsisType, ...]  # a 0-d array's one block is (...,)
_Share = TypeVar("_Share")  # one thread's part of a copy


def permute(
    array: np.ndarray, axes: Sequence[int], *, out: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """``np.ascontiguousarray(np.transpose(array, axes))``, bit for bit, cache-blocked and threaded.

    Always returns ``out`` or a new C-contiguous array, never a view of ``array``, so the caller
    owns the result even for the identity permutation. A 0-d input gives a 0-d result (where
    ``np.ascontiguousarray`` would make it 1-d). ``out`` (C-contiguous, writable, the result's shape
    and exactly ``array``'s dtype, not overlapping ``array``; a writable ``np.memmap`` works)
    receives the result. ``threads`` (default ``min(2, os.cpu_count())``) are used only when the
    array is large enough for them to pay. Any dtype: the bytes of each element are copied as an
    integer of the same size, never converted; object arrays are copied by NumPy itself.

    >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> permute(a, (1, 0)).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    >>> w = np.arange(24).reshape(4, 3, 1, 2)          # conv [O, I, H, W] -> Flax [H, W, I, O]
    >>> np.array_equal(permute(w, (2, 3, 1, 0)), np.transpose(w, (2, 3, 1, 0)))
    True
    >>> permute(a, (0, 0))
    Traceback (most recent call last):
    ...
    ValueError: axes (0, 0) is not a permutation of range(2), the axes of a 2-d array
    """
    array = np.asarray(array)
    view = array.transpose(_checked_axes(axes, array.ndim))
    out = _checked_out(out, view, array) if out is not None else np.empty(view.shape, array.dtype)
    threads = _checked_threads(threads)
    if view.size == 0:
        return out
    if array.dtype.hasobject:  # references: NumPy must copy them itself, to count them
        out[...] = view
        return out
    src, dst = _reduced(_as_bits(view), _as_bits(out))
    tiled = _tiling_pays(src)
    threads = threads if dst.nbytes >= _THREAD_MIN_BYTES else 1
    if tiled and src.ndim == 2:  # a matrix transpose (a Linear kernel): the common case
        _in_threads(functools.partial(_copy_by_tiles, src, dst), [[part] for part in _split(src.shape[1], threads)])
    else:
        per_axis = _axis_blocks(src.shape, src.strides, src.itemsize) if tiled else [[slice(None)]] * src.ndim
        _in_threads(
            functools.partial(_copy_blocks, src, dst, in_words=tiled and _in_words(src.itemsize)),
            _blocks(src.shape, per_axis, threads),
        )
    return out


def _in_threads(copy: Callable[[_Share], None], shares: Sequence[_Share]) -> None:
    """``copy(share)`` for each thread's share of the work; in this thread when there is one share."""
    if len(shares) == 1:
        copy(shares[0])
    else:
        with ThreadPoolExecutor(len(shares)) as pool:
            list(pool.map(copy, shares))


def _checked_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``axes`` as a tuple of ints, or ValueError when it is not a permutation of ``range(ndim)``."""
    try:
        checked = tuple(operator.index(axis) for axis in axes)
    except TypeError:
        checked = None
    if checked is None or sorted(checked) != list(range(ndim)):
        shown = tuple(axes) if isinstance(axes, list) else axes
        raise ValueError(f"axes {shown!r} is not a permutation of range({ndim}), the axes of a {ndim}-d array")
    return checked


def _checked_out(out: np.ndarray, view: np.ndarray, array: np.ndarray) -> np.ndarray:
    """``out`` if it can receive ``view`` (shape, dtype, C-contiguous, writable, separate), else ValueError."""
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != view.shape:
        raise ValueError(f"out has shape {out.shape}, expected {view.shape}")
    if out.dtype != array.dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {array.dtype} (no conversion is done)")
    if not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous, got strides {out.strides} for shape {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only, expected a writable array")
    if out.size and np.may_share_memory(out, array):
        raise ValueError("out overlaps the input array, expected separate memory")
    return out


def _checked_threads(threads: int | None) -> int:
    """``threads``, or the default ``min(2, os.cpu_count())``; ValueError unless a positive int."""
    if threads is None:
        return min(2, os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def _bits_dtype(itemsize: int) -> np.dtype:
    """An unsigned integer of ``itemsize`` bytes, or raw bytes where there is none: copied, never converted."""
    return np.dtype(f"u{itemsize}") if itemsize in (1, 2, 4, 8) else np.dtype((np.void, itemsize))


def _as_bits(array: np.ndarray) -> np.ndarray:
    """The same memory with elements of ``_bits_dtype`` (same itemsize, so any strides are fine)."""
    return array.view(_bits_dtype(array.itemsize))


def _merged_axes(shape: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(size, source stride) per axis, size-1 axes dropped, neighbours that form one source run merged.

    The destination is C-contiguous, so any two neighbouring axes are one run there; they are one
    run in the source when the outer stride is the inner stride times the inner size.

    >>> w = np.zeros((4, 3, 2, 2), np.float32).transpose(2, 3, 1, 0)   # [O, I, H, W] -> [H, W, I, O]
    >>> _merged_axes(w.shape, w.strides)                                # [HW, I, O]
    [(4, 4), (3, 16), (4, 48)]
    """
    axes: list[tuple[int, int]] = []
    for size, stride in zip(shape, strides, strict=True):
        if size == 1:
            continue
        if axes and axes[-1][1] == size * stride:
            axes[-1] = (axes[-1][0] * size, stride)
        else:
            axes.append((size, stride))
    return axes


def _reduced(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of ``src`` and C-contiguous ``dst`` (same shape) with the fewest axes; a short run that is
    contiguous in both (shorter than a cache line) becomes one wider element."""
    axes = _merged_axes(src.shape, src.strides)
    shape = tuple(size for size, _ in axes)
    src = np.lib.stride_tricks.as_strided(src, shape, tuple(stride for _, stride in axes), writeable=False)
    dst = dst.reshape(shape)
    if axes and axes[-1][1] == src.itemsize and axes[-1][0] * src.itemsize < _CACHE_LINE:
        wide = _bits_dtype(axes[-1][0] * src.itemsize)
        src, dst = src.view(wide)[..., 0], dst.view(wide)[..., 0]
    return src, dst


def _split(size: int, parts: int) -> list[slice]:
    """``range(size)`` as up to ``parts`` contiguous slices of near-equal length."""
    bounds = sorted({size * k // parts for k in range(parts + 1)})
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


def _chunks(size: int, step: int) -> list[slice]:
    """``range(size)`` in slices of ``step``."""
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def _tiling_pays(src: np.ndarray) -> bool:
    """Whether to copy in blocks rather than in one NumPy call.

    NumPy reads the source in the destination's order: one element from each of many source lines,
    then the next element of each, and so on. That is cache-friendly when those lines fit L1 (at most
    ``_L1_LINES`` of them, not crowded into a few sets) or the source they span fits L2 (a batch of
    small transposes), not for a large matrix.

    >>> _tiling_pays(np.zeros((2000, 2000), np.float32).T), _tiling_pays(np.zeros((64, 128, 128)).transpose(0, 2, 1))
    (True, False)
    """
    if src.ndim < 2:
        return False
    contiguous = min(range(src.ndim), key=lambda axis: abs(src.strides[axis]))
    inner = range(contiguous + 1, src.ndim)
    lines = math.prod(src.shape[axis] for axis in inner)
    span = sum((src.shape[axis] - 1) * abs(src.strides[axis]) for axis in inner)
    fits_l1 = lines <= _L1_LINES and not _crowded(src.strides[-1])
    return not fits_l1 and span > _BLOCK_BYTES


def _crowded(stride: int) -> bool:
    """Whether source lines this far apart fall into a few of L1's sets (a power-of-two row length)."""
    return abs(stride) % _CROWDED_STRIDE == 0


def _axis_blocks(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> list[list[slice]]:
    """The slices each axis is cut into, so that a block holds at most ``_BLOCK_BYTES``.

    The destination's last axis goes in runs of ``_RUN_BYTES``; the other axes, in the source's
    memory order (smallest stride first), get the largest extents that fit. So per index of the last
    axis a block reads one stretch of the source, as contiguous as it can be, and a line read for one
    destination row is still cached when the next rows read the rest of it. Budget left over (the
    other axes are short) lengthens the runs, so that blocks are never tiny.

    >>> w = np.zeros((64, 4096, 3, 3), np.float32).transpose(2, 3, 1, 0).reshape(9, 4096, 64)
    >>> [[(s.start, s.stop) for s in axis] for axis in _axis_blocks(w.shape, w.strides, 4)]
    [[(0, 9)], [(0, 1820), (1820, 3640), (3640, 4096)], [(0, 16), (16, 32), (32, 48), (48, 64)]]
    """
    short = _crowded(strides[-1]) or _in_words(itemsize)
    run = max(1, (_RUN_BYTES if short else _LONG_RUN_BYTES) // itemsize)
    budget = max(1, _BLOCK_BYTES // (run * itemsize))
    per_axis = [[slice(None)] for _ in shape]
    for axis in sorted(range(len(shape) - 1), key=lambda axis: abs(strides[axis])):
        extent = min(shape[axis], budget)
        per_axis[axis] = _chunks(shape[axis], extent)
        budget = max(1, budget // extent)
    per_axis[-1] = _chunks(shape[-1], run * budget)
    return per_axis


def _blocks(shape: Sequence[int], per_axis: list[list[slice]], threads: int) -> list[list[Block]]:
    """All combinations of the axes' slices (the last axis varying fastest, so that consecutive blocks
    write neighbouring lines of the same destination rows), one list per thread.

    The threads share out the axis (but the last) cut into the most slices, or else the longest,
    recut into equal parts, the same number for each thread: each thread then reads and writes its
    own part of both arrays.

    >>> [[(b[1].start, b[2].start) for b in blocks] for blocks in _blocks((9, 2048, 64), [[slice(0, 9)], \
[slice(0, 1820), slice(1820, 2048)], [slice(0, 32), slice(32, 64)]], 2)]
    [[(0, 0), (0, 32)], [(1024, 0), (1024, 32)]]
    """
    if not shape:
        return [[(Ellipsis,)]]
    shared = max(range(max(1, len(shape) - 1)), key=lambda axis: (len(per_axis[axis]), shape[axis]))
    slices = _split(shape[shared], threads * -(-len(per_axis[shared]) // threads))
    groups = [slices[k * len(slices) // threads : (k + 1) * len(slices) // threads] for k in range(threads)]
    return [list(itertools.product(*per_axis[:shared], group, *per_axis[shared + 1 :])) for group in groups if group]


def _copy_blocks(src: np.ndarray, dst: np.ndarray, blocks: list[Block], in_words: bool = False) -> None:
    """``dst[block] = src[block]`` for each block, in order (NumPy releases the GIL in each copy);
    with ``in_words``, blocks of whole words go through ``_copy_in_words``."""
    scratch = np.empty(0, src.dtype)
    for block in blocks:
        target = dst[block]
        if in_words and target.shape[-1] * src.itemsize % _WORD == 0:
            if scratch.size < target.size:
                scratch = np.empty(target.size, src.dtype)
            _copy_in_words(src[block], target, scratch)
        else:
            target[...] = src[block]


def _copy_by_tiles(src: np.ndarray, dst: np.ndarray, columns: list[slice]) -> None:
    """``dst[:, c] = src[:, c]`` for each slice ``c``, where ``src`` is a matrix stored column by column
    (a transposed view): tile by tile, each tile first copied row by row from the source's memory into
    a scratch buffer whose rows are one cache line longer than the tile's, then from there to ``dst``.

    The source rows of a tile are a power of two apart in the usual case, so they all fall into the
    same few sets of L1 and evict each other while the transpose reads them one element at a time;
    the scratch rows do not. Tiles go down the destination's rows before across them, so that the
    rows a tile writes (4 KiB of source row: as many destination rows) are written again by the next
    tile while still cached. Measured 3.3-7.5 GB/s on one core for float32 matrices 1024 to 16384
    wide, where reading the source directly (``_copy_blocks``) runs at 1.2-2.3 GB/s.

    >>> a = np.arange(12, dtype=np.uint32).reshape(3, 4); dst = np.empty((4, 3), np.uint32)
    >>> _copy_by_tiles(a.T, dst, [slice(0, 3)]); dst.tolist() == a.T.tolist()
    True
    """
    rows = src.T  # the source's memory order: each row is one column of src
    height = _TILE_ROWS * max(1, 4 // src.itemsize)
    width = max(1, min(rows.shape[1], _TILE_ROW_BYTES // src.itemsize))
    scratch = np.empty((height, width + max(1, _CACHE_LINE // src.itemsize)), src.dtype)
    for part in columns:
        for j in range(0, rows.shape[1], width):
            w = min(width, rows.shape[1] - j)
            for i in range(part.start, part.stop, height):
                tile = scratch[: min(height, part.stop - i), :w]
                tile[...] = rows[i : i + tile.shape[0], j : j + w]
                dst[j : j + w, i : i + tile.shape[0]] = tile.T


def _in_words(itemsize: int) -> bool:
    """Whether blocks of these elements are moved as ``_WORD``-byte words."""
    return itemsize in (1, 2)


def _copy_in_words(src: np.ndarray, dst: np.ndarray, scratch: np.ndarray) -> None:
    """``dst[...] = src`` for small elements, with a last axis of a multiple of ``_WORD`` bytes, moving
    ``_WORD``-byte words: first the ``k`` source elements of each destination word are gathered side
    by side in ``scratch`` (reading the source in its memory order), then the words are copied.

    >>> a, dst = np.arange(12, dtype=np.uint16).reshape(4, 3), np.empty((3, 4), np.uint16)
    >>> _copy_in_words(a.T, dst, np.empty(12, np.uint16)); dst.tolist()     # one word per row
    [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    """
    k = _WORD // src.itemsize
    src = src.reshape(*src.shape[:-1], src.shape[-1] // k, k)  # splitting an axis: a view
    order = sorted(range(src.ndim - 1), key=lambda axis: -abs(src.strides[axis]))
    gathered = scratch[: src.size].reshape([src.shape[axis] for axis in order] + [k])
    back = [int(position) for position in np.argsort(order)]
    in_dst_order = gathered.transpose(*back, len(order))
    for lane in range(k):
        in_dst_order[..., lane] = src[..., lane]
    word = np.dtype(f"u{_WORD}")
    dst.view(word)[...] = gathered.view(word)[..., 0].transpose(*back)
