#!/usr/bin/env python
"""Benchmark ``optstate convert`` on a synthetic transformer-shaped torch training checkpoint.

One run:

1. builds ``{"model": weights, "optimizer": Adam.state_dict()}`` (float32, ``--gb`` GB of tensor
   data, one ``opt.step()`` so every parameter has ``step``/``exp_avg``/``exp_avg_sq``) with
   ``torch.save`` in a temporary directory (in a child process, so its memory is gone afterwards);
2. reads the file once (warm page cache), then times, each in a fresh subprocess, ``--repeats``
   times interleaved, the median reported:

   - ``cp``             plain ``cp SRC DST`` (no fsync: the data may still be in the page cache);
   - ``cp+fsync``       ``cp`` then ``sync DST`` (same durability as optstate, which fsyncs);
   - ``cp-layout``      the same tensor bytes copied inside the kernel (``copy_file_range``, as ``cp``) into the
                        layout a converted file has: each record's bytes one after another behind a header,
                        not at the offsets they had. The floor of any conversion that changes the layout: on
                        Linux 6.18 with large folios a copy between offsets that differ costs about 1.4x one
                        between equal offsets (``cp``'s case);
   - ``naive``          ``torch.load(weights_only=True)``, ``.numpy()`` every tensor, write the raw
                        bytes of all of them into one file, fsync;
   - ``optstate``       torch -> optstate (canonical safetensors file), ``--no-fsync`` as ``cp``;
     ``optstate+fsync`` the same, durable (the default);
   - ``flax``           the same with ``--target-params`` a Flax model (every kernel transposed);
   - ``orbax-mem``      the baseline for Orbax output: the arrays loaded into memory as JAX arrays,
                        then saved by Orbax's ``StandardCheckpointer``; its ``save`` part is the time
                        to beat;
   - ``optax``          torch -> optax (Orbax checkpoint directory); ``flax-orbax`` with the Flax
                        layout too;
   - ``to-torch``       canonical file (made once, untimed) -> torch file.

   The optstate paths run the installed ``optstate convert`` console script (whole-process time).
3. prints a table: wall seconds (whole subprocess: interpreter start and imports included), GB/s
   of tensor data (tensor bytes in the checkpoint / wall seconds, 1 GB = 1e9 bytes), ratio to
   ``cp``, ``cp+fsync`` and ``naive`` of the same run, the parts of the two Python baselines, peak RSS
   (``ru_maxrss`` from ``wait4`` on that child: includes file-backed pages of memory maps) and
   peak anonymous RSS (``RssAnon`` sampled from ``/proc/PID/status`` every 20 ms: memory the
   process really allocated; the part of the peak that a streaming converter keeps small).
4. removes its temporary directory at the end, also on failure or Ctrl-C/SIGTERM.

Run ``python benchmarks/bench_convert.py --help``; ``--gb 0.3 --repeats 1`` is a quick check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve()
D_MODEL, D_FF, VOCAB = 1024, 4096, 32000
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- model shapes


def model_shapes(params_millions: float) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a transformer with about ``params_millions`` million parameters.

    Embedding ``[vocab, 1024]``, N layers of q/k/v/o ``[1024, 1024]``, MLP ``[4096, 1024]`` and
    ``[1024, 4096]``, two LayerNorms (weight and bias), a final LayerNorm. N is chosen so the total
    is closest to the target; below one layer plus the full 32000-row embedding the vocabulary
    shrinks instead.
    """
    target = params_millions * 1e6
    ln = 2 * D_MODEL
    layer = 4 * D_MODEL * D_MODEL + 2 * D_MODEL * D_FF + 2 * ln
    vocab, n_layers = VOCAB, round((target - VOCAB * D_MODEL - ln) / layer)
    if n_layers < 1:
        n_layers = 1
        vocab = max(256, round((target - layer - ln) / D_MODEL))
    shapes = [("embed.weight", (vocab, D_MODEL))]
    for i in range(n_layers):
        p = f"layers.{i}"
        shapes += [(f"{p}.ln1.weight", (D_MODEL,)), (f"{p}.ln1.bias", (D_MODEL,))]
        shapes += [(f"{p}.attn.{w}.weight", (D_MODEL, D_MODEL)) for w in "qkvo"]
        shapes += [(f"{p}.ln2.weight", (D_MODEL,)), (f"{p}.ln2.bias", (D_MODEL,))]
        shapes += [(f"{p}.mlp.up.weight", (D_FF, D_MODEL)), (f"{p}.mlp.down.weight", (D_MODEL, D_FF))]
    shapes += [("final_ln.weight", (D_MODEL,)), ("final_ln.bias", (D_MODEL,))]
    return shapes


