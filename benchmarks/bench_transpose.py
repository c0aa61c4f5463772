#!/usr/bin/env python
"""Benchmark ``optstate.converters.layout.transpose.permute`` against NumPy's transpose copy and a plain copy.

For each case (a 2-D float32 matrix of 1 GiB, a 2-D bfloat16 matrix of 512 MiB, a conv kernel
``[O, I, H, W] -> [H, W, I, O]`` in float32; ``--cases`` picks) it times, round-robin, ``--repeats``
times each, in one process:

- ``np.copy``             a plain copy into a new array: the memcpy baseline, page faults included;
- ``np.copyto``           a plain copy into an existing array: memcpy without page faults;
- ``ascontiguousarray``   ``np.ascontiguousarray(np.transpose(a, axes))``: NumPy's transpose copy;
- ``permute t=1``/``t=2`` ``permute(a, axes, threads=1 or 2)`` into a new array;
- ``permute t=2 out=``    ``permute(a, axes, threads=2, out=existing)`` (as into a mapped output file).

It prints GB/s (bytes read / median wall seconds, 1 GB = 1e9 B), the min-max range, the ratio to
``np.copy`` and to ``ascontiguousarray`` of the same run, and GB per CPU second of the process (all
threads; on a shared machine, a two-thread run whose wall time is not well below its CPU time did
not get both cores). It checks every result bit for bit against NumPy. One untimed round comes
first, to warm the allocator up. About 2 minutes and 6 GB of memory for the default cases.

``--sweep`` instead times ``permute`` with one thread into an existing array for each block shape
(run bytes, for crowded and other strides alike, x ``_BLOCK_BYTES``) and element size, in CPU seconds of the thread
(``time.thread_time``: less sensitive to other processes on a shared machine than wall time).

Figures (one run of the default cases, median of 3; the project's shared 2-core AMD EPYC VM, 24 GiB,
Python 3.11, NumPy 2.4.6, with other sessions running: while they run, the two-thread figures fall
towards the one-thread ones):

| case | ``ascontiguousarray`` | ``permute`` t=1 | t=2 | t=2 ``out=`` | ``np.copyto`` |
|---|---|---|---|---|---|
| f32 16384 x 16384 (1.07 GB) | 0.22 | 1.77 | 3.44 (15.7x) | 2.67 (12.1x) | 5.77 |
| bf16 16384 x 16384 (0.54 GB) | 0.26 | 1.42 | 2.50 (9.6x) | 2.60 (10.0x) | 7.87 |
| f32 conv [2048, 2048, 3, 3] -> [3, 3, 2048, 2048] | 0.40 | 1.27 | 2.29 (5.7x) | 2.48 (6.2x) | 8.69 |

(GB/s of bytes read; in brackets the ratio to ``ascontiguousarray`` of the same run.) Matrices go
through ``_copy_by_tiles`` (a padded scratch tile between source and destination); on the sizes
of a transformer's kernels, one thread, it runs at 6-7.5 GB/s for 1024 x 1024 float32 and 3-4 GB/s
for 4096 x 1024 (NumPy's ``a.T`` copy: 1.2 and 0.6 GB/s; the blocked copy that other permutations
take: 1.3 and 1.2-1.9 GB/s). The blocked copy is bound by NumPy's strided copy loop, about 1 ns
per element however small (so 1- and 2-byte elements are moved as 8-byte words); two threads give
1.6-2x; a new output adds its page faults (t=2 against t=2 ``out=``). ``--sweep`` chose the run
and block sizes of the blocked copy; NumPy's own order is kept where it is as fast (a batch of
small transposes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

from optstate.converters.layout import transpose
from optstate.converters.layout.transpose import permute

CASES = {
    "f32-2d": ((16384, 16384), np.float32, (1, 0)),
    "bf16-2d": ((16384, 16384), ml_dtypes.bfloat16, (1, 0)),
    "f32-conv": ((2048, 2048, 3, 3), np.float32, (2, 3, 1, 0)),
    "bf16-mlp": ((11008, 4096), ml_dtypes.bfloat16, (1, 0)),
    "f64-conv3d": ((256, 256, 3, 3, 3), np.float64, (2, 3, 4, 1, 0)),
}


def random_array(shape, dtype) -> np.ndarray:
    """Random bits (not random values: fast to make, and NaN payloads are part of what must survive)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    words = np.random.default_rng(0).integers(0, 2**63, size=-(-count * dtype.itemsize // 8), dtype=np.uint64)
    return words.view(np.uint8)[: count * dtype.itemsize].view(dtype).reshape(shape)


def timed(function) -> tuple[float, float, np.ndarray]:
    """Wall seconds, CPU seconds of the whole process (all threads) and the result of ``function()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_case(name: str, repeats: int, naive: bool) -> None:
    shape, dtype, axes = CASES[name]
    array = random_array(shape, dtype)
    expected_shape = np.transpose(array, axes).shape
    out = np.ones(expected_shape, array.dtype)  # touched once: no page faults when reused
    flat_out = np.ones(array.shape, array.dtype)
    paths = {
        "np.copy": lambda: array.copy(),
        "np.copyto": lambda: np.copyto(flat_out, array),
        "ascontiguousarray": lambda: np.ascontiguousarray(np.transpose(array, axes)),
        "permute t=1": lambda: permute(array, axes, threads=1),
        "permute t=2": lambda: permute(array, axes, threads=2),
        "permute t=2 out=": lambda: permute(array, axes, threads=2, out=out),
    }
    if not naive:
        del paths["ascontiguousarray"]
    expected = np.ascontiguousarray(np.transpose(array, axes)).view(f"u{array.itemsize}")
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    cpu_seconds: dict[str, list[float]] = {path: [] for path in paths}
    for repeat in range(repeats + 1):  # the first round warms the allocator and the page cache up
        for path, function in paths.items():
            elapsed, cpu, result = timed(function)
            if repeat:
                seconds[path].append(elapsed)
                cpu_seconds[path].append(cpu)
            if path.startswith("permute"):
                assert np.array_equal(result.view(expected.dtype), expected), f"{path} differs from NumPy"
            del result
    gbps = {path: array.nbytes / statistics.median(times) / 1e9 for path, times in seconds.items()}
    print(f"\n{name}: {shape} {np.dtype(dtype).name} axes {axes}, {array.nbytes / 1e9:.2f} GB, median of {repeats}")
    print(f"{'path':<20} {'GB/s':>6} {'min-max GB/s':>14} {'x np.copy':>9} {'x ascontig':>10} {'GB/CPU-s':>9}")
    for path, times in seconds.items():
        spread = f"{array.nbytes / max(times) / 1e9:.2f}-{array.nbytes / min(times) / 1e9:.2f}"
        versus_naive = f"{gbps[path] / gbps['ascontiguousarray']:.1f}" if naive else "-"
        per_cpu = array.nbytes / statistics.median(cpu_seconds[path]) / 1e9
        print(
            f"{path:<20} {gbps[path]:>6.2f} {spread:>14} {gbps[path] / gbps['np.copy']:>9.2f} {versus_naive:>10} "
            f"{per_cpu:>9.2f}"
        )


def sweep(repeats: int) -> None:
    """CPU seconds of one thread per block shape, for 1-, 2-, 4- and 8-byte elements."""
    runs, blocks = (64, 128, 512), (256 << 10, 1 << 20)
    saved = transpose._RUN_BYTES, transpose._LONG_RUN_BYTES, transpose._BLOCK_BYTES
    cases = [
        ("2d", (8192, 16384), (1, 0)),
        ("2d-odd", (8000, 12000), (1, 0)),
        ("conv", (512, 1024, 3, 3), (2, 3, 1, 0)),
    ]
    print(f"GB/s per CPU second of one thread (bytes read / thread_time), best of {repeats}")
    print(f"{'case':<8} {'itemsize':>8} {'run B':>6} " + " ".join(f"{f'block {size >> 10}K':>11}" for size in blocks))
    try:
        for label, shape, axes in cases:
            for itemsize in (1, 2, 4, 8):
                rows = (shape[0] * 4 // itemsize,) + shape[1:]
                array = random_array(rows, f"u{itemsize}")
                out = np.ones(np.transpose(array, axes).shape, array.dtype)
                for run in runs:
                    cells = []
                    for size in blocks:
                        transpose._RUN_BYTES = transpose._LONG_RUN_BYTES = run
                        transpose._BLOCK_BYTES = size
                        best = float("inf")
                        for _ in range(repeats):
                            start = time.thread_time()
                            permute(array, axes, threads=1, out=out)
                            best = min(best, time.thread_time() - start)
                        cells.append(f"{array.nbytes / best / 1e9:>11.2f}")
                    print(f"{label:<8} {itemsize:>8} {run:>6} " + " ".join(cells), flush=True)
    finally:
        transpose._RUN_BYTES, transpose._LONG_RUN_BYTES, transpose._BLOCK_BYTES = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="f32-2d,bf16-2d,f32-conv", help=f"comma-separated, of {sorted(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip np.ascontiguousarray (7 s per GB)")
    parser.add_argument("--sweep", action="store_true", help="time block shapes instead")
    args = parser.parse_args(argv)
    if args.sweep:
        sweep(args.repeats)
        return
    for name in args.cases.split(","):
        run_case(name, args.repeats, not args.no_naive)


if __name__ == "__main__":
    main()
