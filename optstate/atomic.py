"""Outputs appear whole or not at all: a temporary name in the destination directory, fsync, rename.

``fsync=False`` skips the fsyncs (faster; the output may be lost, never half-written, if the machine
crashes soon after) but still renames atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OptstateError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing directory there is moved aside first, then removed."""
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, aside / path.name)
        os.rename(tmp, path)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, path)


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
    try:
        for path in targets:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(name))
        yield tmps
        if fsync:
            for tmp in tmps:
                _fsync_file(tmp)
        *parts, last = zip(tmps, targets, strict=True)
        for tmp, path in parts:
            _replace(tmp, path)
        if fsync:
            for directory in {path.parent for _, path in parts}:
                _fsync_dir(directory)
        _replace(*last)
        if fsync:
            _fsync_dir(last[1].parent)
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
def atomic_directory(path: str | os.PathLike, *, force: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary directory path (not yet created) beside ``path``; rename it on success.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "d"
    >>> with atomic_directory(out, fsync=False) as tmp:
    ...     tmp.mkdir(); _ = (tmp / "f").write_text("ok")
    >>> (out / "f").read_text()
    'ok'
    """
    path = Path(path)
    _prepare(path, force)
    parent = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = parent / path.name
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        _replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
