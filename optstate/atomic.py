"""Outputs appear whole or not at all: a temporary name in the destination directory, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OptstateError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OptstateError(f"{path} exists; pass --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
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
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with atomic_file(out) as tmp:
    ...     _ = tmp.write_bytes(b"ok")
    >>> out.read_bytes()
    b'ok'
    """
    path = Path(path)
    _prepare(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory path (not yet created) beside ``path``; rename it on success."""
    path = Path(path)
    _prepare(path, force)
    parent = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = parent / path.name
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, path)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
