"""The writing children of tests/test_kill_matrix.py, and the runner that starts, signals and reaps them.

A child is forked from a process that has imported what the writer needs and nothing has run in it yet that
forking breaks: the test process itself for the torch writers (as tests/test_reliability.py's matrix does), and,
for the Orbax writers, this file run as a script (``python tests/kill_matrix_child.py SPEC.json``), which imports
JAX, Orbax and Flax but forks before JAX has a backend (JAX's own warning about ``os.fork`` is for a process with
running JAX threads; there are none yet). A child writes, and at its case's point writes ``<case>.ready`` (its pid)
and sleeps; the runner then sends the case's signal and records how the child ended. NumPy and optstate only at
module level: each parent imports its own frameworks.

The points: ``first`` after the first array or file is written (the writer's ``progress`` callback; for DCP, which
takes none, DCP's ``_write_item``), ``commit`` just before the rename (``atomic.checked_before_commit``), ``swap``
(over a previous directory only) between moving the previous output aside and renaming the new one into place
(``os.rename`` out of the destination), and ``none``: the write runs to the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optstate import atomic

# How long a paused child sleeps: the runner signals it within milliseconds. Finite, so that a writer that holds
# the signal until a library's own threads are done (as it should) then finishes its write and is cleaned up.
PAUSE_S = 5.0
READY_S = 60.0  # how long the runner waits for a child to reach its point
EXIT_S = 20.0  # how long the runner waits for a signalled child to end


@dataclass(frozen=True)
class Case:
    """One write: ``writer`` (a format name), paused at ``point`` and sent ``signal_name`` (none for ``none``),
    ``over`` a previous output or fresh, writing ``output`` inside its own ``directory``; ``state``: which of the
    writer's two states it writes (``previous``: the output the ``over`` cases start from)."""

    writer: str
    point: str
    signal_name: str
    over: bool
    directory: str
    output: str
    state: str = "new"

    @property
    def id(self) -> str:
        return f"{self.writer}-{self.point}-{self.signal_name or 'completes'}-{'over' if self.over else 'fresh'}"

    @property
    def ready_file(self) -> Path:
        return Path(f"{self.directory}.ready")

    @property
    def out(self) -> Path:
        return Path(self.directory) / self.output


@dataclass(frozen=True)
class Outcome:
    """How a child ended: ``status`` is ``-signum`` for a death by signal, else the exit code (``None``: it was
    killed by the runner as ``hung``); ``reached``: it got to its point (and was signalled; a writer without the
    point, one that replaces a directory in one step, say, runs to its end); ``underway``: a temporary entry was in
    the directory then."""

    status: int | None
    reached: bool
    underway: bool
    hung: str = ""


# ----------------------------------------------------------------------------- the child


def _pause(case: Case) -> None:
    """Say where we are (atomically: the runner reads the pid) and wait for the signal."""
    part = case.ready_file.with_suffix(".part")
    part.write_text(str(os.getpid()))
    os.rename(part, case.ready_file)
    time.sleep(PAUSE_S)


def _once(action: Callable[[], None]) -> Callable[..., None]:
    done: list[bool] = []

    def call(*_: Any) -> None:
        if not done:
            done.append(True)
            action()

    return call


@contextlib.contextmanager
def _paused_at(case: Case) -> Iterator[Callable[[int], None] | None]:
    """Yield the ``progress`` to write with; install the case's other hooks for the block."""
    pause = _once(lambda: _pause(case))
    if case.point == "commit":
        with atomic.checked_before_commit(pause):
            yield None
    elif case.point == "swap":
        rename, exchanged = os.rename, atomic._exchanged

        def aside_then_pause(src: Any, dst: Any, **kw: Any) -> None:
            rename(src, dst, **kw)
            if Path(src) == case.out:  # the previous output moved aside, the new one not yet in place
                pause()

        def swapped_then_pause(a: Path, b: Path) -> bool:
            if exchanged(a, b):  # the new output in place, the previous one where the new one was
                pause()
                return True
            return False

        os.rename = aside_then_pause  # type: ignore[assignment]  # in this child only
        atomic._exchanged = swapped_then_pause  # type: ignore[assignment]
        yield None
    elif case.point == "first" and case.writer == "dcp":  # DCP's writer takes no progress callback
        from torch.distributed.checkpoint import filesystem

        write_item = filesystem._write_item

        def written_then_pause(*args: Any, **kw: Any) -> Any:
            result = write_item(*args, **kw)
            pause()
            return result

        filesystem._write_item = written_then_pause
        yield None
    elif case.point == "first":
        yield pause
    else:
        yield None


