"""Read and write ``torch.save`` files without torch: a restricted unpickler, tensors memory-mapped from
the file; a writer that streams one tensor at a time.

Since torch 1.6 a ``torch.save`` file is a zip archive: ``<archive>/data.pkl`` pickles the object,
with each tensor storage replaced by a persistent id; ``<archive>/data/<key>`` holds that storage's
raw bytes, uncompressed and 64-byte aligned; ``<archive>/byteorder`` says how they were written.

The pickle is run by a small interpreter of our own, not by :mod:`pickle`: it knows the opcodes
``torch.save`` writes and the globals a model, optimizer or scheduler ``state_dict`` holds, each
mapped to a function here that builds plain data (a NumPy array, an ``OrderedDict``, ...). Any other
global, or a call of anything that is not one of those, is refused by name; nothing from the file
is imported or called. It admits a subset of what ``torch.load(weights_only=True)`` admits.

:func:`save` writes the same format as torch's own writer lays it out, so that ``torch.load`` (with
``mmap=True`` too, and when it computes storage offsets instead of reading them) loads it: the pickle
first (it needs only each tensor's shape and dtype), then each tensor's storage as it is produced, its
CRC-32 and XXH3-64 computed as it is written, then the zip's central directory. Before the rename the
file is read back (:func:`verify_written`): its zip directory with the reader here, then every record's
bytes against the checksum taken as they were written.

Imports NumPy and xxhash only (ml_dtypes for a bfloat16 or float8 tensor).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import threading
import uuid
import warnings
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import xxhash
from isal.isal_zlib import crc32  # ISA-L's, as in schema/fileformat.py
from numpy.lib.stride_tricks import as_strided

from ...atomic import atomic_file
from ...errors import FormatError, UnsupportedError
from ...schema.fileformat import (
    file_checksums,
    file_crc32_xxh3,
    little_endian_bytes,
    refuse_special_file,
    write_all,
)
from ...schema.mapped import (
    COPY_MIN_BYTES,
    Recorded,
    SourceFiles,
    copy_span,
    file_span,
    note_recorded,
    read_into_memory,
    recorded,
    shared_file_mappings,
)
from ...schema.state import numpy_dtype

# torch's dtype names, which are NumPy's and ml_dtypes' names of the same types.
DTYPE_NAMES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "complex128",
    "complex64",
)

_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}

# The start of a torch < 1.6 file: pickle protocol 2, then LONG1 of torch's magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length


def record_data_start(fd: int, header_offset: int) -> int | None:
    """Where a zip record's bytes start in the file open as ``fd``: after its local header at ``header_offset``,
    whose name and extra field may differ in length from the central directory's; ``None`` where no local
    header is there.

    >>> import tempfile, zipfile
    >>> f = tempfile.mkdtemp() + "/z.zip"
    >>> with zipfile.ZipFile(f, "w") as z: z.writestr("ab", b"data")
    >>> with open(f, "rb") as opened: record_data_start(opened.fileno(), 0), record_data_start(opened.fileno(), 1)
    (32, None)
    """
    header = os.pread(fd, _LOCAL_HEADER.size, header_offset)
    if len(header) < _LOCAL_HEADER.size:
        return None
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        return None
    return header_offset + _LOCAL_HEADER.size + name_length + extra_length


_END_RECORD = struct.Struct("<4s16xH")  # the zip's end of central directory: signature, ..., comment length
_MAX_END_SEARCH = _END_RECORD.size + 0xFFFF  # the end record lies in the last 22 bytes plus a comment at most
# The most a small record (data.pkl, byteorder) may hold, inflated or not: a state_dict's pickle of a
# million parameters is tens of MB; a DEFLATE record declaring more is a bomb, refused before inflating.
MAX_RECORD_BYTES = 1 << 30


@dataclass(frozen=True)
class _StorageType:
    """What a persistent id says a storage holds: elements of ``dtype``, or bytes (``None``, untyped)."""

    dtype: np.dtype | None


def _typed_storage(name: str) -> _StorageType:
    return _StorageType(numpy_dtype(name))


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype | None
    numel: int


@dataclass(frozen=True)
class _Function:
    """An admitted global that the pickle may call: ``name`` as torch spells it."""

    name: str


@dataclass(frozen=True)
class _Class:
    """A global of another library, named but never imported (``load(records=True)``)."""

    module: str
    name: str


@dataclass(eq=False)
class Record:
    """An object of a class optstate does not import (a trainer's arguments, a loss scaler, an enum), as its
    pickle describes it: the class's ``module`` and ``name``, the ``args`` it was built from (``REDUCE``,
    ``NEWOBJ``) and the ``state`` it was given (``BUILD``: usually its ``__dict__``). Nothing of the class
    is imported or run; a reader takes the fields it knows. Not frozen: the pickle may refer to the
    object (memo) before its state arrives.

    >>> r = Record("transformers.trainer_utils", "SchedulerType", ("cosine",))
    >>> r.value, r.get("warmup_steps", 0)
    ('cosine', 0)
    """

    module: str
    name: str
    args: tuple = ()
    state: Any = None

    @property
    def value(self) -> Any:
        """An enum member's value (its one constructor argument)."""
        return self.args[0] if len(self.args) == 1 else None

    def get(self, field: str, default: Any = None) -> Any:
        """The field ``field`` of the object's state (its ``__dict__``), or ``default``."""
        return self.state.get(field, default) if isinstance(self.state, dict) else default


# ----------------------------------------------------------------------------- public


