#!/usr/bin/env python
"""Benchmark a DeepSpeed ZeRO-2 checkpoint of 2 ranks read and rewritten for ``--world-size`` M ranks: optstate
against ``cp``, ``ds_to_universal`` and ``zero_to_fp32``; and each rewrite then loaded by DeepSpeed on M ranks.

One run:

1. builds, once, a ZeRO-2 checkpoint of a ``--params`` million-parameter model (Linear layers, torch
   AdamW in two param groups, one step) written by DeepSpeed itself on 2 CPU ranks (torchrun, gloo) into
   ``--tmpdir/deepspeed-zero2-<M>M/``; a later run finds it there and reuses it (``--rebuild`` makes it anew);
2. reads the step folder once (warm page cache), then times, each in a fresh process, ``--repeats``
   times round-robin, ``sync`` between runs:

   - ``cp``             ``cp -r global_step1 copy`` (no fsync), the baseline;
   - ``optstate``       what ``optstate convert --to optstate --no-fsync ckpt out.safetensors`` runs: the
                        canonical file (optimizer state, fp32 master weights, param groups), no fsync, as ``cp``;
   - ``optstate_zero``  ``optstate convert --to deepspeed --world-size M --no-fsync``: a ZeRO-2 checkpoint
                        for M ranks, which ``engine.load_checkpoint`` resumes on M ranks as it is;
   - ``optstate_universal`` ``optstate convert --to deepspeed --no-fsync``: a universal checkpoint;
   - ``ds_to_universal`` DeepSpeed's ``ds_to_universal --inject_missing_state`` (its default workers);
   - ``zero_to_fp32``   DeepSpeed's ``zero_to_fp32`` (the fp32 weights only, no optimizer state);
   The Python paths run in a child of this script that times its imports apart from the conversion. With
   ``--load``, each output that DeepSpeed resumes (``optstate_zero``, ``optstate_universal``,
   ``ds_to_universal``) is then loaded by a fresh ZeRO-2 engine on M ranks (torchrun, gloo;
   ``load_universal`` for the universal ones), and ``engine.load_checkpoint`` is timed inside it;
3. prints a table: whole-process wall seconds (median, min-max), the ratio to ``cp`` of the same repeat
   (median, min-max), peak RSS (``ru_maxrss`` of the child from ``wait4``: includes the pages of
   memory-mapped files), peak anonymous memory (``RssAnon`` of the process tree sampled every 20 ms:
   what the processes allocated), temporary disk (the most the output location held during the run,
   less what it holds at the end: files written and removed again) and the output's size; below it,
   each Python path's imports and conversion apart.

Run ``python benchmarks/bench_deepspeed.py --help``; ``--params 20 --repeats 1`` is a quick check.
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
WIDTH = 3584  # Linear(WIDTH, WIDTH) layers: 12.85M parameters each
MIB = 1024 * 1024
PATHS = ("cp", "optstate", "optstate_zero", "optstate_universal", "ds_to_universal", "zero_to_fp32")
# The outputs DeepSpeed resumes: whether it loads them as a universal checkpoint.
LOADABLE = {"optstate_zero": False, "optstate_universal": True, "ds_to_universal": True}


# ----------------------------------------------------------------------------- the checkpoint, by DeepSpeed


def build(out: Path, params_millions: float) -> None:
    """Under torchrun (2 ranks): one AdamW step of ZeRO-2 and ``engine.save_checkpoint(out)``."""
    import torch

    engine = _engine(params_millions)
    engine.backward(engine(torch.randn(1, WIDTH)).square().mean())
    engine.step()
    engine.save_checkpoint(out)


def _engine(params_millions: float, universal: bool = False):
    """Under torchrun: the benchmark's ZeRO-2 engine (Linear layers, torch AdamW in two param groups)."""
    import importlib

    import deepspeed
    import torch

    # The shared-memory allreduce is a C++ op DeepSpeed compiles on first use (a minute); gloo reduces as well.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    layers = max(1, round(params_millions * 1e6 / (WIDTH * WIDTH + WIDTH)))
    net = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal},
    }
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    return engine


