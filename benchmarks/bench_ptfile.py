#!/usr/bin/env python
"""Reading a torch checkpoint without torch (``ptfile``) against ``torch.load(weights_only=True, mmap=True)``.

One run builds a synthetic Adam checkpoint (``{"model": weights, "optimizer": Adam.state_dict()}``,
float32 ``[1024, 1024]`` parameters, one step; about ``--mb`` MB) in a temporary directory, reads it
once to warm the page cache, then times, ``--repeats`` times interleaved, median reported:

- in this process, imports done: ``torch.load`` vs ``ptfile.load``, alone ("open only": the pickle
  and the mapping), then each followed by reading every byte of every tensor (a sum over the bytes:
  mapped pages are only read when touched); and
  ``optstate.from_torch(path)`` vs ``from_torch_file(path)``, each followed by the same over the
  state's slots and weights;
- in a fresh interpreter, imports included: ``optstate.from_torch(path)`` (which imports torch) vs
  ``from_torch_file(path)`` (which does not), each touching every byte.

Prints seconds and the ratio torch / ptfile (above 1: ptfile is faster).
``python benchmarks/bench_ptfile.py --mb 100`` is a quick check.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUILD = """
import sys, torch
params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(int(sys.argv[2]))]
opt = torch.optim.Adam([(f"layers.{i}.weight", p) for i, p in enumerate(params)], lr=1e-3)
for p in params:
    p.grad = torch.randn_like(p)
opt.step()
torch.save({"model": {f"layers.{i}.weight": p.detach() for i, p in enumerate(params)},
            "optimizer": opt.state_dict()}, sys.argv[1])
"""

WHOLE = {
    "torch": "import sys, optstate; s = optstate.from_torch(sys.argv[1])",
    "ptfile": "import sys; from optstate.converters.torch.state_dict import from_torch_file; "
    "s = from_torch_file(sys.argv[1])",
}
TOUCH = (
    "\nimport numpy as np\n"
    "for a in [*s.slots.values(), *s.weights.values()]: np.add.reduce(a.reshape(-1).view(np.uint8), dtype=np.uint64)"
)


def touch(arrays) -> int:
    """Read every byte (the sum is returned so that nothing is optimised away)."""
    return sum(int(np.add.reduce(np.ascontiguousarray(a).reshape(-1).view(np.uint8), dtype=np.uint64)) for a in arrays)


def leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from leaves(v)
    elif isinstance(obj, np.ndarray):
        yield obj
    elif type(obj).__name__ == "Tensor":
        from optstate.converters.torch.live import tensor_to_numpy

        yield tensor_to_numpy(obj, copy=False)


def in_process(path: Path) -> dict[str, callable]:
    import torch

    import optstate
    from optstate.converters.torch import ptfile
    from optstate.converters.torch.state_dict import from_torch_file

    def state_bytes(state):
        return touch([*state.slots.values(), *state.weights.values()])

    return {
        "torch.load, open only": lambda: torch.load(path, weights_only=True, mmap=True),
        "ptfile.load, open only": lambda: ptfile.load(path),
        "torch.load": lambda: touch(leaves(torch.load(path, weights_only=True, mmap=True))),
        "ptfile.load": lambda: touch(leaves(ptfile.load(path))),
        "from_torch": lambda: state_bytes(optstate.from_torch(path)),
        "from_torch_file": lambda: state_bytes(from_torch_file(path)),
    }


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=500, help="checkpoint size in MB (default 500)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_ptfile_", dir=args.tmpdir))
    try:
        path = folder / "ckpt.pt"
        count = max(1, round(args.mb * 1e6 / (3 * 4 * 1024 * 1024)))
        subprocess.run([sys.executable, "-c", BUILD, path, str(count)], check=True)
        size = path.stat().st_size
        print(f"{path.name}: {count} Adam parameters [1024, 1024] float32, {size / 1e6:.0f} MB")
        runs = in_process(path)
        whole = {
            name: lambda code=code: subprocess.run([sys.executable, "-c", code + TOUCH, path], check=True)
            for name, code in WHOLE.items()
        }
        touch([np.fromfile(path, np.uint8)])  # warm the page cache
        times: dict[str, list[float]] = {name: [] for name in [*runs, *(f"process {n}" for n in whole)]}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run))
            for name, run in whole.items():
                times[f"process {name}"].append(timed(run))
        median = {name: statistics.median(t) for name, t in times.items()}
        for name, seconds in median.items():
            print(f"  {name:24s} {seconds:7.3f} s" + ("" if "open" in name else f"  {size / 1e9 / seconds:6.2f} GB/s"))
        for torch_path, ours in (
            ("torch.load, open only", "ptfile.load, open only"),
            ("torch.load", "ptfile.load"),
            ("from_torch", "from_torch_file"),
            ("process torch", "process ptfile"),
        ):
            print(f"  {torch_path} / {ours}: {median[torch_path] / median[ours]:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