def load(path: str | os.PathLike, *, records: bool = False) -> Any:
    """The object a ``torch.save`` file holds, tensors as read-only NumPy arrays mapped from the file.

    ``torch.nn.Parameter`` and ``torch.Tensor`` become ``np.ndarray`` (bfloat16 and float8 through
    ml_dtypes), views of one storage share memory, ``torch.Size`` becomes a tuple. A global that a
    ``state_dict`` does not hold is refused with a :class:`FormatError` naming it, before anything runs;
    with ``records=True`` (for trainers' files, which pickle their own classes) an object of such a
    class becomes an inert :class:`Record` instead, its class neither imported nor run.

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/t.pt"
    >>> torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "step": torch.tensor(3.0)}, path)
    >>> d = load(path)
    >>> d["w"].tolist(), d["w"].flags.writeable, d["step"].shape
    ([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], False, ())
    """
    source = os.fspath(path)
    refuse_special_file(source)
    if not os.path.isfile(source):
        raise FormatError(f"{source}: no such file")
    archive = _Archive(source)
    return _Unpickler(archive, records=records).load()


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, tuple[int, str]]:
    """Write ``obj`` as a ``torch.save`` file, atomically, one tensor at a time; no torch needed. Returns what
    was written and read back: ``record name -> (size, XXH3-64 of its bytes)`` (see :func:`verify_written`).

    ``obj`` nests dicts (``Counter`` and ``OrderedDict`` kept), lists and tuples of ``None``, bools,
    ints, floats, strings and arrays: NumPy arrays or lazy array-likes (``.shape``, ``.dtype`` and
    ``__array__()``), each materialised just before its storage is written and released after. Each
    array becomes a contiguous tensor with a storage of its own (bfloat16 and float8 through
    ml_dtypes). ``progress(nbytes)`` is called after each tensor. ``torch.load(path, weights_only=True)``
    loads the file, ``mmap=True`` too.

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/t.pt"
    >>> _ = save({"w": np.arange(6.0).reshape(2, 3), "step": 3, "betas": (0.9, 0.999)}, path)
    >>> d = torch.load(path, weights_only=True)
    >>> d["w"].tolist(), d["step"], d["betas"]
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 3, (0.9, 0.999))
    """
    pickler = _Pickler()
    data_pkl = pickler.dumps(obj)
    # Not "wb": ext4 starts writing back, on close, a file that was truncated to zero and rewritten.
    with (
        atomic_file(path, force=force, fsync=fsync) as tmp,
        open(tmp, "r+b", buffering=0) as f,
        SourceFiles() as sources,  # closed after the threads that read them are done
        ThreadPoolExecutor(2) as reading_back,
    ):
        archive = _ZipWriter(f.fileno(), tmp, reading_back, sources)
        for name, data in (
            ("data.pkl", data_pkl),
            (".format_version", b"1"),
            (".storage_alignment", str(_ALIGNMENT).encode()),
            ("byteorder", b"little"),
        ):
            archive.write_bytes(name, data)
        for tensor in pickler.tensors:
            archive.write_tensor(tensor)
            if progress is not None:
                progress(tensor.nbytes)
        archive.write_bytes("version", b"3\n")  # what torch 2.x writes
        archive.write_bytes(".data/serialization_id", f"{uuid.uuid4().int % 10**40:040d}".encode())
        archive.finish()
        try:
            read_back = archive.read_back()
        except FormatError as exc:
            raise FormatError(f"{os.fspath(path)}: the file written does not read back: {exc}") from None
        verify_written(tmp, archive.written, path, read_back)
    return archive.written


def verify_written(
    path: str | os.PathLike,
    written: Mapping[str, tuple[int, str]],
    destination: str | os.PathLike,
    read_back: Mapping[str, tuple[int, str]] | None = None,
) -> None:
    """Read back a torch file just written, before it is renamed into place: its zip directory reads with
    :func:`load`'s reader and lists exactly the ``written`` records (``name -> (size, XXH3-64 of the bytes
    written)``), each stored, of that size, its bytes with that checksum (streamed with ``pread``, one
    buffer). Catches another process, or a bad disk, changing the file before its records are read back (as
    they are written, with ``read_back``; else now, before the rename). ``read_back``:
    ``name -> (offset, XXH3-64)`` of records already read back from the file as they were written (the
    directory must place them at those offsets); the others are read now.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "t.pt"
    >>> _ = save({"w": np.arange(3.0)}, out)
    >>> verify_written(out, {"archive/data.pkl": (1, "0" * 16)}, out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: .../t.pt: the file written reads back with other records than were written ...
    """
    where = os.fspath(destination)
    try:
        archive = _Archive(os.fspath(path))
        spans = {name: archive.data_span(name) for name in written}
    except FormatError as exc:
        raise FormatError(f"{where}: the file written does not read back: {exc}") from None
    sizes = {name: info.file_size for name, info in archive.members.items()}
    if sizes != {name: size for name, (size, _) in written.items()}:
        raise FormatError(
            f"{where}: the file written reads back with other records than were written "
            f"({sorted(set(sizes) ^ set(written)) or 'the same names, other sizes'})"
        )
    read_back = read_back or {}
    moved = sorted(name for name, (offset, _) in read_back.items() if spans.get(name, (offset,))[0] != offset)
    if moved:
        raise FormatError(f"{where}: the file written reads back with records at other offsets: {moved}")
    try:
        actuals = {name: digest for name, (_, digest) in read_back.items() if name in spans}
        actuals.update(file_checksums(path, {name: span for name, span in spans.items() if name not in actuals}))
    except FormatError as exc:
        raise FormatError(f"{where}: the file written does not read back: {exc}") from None
    for name, (_, expected) in written.items():
        if actuals[name] != expected:
            raise FormatError(
                f"{where}: record {name} reads back with checksum {actuals[name]}, written with {expected} "
                "(the file changed between its write and its rename)"
            )


# ----------------------------------------------------------------------------- the zip archive


# What zipfile raises on malformed bytes (found by fuzzing): NotImplementedError for an unknown version or
# method, RuntimeError for an encrypted record, struct.error and OverflowError for fields out of range.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    struct.error,
    OverflowError,
    KeyError,
)


def _unreadable(source: str, detail: str) -> FormatError:
    return FormatError(f"{source}: not a readable torch checkpoint (truncated or corrupted?): {detail}")