def load(load_dir: Path, universal: bool, params_millions: float) -> None:
    """Under torchrun (M ranks): a fresh engine, then ``engine.load_checkpoint`` timed; rank 0 prints it."""
    import torch.distributed as dist

    engine = _engine(params_millions, universal)
    dist.barrier()
    t0 = time.perf_counter()
    path, _ = engine.load_checkpoint(load_dir)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if path is None:
        raise SystemExit(f"DeepSpeed found no checkpoint in {load_dir}")
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"load_s": seconds}), flush=True)


def checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint root in ``--tmpdir``, built by DeepSpeed unless a previous run left it there."""
    root = Path(args.tmpdir) / f"deepspeed-zero2-{args.params:g}M"
    if args.rebuild:
        shutil.rmtree(root, ignore_errors=True)
    if (root / "latest").is_file():
        print(f"reusing the checkpoint in {root} (--rebuild to make it anew)", flush=True)
        return root
    print(f"building a {args.params:g}M-parameter ZeRO-2 checkpoint on 2 ranks in {root} ...", flush=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [*launch, str(HERE), "_build", str(partial), str(args.params)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise Failed(f"building the checkpoint failed:\n{done.stderr[-3000:]}")
    partial.rename(root)
    print(f"built in {time.perf_counter() - t0:.0f}s", flush=True)
    return root


def describe(root: Path) -> str:
    step = root / (root / "latest").read_text().strip()
    files = sorted(step.iterdir())
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e9:.2f} GB" for f in files)
    return f"checkpoint {step}: {sizes}; {sum(f.stat().st_size for f in files) / 1e9:.2f} GB"


# ----------------------------------------------------------------------------- measuring a child


class Failed(Exception):
    pass


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _tree_kib(pids: list[int]) -> dict[str, int]:
    """RssAnon and RssFile summed over a process and its children (ds_to_universal forks workers)."""
    total = {"RssAnon": 0, "RssFile": 0}
    for pid in pids:
        for key, value in _status_kib(pid).items():
            total[key] += value
    return total


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return found


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


def run_measured(cmd: list[str], out: Path, logs: Path, label: str) -> dict:
    """Run ``cmd``: wall seconds, ru_maxrss of the child and its children, sampled peak anonymous memory
    of the process tree, and the bytes under ``out`` (its directory): their peak and their final size."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    with open(logs / f"{label}.out", "wb") as stdout, open(logs / f"{label}.err", "wb") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        peaks = {"RssAnon": 0, "disk": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peaks["RssAnon"] = max(peaks["RssAnon"], _tree_kib(_children(proc.pid))["RssAnon"])
                peaks["disk"] = max(peaks["disk"], _bytes_under(out.parent))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C, SIGTERM: end the child before its files are removed
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (logs / f"{label}.err").read_text(errors="replace").strip().splitlines()[-25:]
        raise Failed(f"{' '.join(cmd)} failed; stderr tail:\n" + "\n".join(tail))
    final = _bytes_under(out.parent)
    stdout = (logs / f"{label}.out").read_text(errors="replace").splitlines()
    inner = next((json.loads(line[7:]) for line in stdout if line.startswith("RESULT ")), {})
    return {
        **inner,
        "wall_s": wall,
        "maxrss_mib": usage.ru_maxrss / 1024,
        "anon_mib": peaks["RssAnon"] / 1024,
        "temp_mib": max(peaks["disk"] - final, 0) / MIB,
        "out_mib": final / MIB,
    }


def commands(root: Path, work: Path, world_size: int = 1) -> dict[str, tuple[list[str], Path]]:
    """Each path's command line and its output (alone in a folder of its own, so that its disk can be measured).
    The Python paths run in a child of this script, which times its imports apart from the conversion."""
    step = root / (root / "latest").read_text().strip()
    child = [sys.executable, str(HERE), "_child"]
    paths = {
        "cp": (["cp", "-r", str(step)], "copy"),
        "optstate": ([*child, "optstate", str(root)], "s.safetensors"),
        "optstate_zero": ([*child, f"optstate_zero:{world_size}", str(root)], "zero"),
        "optstate_universal": ([*child, "optstate_universal", str(root)], "universal"),
        "ds_to_universal": ([*child, "ds_to_universal", str(step)], "universal"),
        "zero_to_fp32": ([*child, "zero_to_fp32", str(root)], "fp32"),
    }
    return {name: ([*cmd, str(work / name / leaf)], work / name / leaf) for name, (cmd, leaf) in paths.items()}


