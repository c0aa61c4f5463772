"""Outputs appear whole or not at all: a temporary name in the destination directory, fsync, rename.

``fsync=False`` skips the fsyncs (faster; the output may be lost, never half-written, if the machine
crashes soon after) but still renames atomically.

Before the first rename, the checks a caller registered with :func:`checked_before_commit` run (the
inputs of a conversion are unchanged; the output reads back): one that raises keeps the output from
appearing. SIGTERM and SIGINT during a write remove the temporary files, then end the process as the
signal would have (during a DCP or Orbax save, once the save returns: :func:`signals_held`); only SIGKILL
(or a crash of the machine) leaves a ``.<name>.*.tmp`` behind.

With fsync, a file is written back to disk while it grows (:func:`_written_back_while_writing`); a
conversion's checks of its input run in a thread beside the writing, and the rename waits for them
(:func:`checks_in_background`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import OptstateError

_commit_checks: contextvars.ContextVar[tuple[Callable[[], None], ...]] = contextvars.ContextVar(
    "optstate_commit_checks", default=()
)


@contextlib.contextmanager
def checked_before_commit(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check()`` in every atomic write inside this block, after the output is written (and fsynced)
    and before it is renamed into place: an exception from it removes the output unseen.

    >>> import tempfile, pathlib
    >>> def refuse(): raise OptstateError("the input changed")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with checked_before_commit(refuse), atomic_file(out) as tmp:
    ...     _ = tmp.write_bytes(b"ok")
    Traceback (most recent call last):
    optstate.errors.OptstateError: the input changed
    >>> out.exists(), list(out.parent.iterdir())
    (False, [])
    """
    token = _commit_checks.set((*_commit_checks.get(), check))
    try:
        yield
    finally:
        _commit_checks.reset(token)


class _Background:
    """Checks running in a thread beside a conversion; the first rename waits for them."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="optstate-check")
        self.pending: list[Future] = []
        self.committing = False
        self.cancelled = threading.Event()  # the conversion was interrupted: checks stop at their next block

    def wait(self) -> None:
        """Wait for every check; raise the first one's error (in the order they were started)."""
        self.committing = True  # a check started from here on runs at once: nothing would wait for it
        for future in self.pending:
            future.result()


_background: contextvars.ContextVar[_Background | None] = contextvars.ContextVar("optstate_background", default=None)


@contextlib.contextmanager
def checks_in_background() -> Iterator[None]:
    """Inside the block, :func:`check_soon` runs a check in a thread and returns at once; the first rename of
    an atomic write waits for every such check, and one that raised keeps the output from appearing. A
    conversion checks its input (a checksum of every tensor) while it writes its output, not before.
    When the block fails, a check that failed is the error raised: it is the cause.

    >>> import tempfile, pathlib
    >>> def refuse(): raise OptstateError("the input's checksums differ")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with checks_in_background(), atomic_file(out) as tmp:
    ...     check_soon(refuse)
    ...     _ = tmp.write_bytes(b"ok")
    Traceback (most recent call last):
    optstate.errors.OptstateError: the input's checksums differ
    >>> out.exists()
    False
    """
    background = _Background()
    token = _background.set(background)
    try:
        try:
            yield
        except Exception:
            background.wait()  # a check that failed is the cause: its error is raised instead
            raise
        background.wait()  # a block that renamed nothing still answers for its checks
    except BaseException as exc:
        if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM, also while waiting: not after hashing the rest
            background.cancelled.set()
        raise
    finally:
        _background.reset(token)
        background.pool.shutdown(wait=not background.cancelled.is_set(), cancel_futures=True)


def cancelled() -> bool:
    """Whether the conversion this check runs beside was interrupted (a long check stops early).

    >>> cancelled()
    False
    """
    background = _cancelled_by.get()
    return background is not None and background.cancelled.is_set()


_cancelled_by: contextvars.ContextVar[_Background | None] = contextvars.ContextVar("optstate_cancelled", default=None)


def _run_alone(background: _Background, check: Callable[[], None]) -> None:
    # In the check's own copy of its caller's context: a check it starts runs at once, inside this one.
    _background.set(None)
    _cancelled_by.set(background)
    check()


def checks_deferred() -> bool:
    """Whether :func:`check_soon` runs a check in a thread now (inside :func:`checks_in_background`, before the
    first rename), rather than at once.

    >>> checks_deferred()
    False
    """
    background = _background.get()
    return background is not None and not background.committing


def check_soon(check: Callable[[], None]) -> None:
    """Run ``check()`` in a thread when a rename is ahead that will wait for it (see
    :func:`checks_in_background`); else now.

    >>> check_soon(lambda: print("checked"))
    checked
    """
    background = _background.get()
    if background is None or background.committing:
        check()
    else:  # in the caller's context: a check reads the context variables its caller set
        background.pending.append(background.pool.submit(contextvars.copy_context().run, _run_alone, background, check))


