"""Arrays mapped from files: where their bytes lie (:func:`file_span`), copied file to file inside the
kernel (:func:`copy_span`), or read with ``pread`` (:func:`file_blocks`, :func:`values_read`) instead of through
the mapping, so that a file truncated under a reader is an error naming it, not a SIGBUS.

NumPy only. The writers (:mod:`optstate.schema.fileformat`, :mod:`optstate.converters.torch.ptfile`) and the
state's check of its moments' values use it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..atomic import cancelled
from ..errors import FormatError, OptstateError

COPY_MIN_BYTES = 1 << 20  # smaller tensors are written from memory: a syscall or two either way
MAX_SYSCALL_BYTES = 1 << 30
# errno values with which copy_file_range/sendfile say "not between these files", not "failed"
_NOT_SUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTSOCK}


@dataclass(frozen=True)
class FileSpan:
    """An array's bytes in a file: from byte ``offset`` of ``path``; ``file_id`` is its (st_dev, st_ino)."""

    path: str
    offset: int
    file_id: tuple[int, int]


class FileMapping(NamedTuple):
    """A shared mapping of a file in this process: its addresses, the file offset it starts at, the file."""

    start: int
    end: int
    offset: int
    file_id: tuple[int, int]
    path: str


def shared_file_mappings() -> list[FileMapping]:
    """This process's shared file mappings, by address (``/proc/self/maps``; none where it does not exist).

    Only shared mappings: their memory is the file's page cache, so the file holds what the array
    holds. A private mapping (``np.memmap(mode="c")``, ``torch.load(mmap=True)``) may differ.
    """
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1][3:4] == b"s":
            addresses, _, offset, device, inode, path = fields
            start, end = (int(a, 16) for a in addresses.split(b"-"))
            major, minor = (int(d, 16) for d in device.split(b":"))
            mappings.append(
                FileMapping(start, end, int(offset, 16), (os.makedev(major, minor), int(inode)), os.fsdecode(path))
            )
    return mappings


def _views_an_mmap(array: np.ndarray) -> bool:
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


def file_span(array: np.ndarray, mappings: Sequence[FileMapping] | None = None) -> FileSpan | None:
    """Where ``array``'s bytes lie in a file, when it is a C-contiguous view of a shared ``mmap.mmap``
    (an ``np.memmap`` in mode ``"r"`` or ``"r+"``, any slice or view of one); else ``None``.

    The offset comes from the address of the data within this process's mapping of the file, not
    from ``np.memmap.offset`` (which a slice inherits unchanged); the file must still be the one
    mapped (not replaced since under the same name). ``mappings``: a snapshot taken while
    ``array`` existed (default: read now).

    >>> import tempfile, numpy as np
    >>> f = tempfile.mkdtemp() + "/a.bin"; np.arange(10, dtype="<i4").tofile(f)
    >>> m = np.memmap(f, dtype="<i4", mode="r")
    >>> file_span(m[3:]).offset, file_span(m[::2]), file_span(np.arange(3))
    (12, None, None)
    """
    if not array.flags.c_contiguous or array.nbytes == 0 or not _views_an_mmap(array):
        return None
    address = array.ctypes.data
    mappings = shared_file_mappings() if mappings is None else mappings
    i = bisect.bisect_right(mappings, address, key=lambda m: m.start) - 1
    if i < 0 or address + array.nbytes > mappings[i].end:
        return None
    mapping = mappings[i]
    try:
        stat = os.stat(mapping.path)
    except OSError:  # "(deleted)", or gone since
        return None
    if (stat.st_dev, stat.st_ino) != mapping.file_id:
        return None
    return FileSpan(mapping.path, mapping.offset + address - mapping.start, mapping.file_id)


class Recorded(NamedTuple):
    """What a file records of a range of its own bytes: a torch zip's CRC-32 of a record, a canonical file's
    XXH3-64 of a tensor. A writer that copies exactly that range checks its read-back against it, instead of
    reading the source a second time to hash it."""

    crc32: int | None = None
    xxh3: str | None = None


# By file identity; each table lives as long as the mapping it was noted with (note_recorded).
_recorded: dict[tuple[int, int], tuple[object, dict[tuple[int, int], Recorded]]] = {}