def child(kind: str, src: str, out: str) -> None:
    """One Python path, in this process: its imports, then the conversion, each timed."""
    t0 = time.perf_counter()
    if kind == "optstate":
        from optstate.cli import main as optstate_main

        t1 = time.perf_counter()
        # What `optstate convert --quiet --no-fsync --to optstate SRC OUT` runs (no fsync, as cp).
        code = optstate_main(["convert", "--quiet", "--no-fsync", "--to", "optstate", src, out])
        if code:
            raise SystemExit(code)
    elif kind.startswith("optstate_"):
        from optstate.cli import main as optstate_main

        t1 = time.perf_counter()
        # `optstate convert --to deepspeed [--world-size M]`: a ZeRO checkpoint for M ranks, or a universal one.
        ranks = ["--world-size", kind.partition(":")[2]] if kind.startswith("optstate_zero") else []
        code = optstate_main(["convert", "--quiet", "--no-fsync", "--to", "deepspeed", *ranks, src, out])
        if code:
            raise SystemExit(code)
    elif kind == "ds_to_universal":
        from deepspeed.checkpoint import ds_to_universal

        t1 = time.perf_counter()
        # Its command line's defaults (4 extract and 2 merge workers); the flag a plain save_checkpoint needs.
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=src,
                output_folder=out,
                num_extract_workers=4,
                num_merge_workers=2,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
    else:
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

        t1 = time.perf_counter()
        convert_zero_checkpoint_to_fp32_state_dict(src, out)
    print("RESULT " + json.dumps({"import_s": t1 - t0, "convert_s": time.perf_counter() - t1}), flush=True)


# ----------------------------------------------------------------------------- the benchmark


def warm(step: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 * MIB)
    for path in step.iterdir():
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def machine() -> str:
    with open("/proc/meminfo") as f:
        mem = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)}
    versions = []
    for pkg in ("torch", "deepspeed", "numpy", "optstate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, memory {mem['MemTotal'] / MIB:.1f} GiB total, "
        f"{mem['MemAvailable'] / MIB:.1f} GiB available, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\npython {sys.version.split()[0]}; {', '.join(versions)}"
    )