_nested: contextvars.ContextVar[bool] = contextvars.ContextVar("optstate_nested_write", default=False)


@contextlib.contextmanager
def _outermost() -> Iterator[bool]:
    """Whether this atomic write is the outermost one: a write inside another's temporary directory (a
    trainer's optimizer.pt, DCP's staging file) is renamed where nobody looks, and the checks wait for the
    rename that makes the output appear."""
    outermost = not _nested.get()
    token = _nested.set(True)
    try:
        yield outermost
    finally:
        _nested.reset(token)


def _run_commit_checks() -> None:
    background = _background.get()
    if background is not None:
        background.wait()
    for check in _commit_checks.get():
        check()


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM during a write: unwinds through the cleanup, then the process
    ends by the signal. A BaseException, so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


_signal_depth = 0  # nested atomic writes install the handler once


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM raises (SIGINT already raises KeyboardInterrupt), so that the
    ``finally`` clauses remove the temporary files; then the process ends by SIGTERM as it would have.
    Only in the main thread, and only where SIGTERM has its default action (a program that set its own
    handler keeps it)."""
    global _signal_depth
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    install = _signal_depth == 0 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if install:
        signal.signal(signal.SIGTERM, _raise_terminated)
    _signal_depth += 1
    try:
        yield
    except _Terminated:
        if not install:
            raise
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the temporary files are gone: end as SIGTERM ends a process
        raise
    finally:
        _signal_depth -= 1
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


_FLUSH_EVERY = 256 << 20  # bytes a file grows by before it is written back while it is still being written
_FLUSH_POLL_S = 0.05


def _files_under(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from (Path(d, name) for d, _, names in os.walk(path) for name in names)
        else:
            yield path


_write_back = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _flush_behind(paths: Sequence[Path], stop: threading.Event) -> None:
    flushed: dict[Path, int] = {}
    while not stop.wait(_FLUSH_POLL_S):
        for path in _files_under(paths):
            with contextlib.suppress(OSError):  # a file removed or renamed meanwhile: nothing to write back
                fd = os.open(path, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    if size - flushed.get(path, 0) >= _FLUSH_EVERY:
                        _write_back(fd)
                        flushed[path] = size
                finally:
                    os.close(fd)


@contextlib.contextmanager
def _written_back_while_writing(paths: Sequence[Path], fsync: bool) -> Iterator[None]:
    """Write the files at ``paths`` (or under them) back to disk as they grow, from a thread, so that the
    fsync before the rename waits for the last part only. Measured at 3 GB here: the copy and the fsync
    after it took 1.9-2.8 s, the same copy written back as it went 1.2-1.5 s (``cp`` + ``sync``: 1.8-3.3 s);
    the kernel starts writing back by itself only once a tenth of memory is dirty."""
    if not fsync:
        yield
        return
    stop = threading.Event()
    flusher = threading.Thread(target=_flush_behind, args=(paths, stop), name="optstate-flush", daemon=True)
    flusher.start()
    try:
        yield
    finally:
        stop.set()
        flusher.join()


def refuse_symlink(path: Path) -> None:
    """Refuse an output path that is a symbolic link, dangling or not: the rename would replace the link, not
    what it names, and a user who pointed it at a file (the input, say) meant that file.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "link").symlink_to(d / "nowhere")
    >>> refuse_symlink(d / "link")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: .../link is a symbolic link (to .../nowhere); optstate writes a new file, ...
    """
    if path.is_symlink():
        raise OptstateError(
            f"{path} is a symbolic link (to {os.readlink(path)}); optstate writes a new file, never through a link: "
            "remove it or name another path"
        )


def _prepare(path: Path, force: bool) -> None:
    refuse_symlink(path)  # whatever the flags: --force replaces an existing output, never a link's target
    if path.exists() and not force:
        raise OptstateError(f"{path} exists; pass --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(directory, name))
        _fsync_dir(Path(directory))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done, then act (in the main thread; elsewhere nothing is
    held). For steps that must not be cut in two, and for libraries that catch every exception (DCP's
    collectives turn a KeyboardInterrupt into their own error) or write from threads of their own
    (TensorStore's, which would write into a temporary directory already removed).

    >>> try:
    ...     with signals_held():
    ...         signal.raise_signal(signal.SIGINT)
    ...         print("the block ran to its end")
    ... except KeyboardInterrupt:
    ...     print("then Ctrl-C acted")
    the block ran to its end
    then Ctrl-C acted
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: set[int] = set()
    previous: dict[signal.Signals, Any] = {}
    try:
        for held_signal in _HELD:
            if signal.getsignal(held_signal) is not None:  # None: a handler set from C, not ours to replace
                previous[held_signal] = signal.signal(held_signal, lambda signum, _: held.add(signum))
        yield
    finally:
        for held_signal, handler in previous.items():
            signal.signal(held_signal, handler)
        for held_signal in _HELD:  # in this order: SIGTERM first, a preemption handler must run
            if held_signal in held:
                signal.raise_signal(held_signal)


_HELD = (signal.SIGTERM, signal.SIGINT)
_RENAME_EXCHANGE = 2  # renameat2's flag (linux/fs.h): swap two paths in one step
_AT_FDCWD = -100


def _exchanged(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step, where the system can (Linux's ``renameat2``, which Python does not
    expose: ctypes); ``False`` where it cannot, or refuses (an old kernel, a file system without it, a sandbox
    that forbids the call): the caller then renames twice, and reports a real problem itself."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``. An existing directory there is swapped with ``tmp`` in one step (so that
    ``path`` is never absent, even to SIGKILL), then removed; where the system cannot swap, it is moved
    aside and then replaced, SIGTERM and SIGINT held between the two renames."""
    if path.is_dir() and not path.is_symlink():
        if _exchanged(tmp, path):  # the previous output is at tmp now, removed with what holds it
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        try:
            with signals_held():  # a held signal acts on leaving: after the previous output is back, or gone
                os.rename(path, aside / path.name)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(aside / path.name, path)
                    raise
        finally:
            if not (aside / path.name).exists() or path.exists():  # never the only copy of the previous output
                shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _renamed_in_order(moves: list[tuple[Path, Path]], fsync: bool) -> None:
    """Rename each ``(tmp, path)``, the last once the others are in place; signals wait until the last is. A
    failure before the last rename removes the parts renamed to names that were free, so no shard without
    its index is left behind."""
    *parts, last = moves
    placed: list[Path] = []
    committed = False
    try:
        with signals_held():
            for tmp, path in parts:
                free = not path.exists()
                _replace(tmp, path)
                if free:
                    placed.append(path)
            if fsync:
                for directory in {path.parent for _, path in parts}:
                    _fsync_dir(directory)
            _replace(*last)
            committed = True
    except BaseException:
        if not committed:
            for path in placed:
                path.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(last[1].parent)