def note_recorded(mapped: np.ndarray, table: dict[tuple[int, int], Recorded]) -> None:
    """Note ``table``, ``(offset in the file, nbytes) -> Recorded``, for the file ``mapped`` maps (an ``np.memmap``
    of it), for :func:`recorded`; entries added to the dict later count too. Forgotten when ``mapped`` is
    collected, or when another mapping of the same file is noted.

    >>> import tempfile, zlib
    >>> f = tempfile.mkdtemp() + "/c.bin"; np.arange(4, dtype="<i4").tofile(f)
    >>> m = np.memmap(f, np.uint8, mode="r")
    >>> note_recorded(m, {(4, 8): Recorded(crc32=zlib.crc32(bytes(m[4:12])))})
    >>> recorded(file_span(m[4:12]), 8).crc32 == zlib.crc32(bytes(m[4:12])), recorded(file_span(m[4:]), 12)
    (True, None)
    """
    span = file_span(mapped)
    if span is None:
        return
    token = object()
    _recorded[span.file_id] = (token, table)
    weakref.finalize(mapped, _forget_recorded, span.file_id, token)


def _forget_recorded(file_id: tuple[int, int], token: object) -> None:
    if _recorded.get(file_id, (None,))[0] is token:
        del _recorded[file_id]


def recorded(span: FileSpan, nbytes: int) -> Recorded | None:
    """What the file of ``span`` records of its ``nbytes`` bytes there (:func:`note_recorded`), if anything."""
    _, table = _recorded.get(span.file_id, (None, {}))
    return table.get((span.offset, nbytes))


def _copy_file_range(src: int, out: int, offset: int, count: int) -> int:
    return os.copy_file_range(src, out, min(count, MAX_SYSCALL_BYTES), offset)


def _sendfile(src: int, out: int, offset: int, count: int) -> int:
    return os.sendfile(out, src, offset, min(count, MAX_SYSCALL_BYTES))


class SourceFiles:
    """The files that mapped arrays are copied from in one write, each opened once and checked to be the file
    that was mapped (not replaced since under its name); closed when the block ends. Opening a file for each
    tensor took a tenth of converting 3 GB here (573 tensors)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[int, int], int | None] = {}

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def fd(self, span: FileSpan) -> int | None:
        """A descriptor of ``span``'s file, ``None`` where it is gone or another file now."""
        if span.file_id not in self._fds:
            self._fds[span.file_id] = _opened_if_same(span)
        return self._fds[span.file_id]


