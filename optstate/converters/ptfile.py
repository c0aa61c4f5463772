"""Read ``torch.save`` files without torch: a restricted unpickler, tensors memory-mapped from the file.

Since torch 1.6 a ``torch.save`` file is a zip archive: ``<archive>/data.pkl`` pickles the object,
with each tensor storage replaced by a persistent id; ``<archive>/data/<key>`` holds that storage's
raw bytes, uncompressed and 64-byte aligned; ``<archive>/byteorder`` says how they were written.

The pickle is run by a small interpreter of our own, not by :mod:`pickle`: it knows the opcodes
``torch.save`` writes and the globals a model, optimizer or scheduler ``state_dict`` holds, each
mapped to a function here that builds plain data (a NumPy array, an ``OrderedDict``, ...). Any other
global, or a call of anything that is not one of those, is refused by name; nothing from the file
is imported or called. It admits a subset of what ``torch.load(weights_only=True)`` admits.

Imports NumPy and ml_dtypes only.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import FormatError

# torch dtype name -> NumPy dtype (torch's names are NumPy's and ml_dtypes').
DTYPES = {name: np.dtype(getattr(ml_dtypes, name, None) or name) for name in (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool", "complex128", "complex64")}

# The legacy typed storage classes that persistent ids name, by element dtype.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}

# The start of a torch < 1.6 file: pickle protocol 2, then LONG1 of torch's magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length


@dataclass(frozen=True)
class _StorageType:
    """What a persistent id says a storage holds: elements of ``dtype``, or bytes (``None``, untyped)."""

    dtype: np.dtype | None


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype | None
    numel: int


@dataclass(frozen=True)
class _Function:
    """An admitted global that the pickle may call: ``name`` as torch spells it."""

    name: str


# ----------------------------------------------------------------------------- public

def load(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, tensors as read-only NumPy arrays mapped from the file.

    ``torch.nn.Parameter`` and ``torch.Tensor`` become ``np.ndarray`` (bfloat16 and float8 through
    ml_dtypes), views of one storage share memory, ``torch.Size`` becomes a tuple. A global that a
    ``state_dict`` does not hold is refused with a :class:`FormatError` naming it, before anything runs.

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/t.pt"
    >>> torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "step": torch.tensor(3.0)}, path)
    >>> d = load(path)
    >>> d["w"].tolist(), d["w"].flags.writeable, d["step"].shape
    ([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], False, ())
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FormatError(f"{source}: no such file")
    archive = _Archive(source)
    return _Unpickler(archive).load()


# ----------------------------------------------------------------------------- the zip archive

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
        except (OSError, EOFError, ValueError) as exc:
            raise _unreadable(source, str(exc) or type(exc).__name__) from None
        with zf:
            self.members = {info.filename: info for info in zf.infolist()}
            self.prefix = self._prefix()
            byteorder = self.prefix + "byteorder"
            try:
                self.pickle = zf.read(self.prefix + "data.pkl")
                # Without a byteorder record torch.load assumes the machine's own.
                self.byteorder = zf.read(byteorder).decode() if byteorder in self.members else sys.byteorder
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, UnicodeDecodeError, zlib.error) as exc:
                raise _unreadable(source, str(exc) or type(exc).__name__) from None
        if self.byteorder not in ("little", "big"):
            raise FormatError(f"{source}: byteorder record is {self.byteorder!r}, expected 'little' or 'big'")
        self._file: np.memmap | None = None
        self._bytes: dict[str, np.ndarray] = {}

    def _not_zip(self, exc: Exception) -> FormatError:
        with open(self.source, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            return FormatError(f"{self.source}: a checkpoint in torch's legacy format (torch < 1.6, or saved with "
                               "_use_new_zipfile_serialization=False), which optstate reads only with torch "
                               "installed; re-save it with a newer torch or install torch")
        return _unreadable(self.source, f"not a zip archive ({exc})")

    def _prefix(self) -> str:
        pickles = [name for name in self.members if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise FormatError(f"{self.source}: a zip archive, but not one torch.save writes "
                              f"({len(pickles)} records <archive>/data.pkl)")
        return pickles[0].removesuffix("data.pkl")

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
            raise FormatError(f"{self.source}: record {name} is compressed (zip method {info.compress_type}); "
                              "torch.save stores tensors uncompressed, so it cannot be mapped: re-save it "
                              "with torch.save or unzip and re-zip it with no compression")
        if info.file_size == 0:
            return np.empty(0, np.uint8)
        if self._file is None:
            self._file = np.memmap(self.source, np.uint8, mode="r")
        header = bytes(self._file[info.header_offset:info.header_offset + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
            raise _unreadable(self.source, f"record {name} has no local header at byte {info.header_offset}")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > self._file.size:
            raise _unreadable(self.source, f"record {name} ends at byte {start + info.file_size}, "
                                           f"the file at {self._file.size}")
        return self._file[start:start + info.file_size]


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


class _Unpickler:
    """A pickle interpreter for the opcodes ``torch.save`` writes and the globals of a ``state_dict``."""

    def __init__(self, archive: _Archive):
        self.archive = archive
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
        self.values: dict[str, Any] = {
            "torch.storage.UntypedStorage": _StorageType(None),
            **{f"torch.{cls}": _StorageType(DTYPES[name]) for cls, name in _STORAGE_CLASSES.items()},
            **{f"torch.{name}": dtype for name, dtype in DTYPES.items()},
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
                name = getattr(pickletools.code2op.get(code.decode("latin-1")), "name", repr(code))
                raise FormatError(f"{self.source}: refused: pickle opcode {name} at byte {self.data.tell() - 1} of "
                                  "data.pkl is not one torch.save writes for a state_dict")
            try:
                if op() is _STOP:
                    return self.stack.pop()
            except (IndexError, KeyError, TypeError, ValueError, struct.error) as exc:
                raise _unreadable(self.source, f"malformed data.pkl at byte {self.data.tell()} "
                                               f"({type(exc).__name__}: {exc})") from None

    def _opcodes(self) -> dict[bytes, Callable[[], Any]]:
        push = self._push
        ops = {
            "PROTO": lambda: self._read(1),
            "STOP": lambda: _STOP,
            "MARK": self._mark,
            "NONE": lambda: push(None), "NEWTRUE": lambda: push(True), "NEWFALSE": lambda: push(False),
            "EMPTY_TUPLE": lambda: push(()), "EMPTY_LIST": lambda: push([]), "EMPTY_DICT": lambda: push({}),
            "BININT": lambda: push(self._unpack("<i")), "BININT1": lambda: push(self._unpack("<B")),
            "BININT2": lambda: push(self._unpack("<H")), "BINFLOAT": lambda: push(self._unpack(">d")),
            "LONG1": lambda: push(int.from_bytes(self._read(self._unpack("<B")), "little", signed=True)),
            "BINUNICODE": lambda: push(self._read(self._unpack("<I")).decode("utf-8", "surrogatepass")),
            "TUPLE": lambda: push(tuple(self._pop_mark())),
            "TUPLE1": lambda: push(tuple(self._pop(1))), "TUPLE2": lambda: push(tuple(self._pop(2))),
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
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
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
            raise FormatError(f"{self.source}: refused: data.pkl sets items of a {type(target).__name__}, "
                              "not a dict")
        if len(items) % 2:
            raise IndexError(f"{len(items)} values for keys and values")
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value

    def _global(self) -> None:
        module = self.data.readline().rstrip(b"\n").decode("utf-8", "replace")
        name = self.data.readline().rstrip(b"\n").decode("utf-8", "replace")
        full = f"{module}.{name}"
        if full in self.functions:
            self.stack.append(_Function(full))
        elif full in self.values:
            self.stack.append(self.values[full])
        else:
            raise FormatError(f"{self.source}: refused: loading it would run code from the file, which optstate "
                              f"never does (unsupported global {full})")

    def _reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if not isinstance(function, _Function) or not isinstance(args, tuple):
            raise FormatError(f"{self.source}: refused: data.pkl calls a {type(function).__name__}, "
                              "not a function a state_dict is built with")
        self.stack[-1] = self.functions[function.name](*args)

    def _build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        # A module's state_dict() is an OrderedDict carrying its modules' versions as `_metadata`.
        if type(target) is not OrderedDict or not isinstance(state, dict) or set(state) != {"_metadata"}:
            raise FormatError(f"{self.source}: refused: data.pkl sets attributes of a {type(target).__name__}; "
                              "only a state_dict's _metadata is read")
        target._metadata = state["_metadata"]

    # -------------------------------------------------------------- what the admitted globals build

    def _persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise FormatError(f"{self.source}: refused: persistent id {pid!r} is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        return _Storage(key, storage_type.dtype, numel)

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, _requires_grad: Any,
                           _hooks: Any, metadata: Any = None) -> np.ndarray:
        if not isinstance(storage, _Storage) or storage.dtype is None:
            raise FormatError(f"{self.source}: refused: _rebuild_tensor_v2 of a {type(storage).__name__}, "
                              "not a typed storage")
        return self._tensor(storage, storage.dtype, offset, size, stride, metadata)

    def _rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, _requires_grad: Any,
                           _hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
        if not isinstance(storage, _Storage) or storage.dtype is not None or not isinstance(dtype, np.dtype):
            raise FormatError(f"{self.source}: refused: _rebuild_tensor_v3 of a {type(storage).__name__} "
                              f"as {dtype!r}, not an untyped storage and a dtype")
        return self._tensor(storage, dtype, offset, size, stride, metadata)

    def _rebuild_parameter(self, data: Any, _requires_grad: Any, _hooks: Any) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise FormatError(f"{self.source}: refused: a Parameter of a {type(data).__name__}, not a tensor")
        return data

    def _tensor(self, storage: _Storage, dtype: np.dtype, offset: Any, size: Any, stride: Any,
                metadata: Any) -> np.ndarray:
        where = f"{self.source}: tensor of storage {storage.key}"
        size, stride = _check_ints(size, "size", where), _check_ints(stride, "stride", where)
        if type(offset) is not int or offset < 0 or len(size) != len(stride):
            raise FormatError(f"{where}: offset {offset!r}, size {size}, stride {stride} do not describe a view")
        elements = self._storage(storage, dtype, where)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if 0 not in size and last >= elements.size:  # an empty view reads nothing
            raise FormatError(f"{where}: the view reaches element {last}, the storage holds {elements.size}")
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
                raise FormatError(f"{where}: {raw.size} bytes stored, the storage says {storage.numel} "
                                  f"{'bytes' if storage.dtype is None else dtype.name}")
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
        if len(args) > 1 or args and type(args[0]) not in (dict, list):
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