@contextlib.contextmanager
def atomic_files(
    paths: Sequence[str | os.PathLike], *, force: bool = False, fsync: bool = True
) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; on success fsync them, then rename them in order.

    The last path is the commit point: it is renamed only once the others are in place (and, with
    ``fsync``, durably so), so a reader that finds it (an index) finds everything it names. On an
    error every temporary file is removed and no path is touched.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_files([d / "part", d / "index"]) as (part, index):
    ...     _ = part.write_bytes(b"data"); _ = index.write_bytes(b"part")
    >>> sorted(p.name for p in d.iterdir())
    ['index', 'part']
    """
    targets = [Path(p) for p in paths]
    for path in targets:
        _prepare(path, force)
    tmps: list[Path] = []
    with _cleanup_on_signals():
        yield from _written_then_renamed(targets, tmps, fsync)


def _written_then_renamed(targets: list[Path], tmps: list[Path], fsync: bool) -> Iterator[list[Path]]:
    try:
        for path in targets:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(name))
        with _written_back_while_writing(tmps, fsync), _outermost() as outermost:
            yield tmps
        if fsync:
            for tmp in tmps:
                _fsync_file(tmp)
        if outermost:
            _run_commit_checks()
        _renamed_in_order(list(zip(tmps, targets, strict=True)), fsync)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with atomic_file(out) as tmp:
    ...     _ = tmp.write_bytes(b"ok")
    >>> out.read_bytes()
    b'ok'
    """
    with atomic_files([path], force=force, fsync=fsync) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    read_back: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory path (not yet created) beside ``path``; rename it on success.
    ``read_back(tmp)``, the writer's check of what it wrote, runs once the directory is written and fsynced and
    the commit checks passed, just before the rename: an error from it removes the directory unseen.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "d"
    >>> with atomic_directory(out, fsync=False) as tmp:
    ...     tmp.mkdir(); _ = (tmp / "f").write_text("ok")
    >>> (out / "f").read_text()
    'ok'
    """
    path = Path(path)
    _prepare(path, force)
    with _cleanup_on_signals():
        parent = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp = parent / path.name
        yield from _directory_written_then_renamed(path, parent, tmp, fsync, read_back)


def _directory_written_then_renamed(
    path: Path, parent: Path, tmp: Path, fsync: bool, read_back: Callable[[Path], None] | None
) -> Iterator[Path]:
    try:
        # The parent: Orbax writes a sibling of tmp and renames it to tmp only once it is whole.
        with _written_back_while_writing([parent], fsync), _outermost() as outermost:
            yield tmp
        if fsync:
            _fsync_tree(tmp)
        if outermost:
            _run_commit_checks()
        if read_back is not None:  # last: nothing of this process writes to it any more
            read_back(tmp)
        _replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
