#!/usr/bin/env python
"""Benchmark writing the canonical file: ``optstate.save`` against ``cp`` of the same bytes.

One run:

1. writes, in a child process, ``--gb`` GB of float32 values (random, finite) to one raw file: the
   momentum buffers of a transformer-shaped model (shapes from ``bench_convert.model_shapes``);
2. reads the file once (warm page cache), then times, each in a fresh subprocess, ``--repeats``
   times round-robin (``sync`` between runs), the median reported:

   - ``cp``             ``cp SRC DST`` (coreutils: ``copy_file_range`` itself; no fsync);
   - ``cp+fsync``       ``cp`` then ``sync DST``;
   - ``mapped``         an SGD state whose arrays are ``np.memmap`` views of the file (as the torch
                        file reader and ``optstate.load`` hand them over), ``optstate.save``: every
                        tensor goes file to file with ``copy_file_range``; fsync (the default);
   - ``mapped-nofsync`` the same with ``fsync=False``;
   - ``plain``          the same state with its arrays read into memory first (``np.fromfile``),
                        ``optstate.save``: written from memory; fsync;
   - ``plain-nofsync``  the same with ``fsync=False``;
   - ``torch``          ``optstate.convert`` of a ``.pt`` file holding the same tensors (an SGD checkpoint
                        written by optstate's torch-free writer during the build) to the canonical file:
                        the reader, the checks of the input's identity, the in-kernel copy, the tensors'
                        XXH3 checksums and the read-back before the rename; fsync. The whole conversion
                        is timed (``save_s`` is inside ``convert``);
   - ``torch-nocheck``  the same with the checksums and the read-back replaced by no-ops: what they cost.
3. prints a table: seconds inside ``optstate.save`` (``cp``: the whole process), GB/s of tensor data,
   the ratio to ``cp`` and to ``cp+fsync`` of the same run (of the medians, and of the fastest runs:
   on a busy machine the fastest run is the least disturbed one), and memory: the whole child's peak
   ``RssAnon`` (sampled every 20 ms by the parent) and the peak ``RssAnon`` while ``save`` ran above
   its value just before (sampled every 2 ms inside the child): what saving allocated.
4. checks that every path wrote the same tensor bytes (the headers of ``torch`` and ``torch-nocheck`` differ
   from the others': a source, checksums), and removes its temporary directory.

``python benchmarks/bench_fileformat.py --gb 0.2`` is a quick check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_convert import Failed, machine, model_shapes, remove, run_measured, warm  # noqa: E402

PATHS = ("cp", "cp+fsync", "mapped", "mapped-nofsync", "plain", "plain-nofsync", "torch", "torch-nocheck")


def layout(gb: float) -> list[tuple[str, int]]:
    """``(name, number of float32 values)`` of every tensor: ``gb`` GB of momentum buffers."""
    return [(name, math.prod(shape)) for name, shape in model_shapes(gb * 1e9 / 4 / 1e6)]


# ----------------------------------------------------------------------------- children


def child_build(src: str, gb: float) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    tensors = layout(gb)
    with open(src, "wb") as f:
        for _, n in tensors:
            f.write(rng.random(n, dtype=np.float32).data)
    _build_torch_file(src, gb)
    return {"n_tensors": len(tensors), "tensor_bytes": os.path.getsize(src)}


def torch_source(src: str) -> str:
    return src + ".pt"


def _sgd_state(src: str, gb: float, mapped: bool) -> object:
    import numpy as np

    from optstate.schema import OptimizerState, ParamInfo

    arrays, offset = {}, 0
    for name, n in layout(gb):
        if mapped:
            arrays[name] = np.memmap(src, dtype="<f4", mode="r", offset=offset, shape=(n,))
        else:
            arrays[name] = np.fromfile(src, dtype="<f4", count=n, offset=offset)
        offset += 4 * n
    return OptimizerState(
        "sgd",
        ({"lr": 0.1, "momentum": 0.9},),
        tuple(ParamInfo((name,), a.shape, "float32", 0) for name, a in arrays.items()),
        {("momentum", (name,)): a for name, a in arrays.items()},
    )


def _build_torch_file(src: str, gb: float) -> None:
    """The same tensors as a torch checkpoint (``{"optimizer": state_dict}``), written without torch."""
    from optstate.converters.torch.state_dict import save_torch_file

    save_torch_file(_sgd_state(src, gb, mapped=True), torch_source(src), fsync=False)


def _without_checksums() -> None:
    """Replace the checksums and the read-back with no-ops (the torch-nocheck path): their cost, measured."""
    from optstate.schema import fileformat

    none = fileformat._NO_CHECKSUM
    fileformat.checksum = lambda _array: none
    fileformat.file_checksums = lambda _path, spans, _fd=None: dict.fromkeys(spans, none)
    fileformat.file_crc32_xxh3 = lambda *_args: (0, none)
    fileformat._checked_against_recorded_crc32s = lambda entries, *_args: {e.key: none for e in entries}
    fileformat.verify_written = lambda *_args: None


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def child_save(src: str, dst: str, gb: float, path: str) -> dict:
    import optstate

    if path.startswith("torch"):
        if path == "torch-nocheck":
            _without_checksums()

        def run() -> None:
            optstate.convert(torch_source(src), dst, dst_format="optstate")
    else:
        state = _sgd_state(src, gb, mapped=not path.startswith("plain"))

        def run() -> None:
            optstate.save(state, dst, fsync=not path.endswith("nofsync"))

    before = _rss_anon_kib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_kib())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    run()
    save_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"save_s": save_s, "anon_before_mib": before / 1024, "anon_during_save_mib": (peak[0] - before) / 1024}


def child_main(argv: list[str]) -> None:
    kind, src, dst, gb = argv[0], argv[1], argv[2], float(argv[3])
    result = child_build(src, gb) if kind == "build" else child_save(src, dst, gb, kind)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the benchmark


def commands(paths: list[str], src: Path, work: Path, gb: float) -> dict[str, tuple[list[str], Path]]:
    out = {name: work / f"{name.replace('+', '_')}.out" for name in paths}
    cmds = {
        "cp": ["cp", str(src), str(out.get("cp", ""))],
        "cp+fsync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(out.get("cp+fsync", ""))],
    }
    for name in PATHS[2:]:
        cmds[name] = [sys.executable, str(HERE), "_child", name, str(src), str(out.get(name, "")), str(gb)]
    return {name: (cmds[name], out[name]) for name in paths}


def same_tensor_bytes(a: Path, b: Path, chunk: int = 64 << 20) -> bool:
    """Whether two canonical files hold the same tensor data (what follows each one's header)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for f in (fa, fb):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def seconds(r: dict) -> float:
    return r.get("save_s", r["wall_s"])


def report(results: dict[str, list[dict]], tensor_bytes: int) -> str:
    def med(name: str) -> float:
        return statistics.median(map(seconds, results[name])) if results.get(name) else math.nan

    def best(name: str) -> float:
        return min(map(seconds, results[name])) if results.get(name) else math.nan

    head = (
        f"{'path':<15} {'s':>7} {'min-max s':>11} {'GB/s':>6} {'x cp':>6} {'x cp+fs':>7} {'min x cp':>8} "
        f"{'min x cp+fs':>11} {'peak anon MiB':>13} {'anon in save MiB':>16}"
    )
    lines = [head, "-" * len(head)]
    for name, runs in results.items():
        s = med(name)
        during = max((r["anon_during_save_mib"] for r in runs if "anon_during_save_mib" in r), default=None)
        during_text = "-" if during is None else f"{during:.0f}"
        lines.append(
            f"{name:<15} {s:>7.2f} {f'{best(name):.2f}-{max(map(seconds, runs)):.2f}':>11} "
            f"{tensor_bytes / 1e9 / s:>6.2f} {s / med('cp'):>6.2f} {s / med('cp+fsync'):>7.2f} "
            f"{best(name) / best('cp'):>8.2f} {best(name) / best('cp+fsync'):>11.2f} "
            f"{max(r['anon_mib'] for r in runs):>13.0f} {during_text:>16}"
        )
    if results.get("torch") and results.get("torch-nocheck"):  # run in turn: each pair saw the same machine
        ratios = [seconds(a) / seconds(b) for a, b in zip(results["torch"], results["torch-nocheck"], strict=False)]
        lines.append(
            f"\nthe checks' cost, torch / torch-nocheck pair by pair: median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gb", type=float, default=2.0, help="GB of float32 tensor data (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported (default 3)")
    p.add_argument("--tmpdir", default="/tmp", help="where the temporary directory goes (needs ~3x --gb free)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    args = p.parse_args(argv)
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.perf_counter()
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="optstate-bench-ff-", dir=args.tmpdir))
    logs = work / "logs"
    logs.mkdir()
    try:
        src = work / "source.bin"
        built = run_measured([sys.executable, str(HERE), "_child", "build", str(src), "-", str(args.gb)], logs, "build")
        tb = built["tensor_bytes"]
        os.sync()
        print(
            f"source: {built['n_tensors']} float32 tensors, {tb / 1e9:.3f} GB, built in {built['wall_s']:.1f}s; "
            f"page cache warmed: read once in {warm(src):.2f}s",
            flush=True,
        )
        cmds = commands(paths, src, work, args.gb)
        results: dict[str, list[dict]] = {}
        kept: dict[str, Path] = {}
        for rep in range(args.repeats):
            for name, (cmd, out) in cmds.items():
                remove(out)
                os.sync()  # earlier runs' dirty pages are not written back during this one
                r = run_measured(cmd, logs, f"{name.replace('+', '_')}-{rep}")
                results.setdefault(name, []).append(r)
                if rep == 0 and not name.startswith("cp"):
                    kept[name] = out.rename(out.with_suffix(".first"))
                else:
                    remove(out)
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:<15} {seconds(r):6.2f}s, peak anon {r['anon_mib']:.0f} MiB"
                    + (f", in save +{r['anon_during_save_mib']:.0f} MiB" if "anon_during_save_mib" in r else ""),
                    flush=True,
                )
        saved = list(kept.values())
        same = all(same_tensor_bytes(saved[0], out) for out in saved[1:])
        print()
        print(
            f"results: {tb / 1e9:.3f} GB in {built['n_tensors']} float32 tensors, {args.repeats} repeat(s), median; "
            "page cache warm"
        )
        print("s = inside optstate.save (cp, cp+fsync: the whole process); x cp, x cp+fs = s / median s of cp,")
        print("cp+fsync in this run; min x = the same with the fastest run of each (a noisy machine slows runs down,")
        print("it never speeds them up); peak anon = the child's peak RssAnon (imports, the state, plain: its arrays);")
        print("anon in save = peak RssAnon while save ran, above its value just before")
        print()
        print(report(results, tb))
        print(f"\nevery save path wrote the same bytes: {'yes' if same else 'NO'} ({len(saved)} files compared)")
        print(f"total benchmark time {time.perf_counter() - started:.0f}s")
        return 0 if same else 1
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
