"""The read-back of the files a directory output holds, before its rename, shared by every directory writer.

A writer takes a record of each file as it writes it (:class:`Written`: a text or bytes file's size and XXH3-64,
:func:`written_bytes`; a safetensors file's header checksums and its tensors' dtypes and shapes,
:func:`written_safetensors`; a torch file's records, their sizes and XXH3-64s, :func:`written_torch`), and its
``read_back`` (:func:`optstate.atomic.atomic_directory`) compares each file with its record
(:func:`check_files`; the directory's list of files too, :func:`read_back_directory`). A difference is refused
naming the file under the output's name (:func:`in_destination`), never the temporary one the user never saw.

The format-specific checks stay with their formats: Orbax's arrays read with TensorStore
(:func:`.jax.orbax.read_back_orbax`), DCP's ``.metadata`` and blobs (:func:`.torch.dcp.read_back_dcp`).

NumPy and xxhash only at module level, so that the torch side and the JAX side both import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ..errors import FormatError, OptstateError
from ..schema.fileformat import CHECKSUM_KEY, file_checksums, read_safetensors

__all__ = [
    "Written",
    "check_files",
    "first_difference",
    "in_destination",
    "read_back_directory",
    "written_bytes",
    "written_safetensors",
    "written_torch",
]


@dataclass(frozen=True)
class Written:
    """One file of a directory as it was written: its ``kind`` (``"bytes"``, ``"safetensors"`` or ``"torch"``,
    which says how it is checked) and its ``record`` (what the check compares the file with).

    >>> Written("bytes", (2, "0" * 16)).kind
    'bytes'
    """

    kind: str
    record: Any


def written_bytes(data: bytes) -> Written:
    """The record of a text or bytes file written with ``data``: its size and XXH3-64.

    >>> written_bytes(b"{}").record  # doctest: +ELLIPSIS
    (2, '...')
    """
    return Written("bytes", (len(data), xxhash.xxh3_64_hexdigest(data)))


def written_safetensors(path: str | os.PathLike) -> Written:
    """The record of a safetensors file just written (and read back by its writer): the checksums its header
    records, and its tensors' dtypes and shapes.

    >>> import tempfile, numpy as np
    >>> from optstate.schema.fileformat import write_safetensors
    >>> p = Path(tempfile.mkdtemp()) / "b.safetensors"
    >>> write_safetensors(p, [("w", np.zeros(2))], {}, fsync=False)
    >>> written_safetensors(p).record[1]
    {'w': ('<f8', (2,))}
    """
    arrays, metadata = read_safetensors(Path(path), verify=False)
    return Written("safetensors", (metadata.get(CHECKSUM_KEY), _layout(arrays)))


def written_torch(records: Mapping[str, tuple[int, str]]) -> Written:
    """The record of a torch file: what :func:`.torch.ptfile.save` returns, each zip record's size and XXH3-64.

    >>> written_torch({"archive/data.pkl": (10, "0" * 16)}).kind
    'torch'
    """
    return Written("torch", dict(records))


def first_difference(found: Mapping[str, Any], written: Mapping[str, Any]) -> str:
    """The first name (in sorted order) whose entry differs between what reads back and what was written, one
    side lacking it included; for a message that names it. ``found`` and ``written`` must differ.

    >>> first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4})
    'b'
    """
    return next(k for k in sorted(set(found) | set(written)) if found.get(k) != written.get(k))


def _layout(arrays: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {key: (a.dtype.str, a.shape) for key, a in arrays.items()}


def _check_bytes(path: Path, written: tuple[int, str], where: str) -> None:
    size, expected = written
    found = path.stat().st_size
    if found != size:
        raise FormatError(f"{where}: reads back with {found} bytes, written with {size}")
    actual = file_checksums(path, {"": (0, size)})[""]
    if actual != expected:
        raise FormatError(
            f"{where}: reads back with checksum {actual}, written with {expected} "
            "(the file changed between its write and the directory's rename)"
        )


def _check_safetensors(path: Path, written: tuple[str | None, dict], where: str) -> None:
    checksums, layout = written
    arrays, metadata = read_safetensors(path, verify=True)  # every tensor against the header's checksum
    found = _layout(arrays)
    if found != layout:
        key = first_difference(found, layout)
        raise FormatError(
            f"{where}: tensor {key!r} reads back as {found.get(key, 'missing')}, written as {layout.get(key, 'absent')}"
        )
    if metadata.get(CHECKSUM_KEY) != checksums:
        raise FormatError(f"{where}: the header reads back with other checksums than were written")


def _check_torch(path: Path, written: Mapping[str, tuple[int, str]], where: str) -> None:
    # Imported here: this module is imported by the JAX side too, which never imports the torch side's modules
    # at module level (ptfile itself is NumPy only).
    from .torch.ptfile import verify_written

    verify_written(path, written, where)


# How each kind of file is checked at the directory's read-back: its record (taken once it is written) is compared
# with what the file holds then.
_CHECKS: Mapping[str, Callable[[Path, Any, str], None]] = {
    "bytes": _check_bytes,
    "safetensors": _check_safetensors,
    "torch": _check_torch,
}


def in_destination(exc: OptstateError, tmp: Path, destination: Path) -> str:
    """An error's message with the temporary directory's path replaced by the output's (what the user named).

    >>> in_destination(OptstateError("/d/.out.x.tmp/out/a.pt: bad"), Path("/d/.out.x.tmp/out"), Path("/d/out"))
    '/d/out/a.pt: bad'
    """
    return str(exc).replace(os.fspath(tmp), os.fspath(destination))


def check_files(directory: Path, written: Mapping[str, Written], destination: Path) -> None:
    """Each file of ``written`` (its name relative to ``directory``) holds what it was written with; the first
    difference is refused naming the file under ``destination`` and what differs. Other files of ``directory``
    are not looked at (:func:`read_back_directory` refuses them).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.json").write_text("{}")
    >>> check_files(d, {"a.json": written_bytes(b"{}")}, Path("out"))
    >>> check_files(d, {"a.json": written_bytes(b"{ }")}, Path("out"))
    Traceback (most recent call last):
    optstate.errors.FormatError: out/a.json: reads back with 2 bytes, written with 3
    """
    for name, file in written.items():
        try:
            _CHECKS[file.kind](directory / name, file.record, os.fspath(destination / name))
        except FormatError as exc:
            raise FormatError(in_destination(exc, directory, destination)) from None


def read_back_directory(tmp: Path, written: Mapping[str, Written], destination: Path) -> None:
    """Read back a directory written whole, before it is renamed to ``destination``: it holds exactly the files
    ``written``, each as written (:func:`check_files`). The first difference is refused naming the file (under
    ``destination``) and what differs.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.json").write_text("{}")
    >>> read_back_directory(d, {"a.json": written_bytes(b"{}")}, Path("out"))
    >>> _ = (d / "a.json").write_text("[]")
    >>> read_back_directory(d, {"a.json": written_bytes(b"{}")}, Path("out"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: out/a.json: reads back with checksum ..., written with ... (the file changed ...
    """
    found = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir()}
    if found != set(written):
        odd = sorted(found ^ set(written))
        raise FormatError(
            f"{destination}: the directory written reads back with other files than were written "
            f"({', '.join(f'{n} ' + ('added' if n in found else 'missing') for n in odd[:3])})"
        )
    check_files(tmp, written, destination)