def build_checkpoint(path: str, params_millions: float) -> dict:
    """Child: write the checkpoint; returns facts about it (run in its own process).

    The Adam state is written as ``torch.optim.Adam.state_dict()`` lays it out after one step
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter, ``param_names`` in the group), without
    running the step, so that building a 12 GB checkpoint needs 12 GB of memory and not 16.
    """
    import torch

    torch.manual_seed(0)
    shapes = model_shapes(params_millions)
    t0 = time.perf_counter()
    weights = {name: torch.randn(shape) for name, shape in shapes}
    state = {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(shape) * 1e-3, "exp_avg_sq": torch.rand(shape) * 1e-6}
        for i, (_, shape) in enumerate(shapes)
    }
    group = dict(
        torch.optim.Adam([torch.zeros(1)], lr=1e-3).state_dict()["param_groups"][0],
        params=list(range(len(shapes))),
        param_names=[name for name, _ in shapes],
    )
    ckpt = {"model": weights, "optimizer": {"state": state, "param_groups": [group]}}
    tensor_bytes = sum(t.numel() * t.element_size() for t in _tensors(ckpt))
    n_tensors = sum(1 for _ in _tensors(ckpt))
    t1 = time.perf_counter()
    torch.save(ckpt, path)
    t2 = time.perf_counter()
    del ckpt, state, weights
    return {
        "params": sum(_numel(s) for _, s in shapes),
        "n_params": len(shapes),
        "n_layers": sum(1 for n, _ in shapes if n.endswith("attn.q.weight")),
        "vocab": shapes[0][1][0],
        "tensor_bytes": tensor_bytes,
        "n_tensors": n_tensors,
        "file_bytes": os.path.getsize(path),
        "make_s": t1 - t0,
        "save_s": t2 - t1,
    }


def flax_target() -> dict:
    """The Flax model of the benchmark's transformer, as shapes (what ``--target-params`` reads):
    kernels ``[in, out]``, LayerNorm ``scale``, ``layers_i``. Zero-strided arrays: no memory."""
    import numpy as np

    params: dict = {}
    for name, shape in model_shapes(float(os.environ["OPTSTATE_BENCH_PARAMS"])):
        *module, leaf = name.split(".")
        if module[0] == "layers":
            module = [f"layers_{module[1]}", *module[2:]]
        if leaf == "weight":
            leaf = "embedding" if module == ["embed"] else "kernel" if len(shape) == 2 else "scale"
            shape = shape[::-1] if leaf == "kernel" else shape
        node = params
        for m in module:
            node = node.setdefault(m, {})
        node[leaf] = np.broadcast_to(np.float32(0), shape)
    return {"params": params}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ----------------------------------------------------------------------------- child drivers


def child_naive(src: str, dst: str) -> dict:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    obj = torch.load(src, map_location="cpu", weights_only=True)
    t2 = time.perf_counter()
    arrays = [t.detach().numpy() for t in _tensors(obj)]
    t3 = time.perf_counter()
    with open(dst, "wb") as f:
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    t4 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "convert_s": t4 - t1,
        "parts": {"load": t2 - t1, "to_numpy": t3 - t2, "write+fsync": t4 - t3},
    }


def child_copy_layout(src: str, dst: str) -> dict:
    """``cp-layout``: every record of the torch zip copied in the kernel to the next offset of ``dst``, after a
    64 KiB gap for a header (no fsync, as ``cp``): a conversion's copying without its parsing or checks."""
    import zipfile

    t0 = time.perf_counter()
    with zipfile.ZipFile(src) as archive, open(src, "rb") as f:
        spans = []
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            spans.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    out, offset = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL), 64 * 1024
    with open(src, "rb") as f:
        for start, size in spans:
            done = 0
            while done < size:
                done += os.copy_file_range(f.fileno(), out, size - done, start + done, offset + done)
            offset += size
    os.close(out)
    return {"import_s": 0.0, "convert_s": time.perf_counter() - t0}