def child(case: Case, write: Callable[[Callable[[int], None] | None], None]) -> None:
    """The body of a forked child: ``write(progress)`` paused at the case's point; never returns. Ends as the
    signal ends a Python process: SIGINT's KeyboardInterrupt, once it has unwound, kills it with SIGINT."""
    log = os.open(f"{case.directory}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a forked child inherits its parent's handlers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with _paused_at(case) as progress:
            write(progress)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def fork(case: Case, write: Callable[[Callable[[int], None] | None], None]) -> int:
    """Start ``case`` in a forked child; its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        # JAX's, where the test process ran JAX before (the whole suite): the torch writers' children run no JAX.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        pid = os.fork()
    if pid == 0:
        try:
            child(case, write)
        finally:
            os._exit(1)
    return pid


# ----------------------------------------------------------------------------- the runner


def _status(wait_status: int) -> int:
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def _underway(directory: str) -> bool:
    return any(p.name.endswith(".tmp") for p in Path(directory).iterdir())


@dataclass
class _Running:
    case: Case
    started: float
    signalled: float | None = None
    underway: bool = False
    hung: str = ""


def run(
    cases: Sequence[Case], write_for: Callable[[Case], Callable[..., None]], parallel: int = 8
) -> dict[str, Outcome]:
    """Run ``cases``, ``parallel`` children at a time: fork each, send its signal once it is at its point, and
    record how it ended. A child that never reaches its point, or outlives its signal, is killed and recorded."""
    pending, running, outcomes = list(cases), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            case = pending.pop(0)
            running[fork(case, write_for(case))] = _Running(case, time.monotonic())
        for pid, r in running.items():
            _drive(pid, r)
        for pid in list(running):
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                r = running.pop(pid)
                status = None if r.hung else _status(wait_status)
                outcomes[r.case.id] = Outcome(status, r.signalled is not None, r.underway, r.hung)
        time.sleep(0.01)
    return outcomes


def _drive(pid: int, r: _Running) -> None:
    """Signal a child that is at its point; kill one that is stuck before it, or after its signal."""
    now = time.monotonic()
    if r.hung:
        return
    if r.signalled is None and r.case.point != "none" and r.case.ready_file.exists():
        r.underway = _underway(r.case.directory)
        r.signalled = now
        os.kill(pid, signal.Signals[r.case.signal_name])
    elif r.signalled is None and now - r.started > READY_S:
        r.hung = f"not at its point after {READY_S:.0f} s"
        os.kill(pid, signal.SIGKILL)
    elif r.signalled is not None and now - r.signalled > EXIT_S:
        r.hung = f"still running {EXIT_S:.0f} s after {r.case.signal_name}"
        os.kill(pid, signal.SIGKILL)


def copy_previous(template: Path, cases: Sequence[Case]) -> None:
    """Put the previous output (``template``, written by the same writer) in place for each ``over`` case."""
    for case in cases:
        if case.over:
            copy = shutil.copytree if template.is_dir() else shutil.copy2
            copy(template, case.out)


# ----------------------------------------------------------------------------- the Orbax writers' parent


def _orbax_writer(spec: dict[str, Any]) -> Callable[[Case], Callable[..., None]]:
    """The writes of the JAX side: ``spec["states"]`` names the canonical files of the previous state and the
    new one; imported before any fork, run only in the children."""
    import flax.nnx  # noqa: F401  # imported by the nnx writer: once here, not in every child
    import jax
    import orbax.checkpoint  # noqa: F401

    import optstate.converters.jax.nnx
    import optstate.converters.jax.orbax  # noqa: F401
    from optstate.api import write
    from optstate.schema import load

    jax.config.update("jax_enable_x64", True)
    states = {name: load(path) for name, path in spec["states"].items()}

    def write_for(case: Case) -> Callable[..., None]:
        return lambda progress: write(states[case.state], case.out, case.writer, force=True, progress=progress)

    return write_for


def main(spec_path: str) -> None:
    """Run the cases of the spec (``cases``: :class:`Case` fields; ``templates``: one fresh, complete case per
    writer, the previous output of its ``over`` cases) and write their outcomes to ``spec["results"]``."""
    spec = json.loads(Path(spec_path).read_text())
    write_for = _orbax_writer(spec)
    templates = [Case(**c) for c in spec["templates"]]
    outcomes = run(templates, write_for)
    cases = [Case(**c) for c in spec["cases"]]
    for template in templates:
        if outcomes[template.id].status == 0:
            copy_previous(template.out, [c for c in cases if c.writer == template.writer])
    outcomes.update(run([c for c in cases if c.writer in {t.writer for t in templates}], write_for))
    Path(spec["results"]).write_text(json.dumps({k: asdict(v) for k, v in outcomes.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