class _Archive:
    """The records of a torch zip checkpoint and its storages, mapped from the file once."""

    def __init__(self, source: str):
        self.source = source
        try:
            zf = zipfile.ZipFile(source)
        except zipfile.BadZipFile as exc:
            raise self._not_zip(exc) from None
        except _ZIP_ERRORS as exc:
            raise _unreadable(source, str(exc) or type(exc).__name__) from None
        with zf:
            self.members = {info.filename: info for info in zf.infolist()}
            self._refuse_bytes_outside_records()
            self.prefix = self._prefix()
            byteorder = self.prefix + "byteorder"
            try:
                self.pickle = self._read_small(zf, self.prefix + "data.pkl")
                # Without a byteorder record torch.load assumes the machine's own.
                self.byteorder = (
                    self._read_small(zf, byteorder).decode() if byteorder in self.members else sys.byteorder
                )
            except (*_ZIP_ERRORS, UnicodeDecodeError) as exc:
                raise _unreadable(source, str(exc) or type(exc).__name__) from None
        if self.byteorder not in ("little", "big"):
            raise FormatError(f"{source}: byteorder record is {self.byteorder!r}, expected 'little' or 'big'")
        self._file: np.memmap | None = None
        self._bytes: dict[str, np.ndarray] = {}
        self._recorded: dict[tuple[int, int], Recorded] = {}  # (offset, size) of a record's bytes -> its CRC-32

    def _read_small(self, zf: zipfile.ZipFile, name: str) -> bytes:
        """A small record's bytes, inflated with a bound: at most the size the directory declares, and
        that at most ``MAX_RECORD_BYTES`` (zipfile stops a record at its declared size)."""
        info = self.members[name]
        if info.file_size > MAX_RECORD_BYTES:
            raise FormatError(
                f"{self.source}: record {name} declares {info.file_size} bytes (stored in "
                f"{info.compress_size}), more than the {MAX_RECORD_BYTES} optstate inflates; not a torch.save file"
            )
        if info.CRC == 0 and info.compress_type == zipfile.ZIP_STORED and info.file_size:
            # torch.serialization.set_crc32_options(False) records 0 for every CRC-32, which zipfile would refuse
            start = self._record_start(name)
            with open(self.source, "rb") as f:
                data = os.pread(f.fileno(), info.file_size, start)
        else:
            with zf.open(info) as record:
                data = record.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise _unreadable(self.source, f"record {name} holds {len(data)} bytes, declares {info.file_size}")
        return data

    def _record_start(self, name: str) -> int:
        """Where record ``name``'s bytes start (:func:`record_data_start`)."""
        offset = self.members[name].header_offset
        with open(self.source, "rb", buffering=0) as f:
            start = record_data_start(f.fileno(), offset)
        if start is None:
            raise _unreadable(self.source, f"record {name} has no local header at byte {offset}")
        return start

    def _refuse_bytes_outside_records(self) -> None:
        """Refuse bytes before the first record or after the end record: torch.save writes neither, and a
        file carrying them was appended to, prepended to, or is two files run together."""
        first = min((info.header_offset for info in self.members.values()), default=0)
        if first:
            raise FormatError(
                f"{self.source}: {first} bytes before the zip's first record (offset 0 to {first}); "
                "torch.save writes none: the file was prepended to or is not one checkpoint"
            )
        size = os.path.getsize(self.source)
        with open(self.source, "rb") as f:
            f.seek(max(0, size - _MAX_END_SEARCH))
            tail = f.read()
        end = tail.rfind(b"PK\x05\x06")
        while end >= 0:  # the last end record whose comment reaches no further than the file
            record = tail[end : end + _END_RECORD.size]
            if len(record) == _END_RECORD.size and end + _END_RECORD.size + _END_RECORD.unpack(record)[1] <= len(tail):
                break
            end = tail.rfind(b"PK\x05\x06", 0, end)
        if end >= 0:
            stop = size - len(tail) + end + _END_RECORD.size + _END_RECORD.unpack(tail[end : end + _END_RECORD.size])[1]
            if stop != size:
                raise FormatError(
                    f"{self.source}: {size - stop} bytes after the zip's end record (offset {stop} to {size}); "
                    "torch.save writes none: the file was appended to or is not one checkpoint"
                )

    def _not_zip(self, exc: Exception) -> FormatError:
        with open(self.source, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            return FormatError(
                f"{self.source}: a checkpoint in torch's legacy format (torch < 1.6, or saved with "
                "_use_new_zipfile_serialization=False), which optstate reads only with torch "
                "installed; re-save it with a newer torch or install torch"
            )
        return _unreadable(self.source, f"not a zip archive ({exc})")

    def _prefix(self) -> str:
        pickles = [name for name in self.members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise FormatError(
                f"{self.source}: a zip archive, but not one torch.save writes "
                f"({len(pickles)} records <archive>/data.pkl)"
            )
        return pickles[0].removesuffix("data.pkl")

    def data_span(self, name: str) -> tuple[int, int]:
        """Where record ``name``'s stored bytes lie in the file: ``(offset, size)``, from its local header."""
        info = self.members.get(name)
        if info is None:
            raise _unreadable(self.source, f"record {name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _unreadable(self.source, f"record {name} is compressed (zip method {info.compress_type})")
        return self._record_start(name), info.file_size

    def storage_bytes(self, key: str) -> np.ndarray:
        """The bytes of storage ``key``: a read-only view of the file, no copy."""
        if key not in self._bytes:
            self._bytes[key] = self._member_bytes(f"{self.prefix}data/{key}")
        return self._bytes[key]

    def _member_bytes(self, name: str) -> np.ndarray:
        info = self.members.get(name)
        if info is None:
            raise _unreadable(self.source, f"record {name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(
                f"{self.source}: record {name} is compressed (zip method {info.compress_type}); "
                "torch.save stores tensors uncompressed, so it cannot be mapped: re-save it "
                "with torch.save or unzip and re-zip it with no compression"
            )
        if info.file_size == 0:
            return np.empty(0, np.uint8)
        if self._file is None:
            self._file = np.memmap(self.source, np.uint8, mode="r")
            note_recorded(self._file, self._recorded)  # a writer checks a record it copies whole against its CRC
        start = self._record_start(name)
        if start + info.file_size > self._file.size:
            raise _unreadable(
                self.source, f"record {name} ends at byte {start + info.file_size}, the file at {self._file.size}"
            )
        if info.CRC:  # 0: none computed (torch.serialization.set_crc32_options(False))
            self._recorded[(start, info.file_size)] = Recorded(crc32=info.CRC)
        return self._file[start : start + info.file_size]


# ----------------------------------------------------------------------------- tensors


def _swapped(array: np.ndarray) -> np.ndarray:
    """A copy with each element's bytes reversed (a complex number's two parts each)."""
    if array.dtype.itemsize == 1:
        return array
    part = array.dtype.itemsize // 2 if array.dtype.kind == "c" else array.dtype.itemsize
    return array.view(f"u{part}").byteswap().view(array.dtype)


def _check_ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise FormatError(f"{where}: {what} is {value!r}, expected a tuple of non-negative integers")
    return value


# ----------------------------------------------------------------------------- the unpickler

_BUILTINS = ("builtins", "__builtin__")  # protocol 2 writes Python 2's name
# What _rebuild_from_type_v2 may rebuild (records mode), and the classes whose instances are plain arrays.
_TENSOR_REBUILDERS = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
)
_PLAIN_TENSOR_CLASSES = frozenset({("torch", "Tensor"), ("torch.nn.parameter", "Parameter")})


class _Unpickler:
    """A pickle interpreter for the opcodes ``torch.save`` writes and the globals of a ``state_dict``."""

    def __init__(self, archive: _Archive, *, records: bool = False):
        self.archive = archive
        self.records = records
        self.source = archive.source
        self.storages: dict[tuple[str, np.dtype], np.ndarray] = {}
        self.functions: dict[str, Callable[..., Any]] = {
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "collections.OrderedDict": lambda *args: OrderedDict(*self._mapping_args(args, "OrderedDict")),
            "collections.Counter": lambda *args: Counter(*self._mapping_args(args, "Counter")),
            "torch.Size": lambda shape: _check_ints(shape, "torch.Size", self.source),
            "_codecs.encode": self._bytes,
            **{f"{m}.set": self._set for m in _BUILTINS},
            **{f"{m}.complex": self._complex for m in _BUILTINS},
        }
        if records:
            # A tensor carrying Python attributes (DeepSpeed's ZeRO-3 flat groups carry `ds_id`) is pickled
            # through _rebuild_from_type_v2. A state_dict's tensors never are, so the strict mode keeps refusing it.
            self.functions["torch._tensor._rebuild_from_type_v2"] = self._rebuild_from_type_v2
        # Made when the pickle names them: a bfloat16 or float8 one imports ml_dtypes (see numpy_dtype).
        self.values: dict[str, Callable[[], Any]] = {
            "torch.storage.UntypedStorage": lambda: _StorageType(None),
            **{f"torch.{cls}": functools.partial(_typed_storage, name) for cls, name in _STORAGE_CLASSES.items()},
            **{f"torch.{name}": functools.partial(numpy_dtype, name) for name in DTYPE_NAMES},
        }

    # -------------------------------------------------------------- the interpreter

    def load(self) -> Any:
        self.data = io.BytesIO(self.archive.pickle)
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        ops = self._opcodes()
        while True:
            code = self.data.read(1)
            if not code:
                raise _unreadable(self.source, "data.pkl ends before its STOP opcode")
            op = ops.get(code)
            if op is None:
                known = pickletools.code2op  # type: ignore[attr-defined]  # undocumented, in every CPython
                name = getattr(known.get(code.decode("latin-1")), "name", repr(code))
                raise FormatError(
                    f"{self.source}: refused: pickle opcode {name} at byte {self.data.tell() - 1} of "
                    "data.pkl is not one torch.save writes for a state_dict"
                )
            try:
                if op() is _STOP:
                    return self.stack.pop()
            except (IndexError, KeyError, TypeError, ValueError, struct.error) as exc:
                raise _unreadable(
                    self.source, f"malformed data.pkl at byte {self.data.tell()} ({type(exc).__name__}: {exc})"
                ) from None

    def _opcodes(self) -> dict[bytes, Callable[[], Any]]:
        push = self._push
        ops = {
            "PROTO": lambda: self._read(1),
            "STOP": lambda: _STOP,
            "MARK": self._mark,
            "NONE": lambda: push(None),
            "NEWTRUE": lambda: push(True),
            "NEWFALSE": lambda: push(False),
            "EMPTY_TUPLE": lambda: push(()),
            "EMPTY_LIST": lambda: push([]),
            "EMPTY_DICT": lambda: push({}),
            "BININT": lambda: push(self._unpack("<i")),
            "BININT1": lambda: push(self._unpack("<B")),
            "BININT2": lambda: push(self._unpack("<H")),
            "BINFLOAT": lambda: push(self._unpack(">d")),
            "LONG1": lambda: push(int.from_bytes(self._read(self._unpack("<B")), "little", signed=True)),
            "BINUNICODE": lambda: push(self._read(self._unpack("<I")).decode("utf-8", "surrogatepass")),
            "TUPLE": lambda: push(tuple(self._pop_mark())),
            "TUPLE1": lambda: push(tuple(self._pop(1))),
            "TUPLE2": lambda: push(tuple(self._pop(2))),
            "TUPLE3": lambda: push(tuple(self._pop(3))),
            "APPEND": lambda: self._extend(self._pop(1)),
            "APPENDS": lambda: self._extend(self._pop_mark()),
            "SETITEM": lambda: self._setitems(self._pop(2)),
            "SETITEMS": lambda: self._setitems(self._pop_mark()),
            "BINPUT": lambda: self.memo.__setitem__(self._unpack("<B"), self.stack[-1]),
            "LONG_BINPUT": lambda: self.memo.__setitem__(self._unpack("<I"), self.stack[-1]),
            "BINGET": lambda: push(self.memo[self._unpack("<B")]),
            "LONG_BINGET": lambda: push(self.memo[self._unpack("<I")]),
            "GLOBAL": self._global,
            "REDUCE": self._reduce,
            "BUILD": self._build,
            "NEWOBJ": self._newobj,
            "BINPERSID": lambda: push(self._persistent_load(self._pop(1)[0])),
        }
        return {getattr(pickle, name): op for name, op in ops.items()}

    def _read(self, n: int) -> bytes:
        data = self.data.read(n)
        if len(data) != n:
            raise _unreadable(self.source, "data.pkl is truncated")
        return data

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _push(self, value: Any) -> None:
        self.stack.append(value)

    def _pop(self, n: int) -> list[Any]:
        if len(self.stack) < n:
            raise IndexError(f"{n} values needed, the stack holds {len(self.stack)}")
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def _mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def _pop_mark(self) -> list[Any]:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def _extend(self, items: list[Any]) -> None:
        target = self.stack[-1]
        if type(target) is not list:
            raise FormatError(f"{self.source}: refused: data.pkl appends to a {type(target).__name__}, not a list")
        target.extend(items)

    def _setitems(self, items: list[Any]) -> None:
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict, Counter):
            raise FormatError(f"{self.source}: refused: data.pkl sets items of a {type(target).__name__}, not a dict")
        if len(items) % 2:
            raise IndexError(f"{len(items)} values for keys and values")
        for key, value in zip(items[::2], items[1::2], strict=True):
            target[key] = value

    def _global(self) -> None:
        module = self.data.readline().rstrip(b"\n").decode("utf-8", "replace")
        name = self.data.readline().rstrip(b"\n").decode("utf-8", "replace")
        full = f"{module}.{name}"
        if full in self.functions:
            self.stack.append(_Function(full))
        elif full in self.values:
            self.stack.append(self.values[full]())
        elif self.records:
            self.stack.append(_Class(module, name))
        else:
            others = [g for g in self._unknown_globals() if g != full]
            also = f"; also unsupported: {', '.join(others)}" if others else ""
            raise FormatError(
                f"{self.source}: refused: loading it would run code from the file, which optstate "
                f"never does (unsupported global {full}{also})"
            )

    def _unknown_globals(self) -> list[str]:
        """Every global the pickle names that is not admitted, in order, found by reading its opcodes
        (:func:`pickletools.genops` decodes, it runs nothing); as far as the pickle decodes."""
        found: list[str] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # genops decodes STRING arguments with a deprecated escape codec
                for opcode, arg, _ in pickletools.genops(self.archive.pickle):
                    if opcode.name == "GLOBAL" and isinstance(arg, str):
                        full = arg.replace(" ", ".", 1)
                        if full not in self.functions and full not in self.values and full not in found:
                            found.append(full)
        except (ValueError, EOFError, struct.error, UnicodeDecodeError):
            pass  # a malformed tail: the globals before it are named
        return found

    def _reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if isinstance(function, _Class) and isinstance(args, tuple):
            self.stack[-1] = Record(function.module, function.name, args)
            return
        if not isinstance(function, _Function) or not isinstance(args, tuple):
            raise FormatError(
                f"{self.source}: refused: data.pkl calls a {type(function).__name__}, "
                "not a function a state_dict is built with"
            )
        self.stack[-1] = self.functions[function.name](*args)

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack[-1]
        if not isinstance(cls, _Class) or not isinstance(args, tuple):
            raise FormatError(f"{self.source}: refused: data.pkl creates a {type(cls).__name__}, not a recorded class")
        self.stack[-1] = Record(cls.module, cls.name, args)

    def _build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Record):
            target.state = state  # (state, slots) as pickled, where the class has __slots__
            return
        # A module's state_dict() is an OrderedDict carrying its modules' versions as `_metadata`.
        if type(target) is not OrderedDict or not isinstance(state, dict) or set(state) != {"_metadata"}:
            raise FormatError(
                f"{self.source}: refused: data.pkl sets attributes of a {type(target).__name__}; "
                "only a state_dict's _metadata is read"
            )
        target._metadata = state["_metadata"]  # type: ignore[attr-defined]  # as torch's own unpickling sets it

    # -------------------------------------------------------------- what the admitted globals build

    def _persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise FormatError(f"{self.source}: refused: persistent id {pid!r} is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        return _Storage(key, storage_type.dtype, numel)

    def _rebuild_tensor_v2(
        self, storage: Any, offset: Any, size: Any, stride: Any, _requires_grad: Any, _hooks: Any, metadata: Any = None
    ) -> np.ndarray:
        if not isinstance(storage, _Storage) or storage.dtype is None:
            raise FormatError(
                f"{self.source}: refused: _rebuild_tensor_v2 of a {type(storage).__name__}, not a typed storage"
            )
        return self._tensor(storage, storage.dtype, offset, size, stride, metadata)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        _requires_grad: Any,
        _hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> np.ndarray:
        if not isinstance(storage, _Storage) or storage.dtype is not None or not isinstance(dtype, np.dtype):
            raise FormatError(
                f"{self.source}: refused: _rebuild_tensor_v3 of a {type(storage).__name__} "
                f"as {dtype!r}, not an untyped storage and a dtype"
            )
        return self._tensor(storage, dtype, offset, size, stride, metadata)

    def _rebuild_parameter(self, data: Any, _requires_grad: Any, _hooks: Any) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise FormatError(f"{self.source}: refused: a Parameter of a {type(data).__name__}, not a tensor")
        return data

    def _rebuild_from_type_v2(self, function: Any, new_type: Any, args: Any, state: Any) -> Any:
        """A tensor pickled with its Python attributes (``records=True`` only): the array, the attributes
        (``state``) dropped; a tensor subclass of another library becomes a :class:`Record` holding the array."""
        if not (isinstance(function, _Function) and function.name in _TENSOR_REBUILDERS and isinstance(args, tuple)):
            raise FormatError(f"{self.source}: refused: _rebuild_from_type_v2 of {function!r}, not of a tensor")
        if not isinstance(new_type, _Class):
            raise FormatError(f"{self.source}: refused: a tensor rebuilt as a {type(new_type).__name__}, not a class")
        array = self.functions[function.name](*args)
        if (new_type.module, new_type.name) in _PLAIN_TENSOR_CLASSES:
            return array
        return Record(new_type.module, new_type.name, (array,), state)

    def _tensor(
        self, storage: _Storage, dtype: np.dtype, offset: Any, size: Any, stride: Any, metadata: Any
    ) -> np.ndarray:
        where = f"{self.source}: tensor of storage {storage.key}"
        size, stride = _check_ints(size, "size", where), _check_ints(stride, "stride", where)
        if type(offset) is not int or offset < 0 or len(size) != len(stride):
            raise FormatError(f"{where}: offset {offset!r}, size {size}, stride {stride} do not describe a view")
        elements = self._storage(storage, dtype, where)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if 0 not in size and last >= elements.size:  # an empty view reads nothing
            raise FormatError(f"{where}: the view reaches element {last}, the storage holds {elements.size}")
        if stride == _contiguous_strides(size):
            # A slice of the mapped file, whose bases lead to the mapping: a writer can copy it file to file.
            array = elements[offset : offset + math.prod(size)].reshape(size)
            array.flags.writeable = False
        else:
            # as_strided goes through __array_interface__, which cannot spell ml_dtypes' types: stride raw bytes.
            raw = elements[offset:].view(np.dtype((np.void, dtype.itemsize)))
            array = as_strided(raw, size, [s * dtype.itemsize for s in stride], writeable=False).view(dtype)
        return self._apply_metadata(array, metadata, where)

    def _storage(self, storage: _Storage, dtype: np.dtype, where: str) -> np.ndarray:
        """The storage's elements as ``dtype``, one array per storage: views of it share memory."""
        if (storage.key, dtype) not in self.storages:
            raw = self.archive.storage_bytes(storage.key)
            nbytes = storage.numel * (1 if storage.dtype is None else dtype.itemsize)
            if raw.size != nbytes or nbytes % dtype.itemsize:
                raise FormatError(
                    f"{where}: {raw.size} bytes stored, the storage says {storage.numel} "
                    f"{'bytes' if storage.dtype is None else dtype.name}"
                )
            elements = raw.view(dtype)
            if self.archive.byteorder != sys.byteorder:
                elements = _swapped(elements)
                elements.flags.writeable = False
            self.storages[(storage.key, dtype)] = elements
        return self.storages[(storage.key, dtype)]

    def _apply_metadata(self, array: np.ndarray, metadata: Any, where: str) -> np.ndarray:
        """A tensor saved with its lazy conjugate or negative bit set: the values it stands for, as a copy."""
        if not metadata:
            return array
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise FormatError(f"{where}: tensor metadata {metadata!r} is not understood")
        if metadata.get("conj"):
            array = np.conj(array)
        if metadata.get("neg"):
            array = np.negative(array)
        array.flags.writeable = False
        return array

    def _mapping_args(self, args: tuple, what: str) -> tuple:
        if len(args) > 1 or (args and type(args[0]) not in (dict, list)):
            raise FormatError(f"{self.source}: refused: {what} built from {args!r}")
        return args

    def _bytes(self, text: Any, encoding: Any) -> bytes:
        if not isinstance(text, str) or encoding != "latin1":  # how protocol 2 writes bytes
            raise FormatError(f"{self.source}: refused: _codecs.encode({text!r}, {encoding!r})")
        return text.encode("latin1")

    def _set(self, items: Any = ()) -> set:
        if type(items) not in (list, tuple):
            raise FormatError(f"{self.source}: refused: set built from a {type(items).__name__}")
        return set(items)

    def _complex(self, real: Any = 0.0, imag: Any = 0.0) -> complex:
        if not all(type(v) in (int, float) for v in (real, imag)):
            raise FormatError(f"{self.source}: refused: complex({real!r}, {imag!r})")
        return complex(real, imag)


_STOP = object()


# ----------------------------------------------------------------------------- writing: the pickle

# dtypes that torch.save pickles with a legacy typed storage and _rebuild_tensor_v2; the others
# (unsigned beyond uint8, float8) get an untyped storage, sized in bytes, and _rebuild_tensor_v3.
_TYPED_STORAGE_OF = {name: cls for cls, name in _STORAGE_CLASSES.items()}


def _torch_dtype_name(dtype: np.dtype) -> str | None:
    """torch's name of a native-order dtype, ``None`` where torch has no such dtype."""
    return dtype.name if dtype.name in DTYPE_NAMES and numpy_dtype(dtype.name) == dtype else None


@dataclass(frozen=True)
class _Tensor:
    """An array the pickle refers to: its storage's key, the array (or lazy array-like), its native dtype."""

    key: str
    value: Any
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or all(hasattr(value, a) for a in ("shape", "dtype", "__array__"))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides in elements, as torch computes them (an empty dimension counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _Pickler:
    """Pickles a ``state_dict`` with the opcodes and globals ``torch.save`` uses (protocol 2, no memo);
    each array becomes a tensor whose storage is ``data/<key>``, keys numbered in pickle order."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.tensors: list[_Tensor] = []

    def dumps(self, obj: Any) -> bytes:
        self._save(obj, "the checkpoint")
        self.out += pickle.STOP
        return bytes(self.out)

    def _save(self, value: Any, where: str) -> None:
        if value is None:
            self.out += pickle.NONE
        elif isinstance(value, bool):
            self.out += pickle.NEWTRUE if value else pickle.NEWFALSE
        elif isinstance(value, int):
            self._int(value, where)
        elif isinstance(value, float):
            self.out += pickle.BINFLOAT + struct.pack(">d", value)
        elif isinstance(value, str):
            self._str(value)
        elif isinstance(value, tuple):
            self._tuple(value, where)
        elif isinstance(value, list):
            self.out += pickle.EMPTY_LIST
            if value:
                self.out += pickle.MARK
                for i, item in enumerate(value):
                    self._save(item, f"{where}[{i}]")
                self.out += pickle.APPENDS
        elif isinstance(value, Counter):  # as pickle writes it: Counter(dict)
            self._global("collections", "Counter")
            self._dict(value, where)
            self.out += pickle.TUPLE1 + pickle.REDUCE
        elif isinstance(value, OrderedDict):  # as pickle writes it: OrderedDict(), then its items
            self._global("collections", "OrderedDict")
            self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
            self._items(value, where)
        elif isinstance(value, Mapping):
            self._dict(value, where)
        elif _is_array(value):
            self._tensor(value, where)
        else:
            raise UnsupportedError(
                f"{where}: a {type(value).__name__} cannot be written to a torch checkpoint "
                "(it holds dicts, lists, tuples, None, bools, ints, floats, strings and arrays)"
            )

    def _int(self, value: int, where: str) -> None:
        if 0 <= value < 1 << 8:
            self.out += pickle.BININT1 + struct.pack("<B", value)
        elif 0 <= value < 1 << 16:
            self.out += pickle.BININT2 + struct.pack("<H", value)
        elif -(1 << 31) <= value < 1 << 31:
            self.out += pickle.BININT + struct.pack("<i", value)
        else:
            data = pickle.encode_long(value)
            if len(data) > 255:
                raise UnsupportedError(f"{where}: the integer {value} has more than 2040 bits")
            self.out += pickle.LONG1 + struct.pack("<B", len(data)) + data

    def _str(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    def _global(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def _tuple(self, value: tuple, where: str) -> None:
        if not value:
            self.out += pickle.EMPTY_TUPLE
            return
        if len(value) > 3:
            self.out += pickle.MARK
        for i, item in enumerate(value):
            self._save(item, f"{where}[{i}]")
        self.out += (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(value) - 1] if len(value) <= 3 else pickle.TUPLE

    def _dict(self, value: Mapping, where: str) -> None:
        self.out += pickle.EMPTY_DICT
        self._items(value, where)

    def _items(self, value: Mapping, where: str) -> None:
        if value:
            self.out += pickle.MARK
            for key, item in value.items():
                self._save(key, where)
                self._save(item, f"{where}[{key!r}]")
            self.out += pickle.SETITEMS

    def _tensor(self, value: Any, where: str) -> None:
        dtype = np.dtype(value.dtype).newbyteorder("=")
        name = _torch_dtype_name(dtype)
        if name is None:
            raise UnsupportedError(f"{where}: an array of dtype {value.dtype}, which torch has no dtype for")
        tensor = _Tensor(str(len(self.tensors)), value, dtype, tuple(int(n) for n in value.shape))
        self.tensors.append(tensor)
        storage_class = _TYPED_STORAGE_OF.get(name)
        # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, dtype for v3])
        self._global("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        self.out += pickle.MARK + pickle.MARK
        self._str("storage")
        if storage_class:
            self._global("torch", storage_class)
        else:
            self._global("torch.storage", "UntypedStorage")
        self._str(tensor.key)
        self._str("cpu")
        self._int(math.prod(tensor.shape) if storage_class else tensor.nbytes, where)
        self.out += pickle.TUPLE + pickle.BINPERSID
        self._int(0, where)
        self._tuple(tensor.shape, where)
        self._tuple(_contiguous_strides(tensor.shape), where)
        self.out += pickle.NEWFALSE
        self._global("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
        if not storage_class:
            self._global("torch", name)
        self.out += pickle.TUPLE + pickle.REDUCE


# ----------------------------------------------------------------------------- writing: the zip archive

_ARCHIVE = "archive/"  # the records' prefix, as torch.save names it for a file object; torch.load takes any
_ALIGNMENT = 64  # torch.save aligns each record's data so that torch.load(mmap=True) maps storages aligned
_ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset from here on goes in a zip64 field (miniz's test, which torch mirrors)
_CRC_THREAD_BYTES = 1 << 20  # from this size on a block's CRC-32 is computed in a thread while it is written
_UTF8_NAME, _DATA_DESCRIPTOR = 0x800, 0x8  # zip general-purpose flags
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch: the same bytes for every save
_PADDING_FIELD = 0x4246  # "FB": the extra field in which torch's writer pads a local header


def _zip64_extra(size: int, offset: int) -> bytes:
    """The zip64 extra field a record needs (empty when none): its sizes when large, its header offset when far.

    Torch's writer puts the same field in the local header as in the central directory, and
    ``torch.load`` relies on that when it computes where a storage starts instead of reading it.
    """
    fields = ([size, size] if size >= _ZIP64_LIMIT else []) + ([offset] if offset >= _ZIP64_LIMIT else [])
    return struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""


class _Crc32(threading.Thread):
    """The CRC-32 of a block, continuing ``crc``, computed in a thread (ISA-L and xxhash let go of the GIL) while
    the block is written, and ``hasher`` updated with it. :meth:`result` waits for it and drops the block, so
    it is released when the caller's is."""

    def __init__(self, block: np.ndarray, crc: int, hasher: Any):
        super().__init__(daemon=True)
        self.block: memoryview | None = block.data
        self.value, self.hasher = crc, hasher
        self.start()

    def run(self) -> None:
        assert self.block is not None  # dropped by result() only, once this has run
        self.value = crc32(self.block, self.value)
        self.hasher.update(self.block)

    def result(self) -> int:
        self.join()
        self.block = None
        return self.value


class _Expected(NamedTuple):
    """A record copied whole from an input that records a CRC-32 or XXH3-64 of those bytes (``known``, from
    ``source``): its read-back must match it, and gives the record's CRC-32 (no second read of the source)."""

    known: Recorded
    source: str


def _read_back_record(
    path: str | os.PathLike, offset: int, size: int, what: str, expected: _Expected | None
) -> tuple[int, str]:
    """A record's CRC-32 (where ``expected``: else 0, known already) and XXH3-64, read back from the file written."""
    if expected is None:
        return 0, file_checksums(path, {what: (offset, size)})[what]
    crc, digest = file_crc32_xxh3(path, offset, size, what)
    known = expected.known
    if (known.crc32 is not None and crc != known.crc32) or (known.xxh3 is not None and digest != known.xxh3):
        recorded_as = f"CRC-32 {known.crc32:08x}" if known.crc32 is not None else f"checksum {known.xxh3}"
        raise FormatError(
            f"{expected.source}: {what} reads back with CRC-32 {crc:08x} and checksum {digest}, the input records "
            f"{recorded_as} for its bytes (the input is damaged, or changed while it was copied)"
        )
    return crc, digest


# How a record's CRC-32 and XXH3-64 are had once written: computed as it was written (waits for them), or read back
# and checked against what its input records (_Expected).
_Checksums = Callable[[], tuple[int, str]] | _Expected


@dataclass(frozen=True)
class _Record:
    """A record written, for its data descriptor and its central directory entry."""

    name: bytes
    size: int
    header_offset: int
    zip64: bytes
    version: int
    flags: int
    descriptor_offset: int
    checksums_of: Callable[[], tuple[int, str]]  # its CRC-32 and XXH3-64 (waits for them)


class _ZipWriter:
    """Writes an uncompressed zip record by record, laid out as torch's writer (miniz) lays it out:
    local header padded so that the data starts 64-byte aligned, the data, then (unless empty) a data
    descriptor with its CRC-32 and sizes; the central directory and zip64 end records at the end."""

    def __init__(self, fd: int, path: str | os.PathLike, reading_back: Executor, sources: SourceFiles):
        self.fd = fd
        self.offset = 0  # == the file position
        self._pending: list[_Record] = []  # the records written, their checksums maybe still being computed
        self.written: dict[str, tuple[int, str]] = {}  # record name -> (size, XXH3-64 of its bytes), for the read-back
        # A record's bytes are read back from ``path`` (the file being written) while the next one is written:
        # the read-back overlaps the writing instead of following it.
        self.path, self.reading_back = path, reading_back
        self._read_back: dict[str, tuple[int, Future]] = {}
        # The arrays that exist now keep their mappings alive while they are written (see file_span).
        self.mappings, self.sources = shared_file_mappings(), sources

    def _write(self, data: bytes) -> None:
        write_all(self.fd, np.frombuffer(data, np.uint8))
        self.offset += len(data)

    def _record(self, name: str, size: int, write_data: Callable[[], _Checksums]) -> None:
        """A record of ``size`` bytes that ``write_data()`` writes at the file position, returning how to get their
        CRC-32 and XXH3-64 (computed in a thread, maybe still): the data descriptor that holds the CRC is filled
        in and the central directory built in :meth:`finish`, so the next record is written meanwhile."""
        name_bytes, header_offset = (_ARCHIVE + name).encode(), self.offset
        zip64 = _zip64_extra(size, header_offset)
        version, flags = 45 if zip64 else 20, _UTF8_NAME | (_DATA_DESCRIPTOR if size else 0)
        pad = -(header_offset + 30 + len(name_bytes) + len(zip64) + 4) % _ALIGNMENT
        extra = zip64 + struct.pack("<HH", _PADDING_FIELD, pad) + b"Z" * pad
        large = 0xFFFFFFFF if size >= _ZIP64_LIMIT else 0  # the sizes follow in the data descriptor
        self._write(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                version,
                flags,
                0,
                0,
                _DOS_DATE,
                0,
                large,
                large,
                len(name_bytes),
                len(extra),
            )
            + name_bytes
            + extra
        )
        written = write_data()
        expected = written if isinstance(written, _Expected) else None
        what = f"record {name}"
        checksums = self.reading_back.submit(_read_back_record, self.path, self.offset, size, what, expected)
        self._read_back[_ARCHIVE + name] = (self.offset, checksums)
        # With an expectation, the CRC-32 and checksum are the ones read back, once they match the input's.
        checksums_of = checksums.result if isinstance(written, _Expected) else written
        self.offset += size
        if os.lseek(self.fd, 0, os.SEEK_CUR) != self.offset:  # the central directory would point amiss
            raise AssertionError(f"record {name}: {size} bytes expected, the file position says otherwise")
        self._pending.append(_Record(name_bytes, size, header_offset, zip64, version, flags, self.offset, checksums_of))
        if size:  # the data descriptor, its CRC-32 filled in by finish()
            self._write(self._descriptor(0, size, zip64))

    @staticmethod
    def _descriptor(crc: int, size: int, zip64: bytes) -> bytes:
        return struct.pack("<II" + ("QQ" if zip64 else "II"), 0x08074B50, crc, size, size)

    def _central_entry(self, record: _Record, crc: int) -> bytes:
        small_size, small_offset = (min(v, 0xFFFFFFFF) for v in (record.size, record.header_offset))
        return (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                record.version,
                record.version,
                record.flags,
                0,
                0,
                _DOS_DATE,
                crc,
                small_size,
                small_size,
                len(record.name),
                len(record.zip64),
                0,
                0,
                0,
                0,
                small_offset,
            )
            + record.name
            + record.zip64
        )

    def write_bytes(self, name: str, data: bytes) -> None:
        def write() -> Callable[[], tuple[int, str]]:
            write_all(self.fd, np.frombuffer(data, np.uint8))
            checksums = crc32(data), xxhash.xxh3_64_hexdigest(data)
            return lambda: checksums

        self._record(name, len(data), write)

    def write_tensor(self, tensor: _Tensor) -> None:
        """Materialise one tensor's array (released on return) and write it as record ``data/<key>``."""
        array = np.asarray(tensor.value)
        if array.shape != tensor.shape or array.dtype.newbyteorder("=") != tensor.dtype:
            raise FormatError(
                f"tensor {tensor.key}: the array has shape {list(array.shape)} and dtype {array.dtype}, "
                f"it declared shape {list(tensor.shape)} and dtype {tensor.dtype}"
            )
        # A lazy value's array may be mapped only now, at an address an older mapping had: looked up anew.
        mappings = self.mappings if isinstance(tensor.value, np.ndarray) else None
        self._record(f"data/{tensor.key}", array.nbytes, lambda: self._write_array(array, mappings, tensor.key))

    def _write_array(self, array: np.ndarray, mappings: Sequence[Any] | None = None, key: str = "") -> _Checksums:
        """Write the array's bytes in C order, little-endian; return how to get their CRC-32 and XXH3-64.

        An array mapped from a file is copied file to file inside the kernel (``copy_file_range``); its two
        checksums are read back from the output and checked against what its input records of those bytes
        (:class:`_Expected`), or, where it records nothing, read from the source by a thread beside the copy
        (``pread``: no page of the mapping is touched, so an input truncated meanwhile is an error, not a
        SIGBUS). Measured on 1 GB here: 1.0-1.1 s with the read-back, against 1.2-2.7 s writing from the mapping
        with the checksums beside it. Other arrays are written from memory, their checksums computed (in a
        thread, for large blocks) meanwhile.
        """
        span = None
        if array.nbytes >= COPY_MIN_BYTES and array.dtype.newbyteorder("<") == array.dtype:
            span = file_span(array, mappings)
        src = None if span is None else self.sources.fd(span)
        if span is not None and src is not None:
            known = recorded(span, array.nbytes)  # what the input records of these bytes: checked on read-back
            digests = None
            if known is None:  # the checksums read from the file the copy reads
                what = "an array mapped from it"
                digests = self.reading_back.submit(file_crc32_xxh3, span.path, span.offset, array.nbytes, what, src)
            done = copy_span(span, self.fd, array.nbytes, self.sources)
            if done == array.nbytes:  # waited for at the end: the next record is copied meanwhile
                if digests is None:
                    return _Expected(known or Recorded(), span.path)
                return digests.result
            # The copy failed: the rest is written from memory, the checksums taken from there.
            if digests is not None and not digests.cancel():  # running: waited for, what it found no longer matters
                with contextlib.suppress(FormatError, OSError):
                    digests.result()
            write_all(self.fd, array.reshape(-1).view(np.uint8)[done:])
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
            checksums = crc32(flat), xxhash.xxh3_64_hexdigest(flat)
            return lambda: checksums
        if mappings is not None:  # a mapped array not copied in the kernel: its hashes must not meet a SIGBUS
            array = read_into_memory(array, mappings, f"tensor {key}", self.sources)
        crc, hasher = 0, xxhash.xxh3_64()
        for block in little_endian_bytes(array):  # the array itself when C-contiguous and little-endian
            if block.nbytes >= _CRC_THREAD_BYTES:
                pending = _Crc32(block, crc, hasher)
                write_all(self.fd, block)
                crc = pending.result()
            else:
                write_all(self.fd, block)
                crc = crc32(block.data, crc)
                hasher.update(block.data)
        checksums = crc, hasher.hexdigest()
        return lambda: checksums

    def read_back(self) -> dict[str, tuple[int, str]]:
        """``record name -> (data offset, XXH3-64)`` of every record read back while writing (waits for them)."""
        return {record: (offset, checksums.result()[1]) for record, (offset, checksums) in self._read_back.items()}

    def finish(self) -> None:
        """Each record's CRC-32 in its data descriptor; the central directory, then zip64's end record and
        locator (as torch's writer, always), then the end record."""
        central = []
        for record in self._pending:
            crc, digest = record.checksums_of()
            self.written[record.name.decode()] = (record.size, digest)
            if record.size:
                os.pwrite(self.fd, self._descriptor(crc, record.size, record.zip64), record.descriptor_offset)
            central.append(self._central_entry(record, crc))
        directory, directory_offset, count = b"".join(central), self.offset, len(central)
        self._write(directory)
        end64_offset = self.offset
        self._write(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), directory_offset)
        )
        self._write(struct.pack("<IIQI", 0x07064B50, 0, end64_offset, 1))
        self._write(
            struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                min(len(directory), 0xFFFFFFFF),
                min(directory_offset, 0xFFFFFFFF),
                0,
            )
        )