def child_orbax_in_memory(src: str, dst: str) -> dict:
    """The issue's Orbax baseline: the same arrays, already in memory as JAX arrays, saved by Orbax's
    ``StandardCheckpointer`` (its defaults); ``parts["save"]`` is the time to beat."""
    t0 = time.perf_counter()
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    import torch

    t1 = time.perf_counter()
    obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    tree = [jax.device_put(np.array(t.numpy())) for t in _tensors(obj)]
    jax.block_until_ready(tree)
    t2 = time.perf_counter()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(dst), tree)
    checkpointer.wait_until_finished()
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "convert_s": t3 - t1, "parts": {"load into memory": t2 - t1, "save": t3 - t2}}


def child_main(argv: list[str]) -> None:
    kind, src, dst = argv[:3]
    if kind == "build":
        result = build_checkpoint(dst, float(argv[3]))
    elif kind == "orbax":
        result = child_orbax_in_memory(src, dst)
    elif kind == "copy-layout":
        result = child_copy_layout(src, dst)
    else:
        result = child_naive(src, dst)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- measuring a child


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


class Failed(Exception):
    pass


def run_measured(cmd: list[str], log_dir: Path, label: str) -> dict:
    """Run ``cmd``; wall seconds, ru_maxrss of this child (wait4), sampled peak RssAnon."""
    out_path, err_path = log_dir / f"{label}.out", log_dir / f"{label}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        # Own process group, so that on Ctrl-C/SIGTERM the child and its own children (sh -> cp) are ended.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, cwd=HERE.parent
        )
        peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for k, v in _status_kib(proc.pid).items():
                    peaks[k] = max(peaks[k], v)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM: end the child we started before its files are removed
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise Failed(
            f"{' '.join(cmd)} exited with {proc.returncode}; stderr tail:\n"
            + "\n".join(stderr.strip().splitlines()[-25:])
        )
    result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), {})
    return {
        "wall_s": wall,
        "maxrss_mib": usage.ru_maxrss / 1024,
        "anon_mib": peaks["RssAnon"] / 1024,
        "file_mib": peaks["RssFile"] / 1024,
        **result,
        "stderr": stderr,
    }