def spread(values: list[float], spec: str = ".2f") -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def report(results: dict[str, list[dict]]) -> str:
    cp = results.get("cp", [])
    head = (
        f"{'path':<20} {'wall s':>20} {'x cp':>18} {'peak RSS MiB':>12} {'peak anon MiB':>13} "
        f"{'temp MiB':>9} {'out MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for name in PATHS:
        runs = results.get(name)
        if not runs:
            continue
        ratios = [r["wall_s"] / c["wall_s"] for r, c in zip(runs, cp, strict=False)]
        lines.append(
            f"{name:<20} {spread([r['wall_s'] for r in runs]):>20} {spread(ratios) if ratios else '-':>18} "
            f"{max(r['maxrss_mib'] for r in runs):>12.0f} {max(r['anon_mib'] for r in runs):>13.0f} "
            f"{max(r['temp_mib'] for r in runs):>9.0f} {statistics.median(r['out_mib'] for r in runs):>8.0f}"
        )
    parts = [
        f"  {name}: imports {spread([r['import_s'] for r in runs])} s, conversion "
        f"{spread([r['convert_s'] for r in runs])} s = "
        f"{spread([r['convert_s'] / c['wall_s'] for r, c in zip(runs, cp, strict=False)])} x cp"
        for name, runs in results.items()
        if runs and "convert_s" in runs[0]
    ]
    if parts:
        lines += ["", "inside the Python processes (median (min-max)), the conversion against the whole of cp:", *parts]
    return "\n".join(lines)


def load_measured(out: Path, universal: bool, args: argparse.Namespace, logs: Path, label: str) -> dict:
    """DeepSpeed resuming an output on ``--world-size`` ranks: ``engine.load_checkpoint``'s seconds, timed in
    the engine (its start-up apart). ds_to_universal writes ``latest_universal`` beside its output folder."""
    load_dir = out.parent if (out.parent / "latest_universal").is_file() else out
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.world_size)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    cmd = [*launch, str(HERE), "_load", str(load_dir), str(int(universal)), str(args.params)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (logs / f"{label}.err").write_text(done.stderr)
    if done.returncode != 0:
        raise Failed(f"{' '.join(cmd)} failed; stderr tail:\n" + "\n".join(done.stderr.splitlines()[-25:]))
    return next(json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT "))


def load_report(results: dict[str, list[dict]], world_size: int) -> str:
    """Each loadable path: its conversion (whole process), DeepSpeed's load_checkpoint, and the two together."""
    lines = [
        f"then resumed by DeepSpeed on {world_size} rank(s) (median (min-max) s):",
        f"{'path':<20} {'convert':>20} {'load_checkpoint':>20} {'convert + load':>20}",
    ]
    for name in LOADABLE:
        runs = [r for r in results.get(name, []) if "load_s" in r]
        if runs:
            lines.append(
                f"{name:<20} {spread([r['wall_s'] for r in runs]):>20} {spread([r['load_s'] for r in runs]):>20} "
                f"{spread([r['wall_s'] + r['load_s'] for r in runs]):>20}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    root = checkpoint(args)
    print(describe(root), flush=True)
    work = Path(tempfile.mkdtemp(prefix="optstate-bench-ds-", dir=args.tmpdir))
    results: dict[str, list[dict]] = {}
    try:
        logs = work / "logs"
        logs.mkdir()
        cmds = {k: v for k, v in commands(root, work, args.world_size).items() if k in args.paths}
        print(f"page cache warmed: read the step folder in {warm(root / (root / 'latest').read_text().strip()):.2f}s")
        for rep in range(args.repeats):
            for name, (cmd, out) in cmds.items():
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir()
                os.sync()  # earlier runs' dirty pages are not written back during this one
                try:
                    r = run_measured(cmd, out, logs, f"{name}-{rep}")
                    if args.load and name in LOADABLE:
                        r |= load_measured(out, LOADABLE[name], args, logs, f"{name}-load-{rep}")
                finally:
                    shutil.rmtree(out.parent, ignore_errors=True)
                results.setdefault(name, []).append(r)
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:<20} {r['wall_s']:7.2f}s, peak RSS {r['maxrss_mib']:.0f} MiB "
                    f"(anon {r['anon_mib']:.0f}), temporary {r['temp_mib']:.0f} MiB, output {r['out_mib']:.0f} MiB"
                    + (f"; load_checkpoint {r['load_s']:.2f}s" if "load_s" in r else ""),
                    flush=True,
                )
        os.sync()
        print(f"\nresults: {args.repeats} repeat(s), median (min-max); page cache warm")
        print("wall s = whole process (interpreter start and imports included); x cp = wall / cp's wall in the same")
        print("repeat; peak RSS = ru_maxrss (includes file-backed pages of memory maps), peak anon = sampled RssAnon")
        print("of the process and its children; temp = the most the output folder held less its final size.")
        print("optstate and cp do not fsync; ds_to_universal and zero_to_fp32 write with torch.save (no fsync).\n")
        print(report(results))
        if args.load:
            print("\n" + load_report(results, args.world_size))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"checkpoint": describe(root), "results": results}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_build"]:
        build(Path(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["_load"]:
        load(Path(argv[1]), argv[2] == "1", float(argv[3]))
        return 0
    if argv[:1] == ["_child"]:
        child(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=float, default=150, help="model size in millions of parameters (default 150)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (default 3)")
    p.add_argument("--tmpdir", default="/tmp", help="where the checkpoint is kept and the outputs go (default /tmp)")
    p.add_argument("--rebuild", action="store_true", help="build the checkpoint anew even where one is kept")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    p.add_argument("--json", help="also append all measurements to this JSON-lines file")
    p.add_argument("--world-size", type=int, default=1, help="the ranks optstate_zero writes for and --load uses")
    p.add_argument("--load", action="store_true", help="also time DeepSpeed loading each resumable output")
    args = p.parse_args(argv)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    print(machine(), flush=True)
    try:
        return run(args)
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); cleaning up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