def _opened_if_same(span: FileSpan) -> int | None:
    try:
        fd = os.open(span.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        found = os.fstat(fd)
    except OSError:
        found = None
    if found is None or (found.st_dev, found.st_ino) != span.file_id:  # replaced since file_span looked
        os.close(fd)
        return None
    return fd


def copy_span(span: FileSpan, out: int, nbytes: int, sources: SourceFiles) -> int:
    """Copy ``nbytes`` from ``span`` to ``out`` (at its position) inside the kernel: ``copy_file_range``,
    else ``sendfile``. Returns how many bytes it copied; the caller writes the rest from memory."""
    src = sources.fd(span)
    if src is None:
        return 0
    done = 0
    for copy in (_copy_file_range, _sendfile):
        try:
            while done < nbytes:
                copied = copy(src, out, span.offset + done, nbytes - done)
                if copied == 0:  # the end of the file, or a file system that copies nothing where it cannot
                    break
                done += copied
        except (OSError, AttributeError) as exc:  # AttributeError: no os.copy_file_range here
            if isinstance(exc, OSError) and exc.errno not in _NOT_SUPPORTED:
                raise
            continue
        if done == nbytes:
            return done
        if os.fstat(src).st_size < span.offset + nbytes:
            raise FormatError(
                f"{span.path}: ends before byte {span.offset + nbytes} of an array "
                "mapped from it (the file shrank while mapped)"
            )
    return done


_HASH_CHUNK = 1 << 20  # one buffer this large: 3 GB hashed in 0.36-0.48 s at 256 KiB to 4 MiB, checked for NaN in
# 0.42 s at 1 MiB against 0.48-0.84 s at 256 KiB (NumPy's calls per block); no page faults either way


def file_blocks(
    path: str | os.PathLike, offset: int, nbytes: int, what: str, fd: int | None = None
) -> Iterator[memoryview]:
    """The ``nbytes`` bytes at ``offset`` of the file at ``path``, a block at a time, read with ``pread`` into one
    buffer (each block is valid until the next): a file that shrank gives an error naming ``what``, not the
    SIGBUS a mapping would. ``fd``: that file already open (``pread`` moves no position: it may be shared).

    >>> import tempfile, pathlib
    >>> f = tempfile.mkdtemp() + "/b"; _ = pathlib.Path(f).write_bytes(b"abcdef")
    >>> [bytes(block) for block in file_blocks(f, 1, 4, "the letters")]
    [b'bcde']
    """
    buffer = memoryview(bytearray(min(_HASH_CHUNK, nbytes)))
    with contextlib.ExitStack() as opened:
        if fd is None:
            fd = opened.enter_context(open(path, "rb", buffering=0)).fileno()
        done = 0
        while done < nbytes:
            if cancelled():  # a check beside a conversion that was interrupted: not to the end of the file
                raise OptstateError(f"{os.fspath(path)}: reading {what} was interrupted")
            n = os.preadv(fd, [buffer[: min(len(buffer), nbytes - done)]], offset + done)
            if n == 0:
                raise FormatError(f"{os.fspath(path)}: ends before byte {offset + nbytes} of {what}")
            yield buffer[:n]
            done += n


def values_read(array: np.ndarray, mappings: Sequence[FileMapping], what: str) -> Iterator[np.ndarray]:
    """``array``'s values a block at a time: read from its file with ``pread`` where it is mapped from one (flat;
    a file truncated meanwhile is an error naming it and ``what``, not a SIGBUS), else the array itself.

    >>> import tempfile
    >>> f = tempfile.mkdtemp() + "/v.bin"; np.arange(4.0).tofile(f)
    >>> m = np.memmap(f, dtype="<f8", mode="r")
    >>> [block.tolist() for block in values_read(m[1:], shared_file_mappings(), "v")]
    [[1.0, 2.0, 3.0]]
    """
    span = file_span(array, mappings)
    if span is None:
        yield array
        return
    for block in file_blocks(span.path, span.offset, array.nbytes, what):
        if len(block) % array.dtype.itemsize:  # a file that ends inside a value: the next read finds its end
            raise FormatError(f"{span.path}: ends before byte {span.offset + array.nbytes} of {what}")
        yield np.frombuffer(block, array.dtype)


def read_into_memory(
    array: np.ndarray, mappings: Sequence[FileMapping], what: str, sources: SourceFiles | None = None
) -> np.ndarray:
    """``array`` itself, or where it is mapped from a file, a copy of it read with ``pread`` (for code that reads
    every element, a transpose: a file truncated meanwhile is then an error naming it and ``what``, not a SIGBUS).
    ``sources``: the files of a write, opened once for all its arrays.

    >>> import tempfile
    >>> f = tempfile.mkdtemp() + "/r.bin"; np.arange(4.0).tofile(f)
    >>> m = np.memmap(f, dtype="<f8", mode="r")
    >>> copy = read_into_memory(m[1:], shared_file_mappings(), "r"); copy.tolist(), isinstance(copy, np.memmap)
    ([1.0, 2.0, 3.0], False)
    """
    span = file_span(array, mappings)
    if span is None:
        return array
    out = np.empty(array.shape, array.dtype)
    into, done = out.reshape(-1).view(np.uint8).data, 0
    with contextlib.ExitStack() as opened:
        fd = None if sources is None else sources.fd(span)
        if fd is None:
            fd = opened.enter_context(open(span.path, "rb", buffering=0)).fileno()
        while done < array.nbytes:
            n = os.preadv(fd, [into[done : done + MAX_SYSCALL_BYTES]], span.offset + done)
            if n == 0:
                raise FormatError(f"{span.path}: ends before byte {span.offset + array.nbytes} of {what}")
            done += n
    return out