# ----------------------------------------------------------------------------- the benchmark


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in KiB."""
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)}


def machine() -> str:
    mem = _meminfo()
    versions = []
    for pkg in ("torch", "jax", "orbax-checkpoint", "numpy", "optstate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), "
        f"memory {mem['MemTotal'] / MIB:.1f} GiB total, {mem['MemAvailable'] / MIB:.1f} GiB available, "
        f"load average {load}\n"
        f"python {sys.version.split()[0]}; {', '.join(versions)}"
    )


def warm(path: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 * MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


PATHS = (
    "cp",
    "cp+fsync",
    "cp-layout",
    "naive",
    "optstate",
    "optstate+fsync",
    "flax",
    "orbax-mem",
    "optax",
    "flax-orbax",
    "to-torch",
)


def commands(args: argparse.Namespace, src: Path, work: Path) -> dict[str, tuple[list[str], Path]]:
    """Each path's command line (the installed ``optstate`` script: whole-process time) and its output."""
    py = sys.executable
    cli = [str(Path(sys.executable).with_name("optstate")), "convert", "--quiet", "--force"]
    canonical = work / "input.safetensors"  # made once, untimed, for the way back
    paths = {
        "cp": (["cp", str(src), str(work / "copy.pt")], work / "copy.pt"),
        "cp+fsync": (["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(work / "copy.pt")], work / "copy.pt"),
        "cp-layout": (
            [py, str(HERE), "_child", "copy-layout", str(src), str(work / "layout.bin")],
            work / "layout.bin",
        ),
        "naive": ([py, str(HERE), "_child", "naive", str(src), str(work / "naive.bin")], work / "naive.bin"),
        "optstate": ([*cli, "--no-fsync", str(src), str(work / "out.safetensors")], work / "out.safetensors"),
        "optstate+fsync": ([*cli, str(src), str(work / "out.safetensors")], work / "out.safetensors"),
        "flax": (
            [
                *cli,
                "--no-fsync",
                "--target-params",
                "bench_convert:flax_target",
                str(src),
                str(work / "flax.safetensors"),
            ],
            work / "flax.safetensors",
        ),
        "orbax-mem": ([py, str(HERE), "_child", "orbax", str(src), str(work / "mem_orbax")], work / "mem_orbax"),
        "optax": ([*cli, "--no-fsync", "--to", "optax", str(src), str(work / "out_optax") + "/"], work / "out_optax"),
        "flax-orbax": (
            [
                *cli,
                "--no-fsync",
                "--to",
                "optax",
                "--target-params",
                "bench_convert:flax_target",
                str(src),
                str(work / "flax_optax") + "/",
            ],
            work / "flax_optax",
        ),
        "to-torch": ([*cli, "--no-fsync", str(canonical), str(work / "back.pt")], work / "back.pt"),
    }
    return {k: v for k, v in paths.items() if k in args.paths}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(results: dict[str, list[dict]], failures: dict[str, str], tensor_bytes: int) -> str:
    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in results.get(name, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    cp, cp_sync, naive = med("cp", "wall_s"), med("cp+fsync", "wall_s"), med("naive", "wall_s")
    layout = med("cp-layout", "wall_s")
    head = (
        f"{'path':<15} {'wall s':>8} {'min-max s':>13} {'GB/s':>6} {'x cp':>6} {'x cp+fs':>7} "
        f"{'x layout':>8} {'x naive':>7} {'peak RSS MiB':>12} {'peak anon MiB':>13} {'n':>2}"
    )
    lines = [head, "-" * len(head)]
    for name in PATHS:
        runs = results.get(name, [])
        if not runs and name not in failures:
            continue
        if not runs:
            lines.append(f"{name:<15} FAILED (see below)")
            continue
        wall = med(name, "wall_s")
        walls = [r["wall_s"] for r in runs]
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        lines.append(
            f"{name:<15} {wall:>8.2f} {spread:>13} {tensor_bytes / 1e9 / wall:>6.2f} "
            f"{fmt(wall / cp if cp else None, '.2f'):>6} {fmt(wall / cp_sync if cp_sync else None, '.2f'):>7} "
            f"{fmt(wall / layout if layout else None, '.2f'):>8} {fmt(wall / naive if naive else None, '.2f'):>7} "
            f"{max(r['maxrss_mib'] for r in runs):>12.0f} "
            f"{max(r['anon_mib'] for r in runs):>13.0f} {len(runs):>2}"
            + ("  (some repeats FAILED)" if name in failures else "")
        )
    parts = []
    for name, runs in results.items():
        if runs and runs[0].get("parts"):
            keys = runs[0]["parts"]
            split = ", ".join(f"{k} {statistics.median(r['parts'][k] for r in runs):.2f}s" for k in keys)
            imp = med(name, "import_s")
            parts.append(f"  {name}: imports {imp:.2f}s; {split}")
    if parts:
        lines += ["", "inner time split (medians; 'inner s' = everything after the imports):", *parts]
    return "\n".join(lines)


def run_size(args: argparse.Namespace, params_millions: float, work: Path) -> int:
    """Build one checkpoint in ``work``, time every path on it, print the table; 1 if a path failed."""
    logs = work / "logs"
    logs.mkdir()
    results: dict[str, list[dict]] = {}
    failures: dict[str, str] = {}
    os.environ["OPTSTATE_BENCH_PARAMS"] = str(params_millions)  # for flax_target in the children
    src = work / "ckpt.pt"
    print(f"\nbuilding a {params_millions:g}M-parameter checkpoint in {work} ...", flush=True)
    built = run_measured(
        [sys.executable, str(HERE), "_child", "build", "-", str(src), str(params_millions)], logs, "build"
    )
    os.sync()
    tb = built["tensor_bytes"]
    print(
        f"checkpoint: {built['params'] / 1e6:.1f}M parameters ({built['n_params']} tensors: vocab "
        f"{built['vocab']} x {D_MODEL} embedding, {built['n_layers']} layers, d_ff {D_FF}), Adam after "
        f"1 step; {built['n_tensors']} tensors, {tb / 1e9:.3f} GB of tensor data; file "
        f"{built['file_bytes'] / 1e9:.3f} GB; built in {built['wall_s']:.1f}s",
        flush=True,
    )
    cmds = commands(args, src, work)
    if "orbax-mem" in cmds and 2.2 * tb > _meminfo()["MemAvailable"] * 1024:
        del cmds["orbax-mem"]
        print(
            "orbax-mem skipped: it holds the arrays and Orbax's copy of them, about twice the checkpoint, "
            "more memory than this machine has available",
            flush=True,
        )
    if "to-torch" in cmds:
        run_measured(commands(argparse.Namespace(paths=["optstate"]), src, work)["optstate"][0], logs, "prepare")
        os.rename(work / "out.safetensors", work / "input.safetensors")
    print(f"page cache warmed: read the file once in {warm(src):.2f}s", flush=True)
    for rep in range(args.repeats):
        for name, (cmd, out) in cmds.items():
            if name in failures:
                continue
            remove(out)
            os.sync()  # earlier runs' dirty pages are not written back during this one
            try:
                r = run_measured(cmd, logs, f"{name.replace('+', '_')}-{rep}")
            except Failed as exc:
                failures[name] = str(exc)
                print(f"  [{rep + 1}/{args.repeats}] {name:<14} FAILED: {exc}", flush=True)
                continue
            finally:
                remove(out)
            results.setdefault(name, []).append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] {name:<14} {r['wall_s']:7.2f}s, peak RSS "
                f"{r['maxrss_mib']:.0f} MiB (anon {r['anon_mib']:.0f}, file {r['file_mib']:.0f})",
                flush=True,
            )
    os.sync()
    print()
    print(
        f"results: {built['params'] / 1e6:.1f}M params, {tb / 1e9:.3f} GB tensor data, {args.repeats} repeat(s), "
        "median; page cache warm"
    )
    print("wall s = whole process (interpreter start and imports included); GB/s = tensor bytes / wall s;")
    print("x cp, x cp+fs, x layout, x naive = wall / median wall of that baseline in this run; peak RSS = ru_maxrss")
    print("(includes file-backed mmap pages), peak anon = sampled RssAnon; max over the repeats.")
    print("optstate paths run the installed `optstate convert`; all but optstate+fsync with --no-fsync, as cp.")
    print("naive fsyncs its output. flax = torch -> canonical with the layout moved to a Flax model")
    print("(--target-params: every kernel transposed); to-torch = canonical -> torch file.")
    print()
    print(report(results, failures, tb))
    for name, msg in failures.items():
        print(f"\nFAILED {name}: {msg}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "built": built,
                        "results": {
                            k: [{kk: vv for kk, vv in r.items() if kk != "stderr"} for r in v]
                            for k, v in results.items()
                        },
                        "failures": failures,
                    }
                )
                + "\n"
            )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gb",
        default="3",
        help="checkpoint sizes in GB of tensor data, comma-separated (default 3; "
        "the issue's pair is 3,12); Adam in float32 is 12 bytes a parameter",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported (default 3)")
    p.add_argument("--tmpdir", default="/tmp", help="where the temporary directory goes (default /tmp)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    p.add_argument("--json", help="also append all measurements to this JSON-lines file")
    args = p.parse_args(argv)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = time.perf_counter()
    print(machine(), flush=True)
    failed = 0
    for gb in (float(g) for g in args.gb.split(",")):
        work = Path(tempfile.mkdtemp(prefix="optstate-bench-", dir=args.tmpdir))
        try:
            failed |= run_size(args, gb * 1e9 / 12 / 1e6, work)
        except Failed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            failed = 1
        except KeyboardInterrupt as exc:
            print(f"interrupted ({exc or 'Ctrl-C'}); cleaning up", file=sys.stderr)
            return 130
        finally:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}", file=sys.stderr)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s")
    return failed


if __name__ == "__main__":
    sys.exit(main())
