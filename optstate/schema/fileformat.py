"""The canonical file: the safetensors layout with optstate's JSON document in ``__metadata__``.

Layout: 8-byte little-endian header length, a JSON header, then raw little-endian tensor data.
Tensor keys are ``kind/path/joined/by/slashes`` where kind is a slot name or ``model``; ``%`` and
``/`` inside a path component are percent-escaped so every key parses back to one path.

A large state shards, as Hugging Face shards weights: ``<stem>-00001-of-0000N.safetensors`` files
(each a safetensors file on its own) beside ``<stem>.safetensors.index.json``, which maps every
tensor key to its shard (``weight_map``) and holds the JSON document under ``metadata.optstate``.

Writing streams: the header goes first (it needs only each tensor's shape and dtype), then each
tensor as it is produced, so memory stays near one tensor. A tensor that is a view of a file (a
memory map) is copied file to file inside the kernel (``copy_file_range``). Reading memory-maps.

Integrity: every file records an XXH3-64 checksum of each tensor's bytes (``__metadata__["optstate_xxh3"]``,
a JSON object ``key -> 16 hex digits``), written into the header once the tensors are written. Before a
written file is renamed into place it is read back (its header parsed, its sizes and every checksum
checked), and :func:`load` checks every checksum it finds: a tensor whose bytes changed is refused by name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import pathlib
import re
import stat
import struct
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import xxhash
from isal.isal_zlib import crc32  # ISA-L's: the same values as zlib.crc32, 28 GB/s here against zlib's 4.2

from ..atomic import atomic_file, atomic_files, check_soon
from ..errors import FormatError
from .mapped import (
    COPY_MIN_BYTES,
    MAX_SYSCALL_BYTES,
    FileMapping,
    Recorded,
    SourceFiles,
    copy_span,
    file_blocks,
    file_span,
    note_recorded,
    read_into_memory,
    recorded,
    shared_file_mappings,
)
from .state import Metadata, OptimizerState, ParamInfo, ParamPath, numpy_dtype, values_checked_beside

if TYPE_CHECKING:  # the format registry's option records; at run time the schema imports no converter
    from ..converters.formats import ReadOptions, WriteOptions

FORMAT_VERSION = 1
METADATA_KEY = "optstate"
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_SUFFIX = ".safetensors.index.json"
SHARD_KEY = "optstate_shard"  # a shard's __metadata__: "k/N"
SAVE_KEY = "optstate_save"  # one id per save, in the index and every shard: shards of two saves never mix
CHECKSUM_KEY = "optstate_xxh3"  # a file's __metadata__: JSON {tensor key: XXH3-64 of its bytes, 16 hex digits}
MAX_JSON_DEPTH = 64  # deeper JSON is refused: no document optstate writes nests past a dozen levels
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size

_CHUNK_BYTES = 16 << 20  # the most a byte swap or a gather of a strided array copies at once

# safetensors code -> NumPy's name of the dtype (ml_dtypes' for the 16- and 8-bit floats), stored little-endian
_SAFETENSORS_NAMES: Mapping[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_CODES = {name: code for code, name in _SAFETENSORS_NAMES.items()}


def safetensors_dtype(code: str) -> np.dtype | None:
    """The little-endian NumPy dtype of a safetensors code (``None`` for an unknown code).

    >>> safetensors_dtype("F32"), safetensors_dtype("BF16"), safetensors_dtype("F128")
    (dtype('float32'), dtype(bfloat16), None)
    """
    name = _SAFETENSORS_NAMES.get(code)
    if name is None:
        return None
    dtype = numpy_dtype(name)
    return dtype if sys.byteorder == "little" else dtype.newbyteorder("<")  # native: prints as 'float32'


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code of a NumPy dtype.

    >>> dtype_code(np.dtype("float32")), dtype_code(numpy_dtype("bfloat16"))
    ('F32', 'BF16')
    """
    dtype = np.dtype(dtype)
    code = _CODES.get(dtype.name)
    if code is None or safetensors_dtype(code) != dtype.newbyteorder("<"):
        raise FormatError(f"dtype {dtype} has no safetensors code")
    return code


def _escape(component: str) -> str:
    return component.replace("%", "%25").replace("/", "%2F")


def _unescape(component: str) -> str:
    return component.replace("%2F", "/").replace("%25", "%")


def tensor_key(kind: str, path: ParamPath) -> str:
    """The key of one tensor in the file.

    >>> tensor_key("first_moment", ("layers", "0", "a/b"))
    'first_moment/layers/0/a%2Fb'
    """
    return "/".join((kind, *map(_escape, path)))


def parse_tensor_key(key: str) -> tuple[str, ParamPath]:
    """A tensor key's kind (slot name, or ``"model"``) and parameter path: :func:`tensor_key` undone.

    >>> parse_tensor_key(tensor_key("first_moment", ("fc", "w/b")))
    ('first_moment', ('fc', 'w/b'))
    """
    kind, *rest = key.split("/")
    return kind, tuple(map(_unescape, rest))


# ----------------------------------------------------------------------------- metadata


def encode_extra(value: Any) -> Any:
    """Free-form metadata (a torch scheduler's state) as JSON: Counters tagged, tuples as lists.

    >>> encode_extra({"milestones": Counter({2: 1}), "betas": (0.9, 0.99)})
    {'milestones': {'__counter__': [[2, 1]]}, 'betas': [0.9, 0.99]}
    """
    if isinstance(value, Counter):
        return {"__counter__": [[encode_extra(k), v] for k, v in value.items()]}
    if isinstance(value, Mapping):
        return {str(k): encode_extra(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_extra(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FormatError(f"metadata value of type {type(value).__name__} cannot be stored")


def decode_extra(value: Any) -> Any:
    """:func:`encode_extra` undone: tagged Counters back (lists stay lists; param groups turn them to tuples).

    >>> decode_extra({"milestones": {"__counter__": [[2, 1]]}})
    {'milestones': Counter({2: 1})}
    """
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return Counter({decode_extra(k): v for k, v in value["__counter__"]})
        return {k: decode_extra(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_extra(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    # JSON has no tuples; torch's hyperparameters (betas) are tuples.
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def state_metadata(state: OptimizerState) -> dict[str, Any]:
    """Everything but the arrays, as a JSON-ready document (also the Optax sidecar)."""
    return {
        "format_version": FORMAT_VERSION,
        "optimizer": state.optimizer,
        "param_groups": [encode_extra(g) for g in state.param_groups],
        "params": [
            {"path": list(p.path), "shape": list(p.shape), "dtype": p.dtype, "group": p.group, "step": p.step}
            for p in state.params
        ],
        "weights": None
        if state.weights is None
        else [{"path": list(path), "shape": list(a.shape), "dtype": str(a.dtype)} for path, a in state.weights.items()],
        "buffers": [list(p) for p in state.buffers],
        "slots": [{"slot": slot, "path": list(path), "dtype": str(a.dtype)} for (slot, path), a in state.slots.items()],
        "metadata": encode_extra(state.metadata.to_json()),
    }


def check_format_version(meta: Mapping[str, Any], source: str) -> None:
    """Refuse a document of another format version, naming both.

    >>> check_format_version({"format_version": 2}, "s.safetensors")
    Traceback (most recent call last):
    optstate.errors.FormatError: s.safetensors: format_version 2 is not supported; this optstate reads format_version 1
    """
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{source}: format_version {version!r} is not supported; "
            f"this optstate reads format_version {FORMAT_VERSION}"
        )


def state_from_metadata(
    meta: Mapping[str, Any], arrays: Mapping[tuple[str, ParamPath], np.ndarray], source: str
) -> OptimizerState:
    """Rebuild an OptimizerState from its JSON document and ``(kind, path) -> array``."""
    check_format_version(meta, source)
    try:
        params = tuple(
            ParamInfo(tuple(p["path"]), tuple(p["shape"]), p["dtype"], p["group"], p["step"]) for p in meta["params"]
        )
        slots = {(s["slot"], tuple(s["path"])): arrays[(s["slot"], tuple(s["path"]))] for s in meta["slots"]}
        weights = (
            None
            if meta["weights"] is None
            else {tuple(w["path"]): arrays[("model", tuple(w["path"]))] for w in meta["weights"]}
        )
        with values_checked_beside(source):
            return OptimizerState(
                optimizer=meta["optimizer"],
                param_groups=tuple({k: _from_json(v) for k, v in g.items()} for g in meta["param_groups"]),
                params=params,
                slots=slots,
                weights=weights,
                buffers=tuple(tuple(b) for b in meta["buffers"]),
                metadata=Metadata.from_json(decode_extra(meta.get("metadata", {}))),
            )
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: malformed optstate metadata ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- writing


class _Entry(NamedTuple):
    key: str
    value: Any  # an ndarray, or a lazy array-like: .shape, .dtype, __array__()
    dtype: np.dtype  # little-endian
    shape: tuple[int, ...]
    nbytes: int


def _entries(tensors: Iterable[tuple[str, Any]]) -> list[_Entry]:
    entries, seen = [], set()
    for key, value in tensors:
        if key in seen or key == "__metadata__":
            raise FormatError(f"tensor key {key!r} occurs twice (or is reserved)")
        seen.add(key)
        dtype_code(value.dtype)  # one that safetensors stores
        dtype, shape = np.dtype(value.dtype).newbyteorder("<"), tuple(int(d) for d in value.shape)
        entries.append(_Entry(key, value, dtype, shape, math.prod(shape) * dtype.itemsize))
    return entries


def _header(entries: Sequence[_Entry], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        header[e.key] = {
            "dtype": dtype_code(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def _c_order_blocks(array: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    if array.nbytes <= _CHUNK_BYTES or (array.flags.c_contiguous and array.dtype == dtype):
        yield np.ascontiguousarray(array, dtype=dtype)
        return
    row_bytes = array.nbytes // len(array)
    if row_bytes > _CHUNK_BYTES:
        for row in array:
            yield from _c_order_blocks(row, dtype)
    else:
        rows = _CHUNK_BYTES // row_bytes
        for i in range(0, len(array), rows):
            yield np.ascontiguousarray(array[i : i + rows], dtype=dtype)


def little_endian_bytes(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s bytes in C order and little-endian, as uint8 arrays: one view when it is both
    already, else copies of at most 16 MiB (byte-swapped, gathered from strides). The torch file
    writer (:mod:`optstate.converters.torch.ptfile`) lays tensors out the same way.

    >>> [block.tolist() for block in little_endian_bytes(np.array([1, 2], dtype=">u2"))]
    [[1, 0, 2, 0]]
    """
    for block in _c_order_blocks(array, array.dtype.newbyteorder("<")):
        yield block.reshape(-1).view(np.uint8)


def write_all(fd: int, data: np.ndarray) -> None:
    """Write all of ``data``'s bytes at ``fd``'s position, however many ``os.write`` calls that takes (one
    writes at most 1 GiB here; Linux writes at most about 2 GiB a call).

    >>> import tempfile
    >>> fd, name = tempfile.mkstemp()
    >>> write_all(fd, np.frombuffer(b"abc", np.uint8)); os.close(fd)
    >>> pathlib.Path(name).read_bytes()
    b'abc'
    """
    view = data.data
    try:
        while view:
            view = view[os.write(fd, view[:MAX_SYSCALL_BYTES]) :]
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise
        # The kernel found no page behind the buffer: a memory-mapped input was truncated while being read.
        raise FormatError(
            "a memory-mapped input shrank while it was being read (the write said "
            f"[Errno {errno.EFAULT}] Bad address); another process truncated or rewrote it"
        ) from None


_NO_CHECKSUM = "0" * 16  # the header's placeholder, the same width as every checksum written over it


def checksum(data: Any) -> str:
    """The XXH3-64 checksum of an array's bytes (C order, as stored), as the 16 hex digits the file records.

    >>> checksum(np.zeros(0, np.uint8)), len(checksum(np.arange(3.0)))
    ('2d06800538d394c2', 16)
    """
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)


def file_checksums(
    path: str | os.PathLike, spans: Mapping[str, tuple[int, int]], fd: int | None = None
) -> dict[str, str]:
    """The checksum of each ``key -> (offset, nbytes)`` range of the file at ``path`` (:func:`file_blocks`; ``fd``:
    that file already open).

    >>> import tempfile
    >>> f = tempfile.mkdtemp() + "/b"; _ = pathlib.Path(f).write_bytes(np.arange(3.0).tobytes())
    >>> file_checksums(f, {"all": (0, 24)})["all"] == checksum(np.arange(3.0))
    True
    """
    found = {}
    for key, (offset, nbytes) in spans.items():
        hasher = xxhash.xxh3_64()
        for block in file_blocks(path, offset, nbytes, f"tensor {key!r}", fd):
            hasher.update(block)
        found[key] = hasher.hexdigest()
    return found


def file_crc32_xxh3(
    path: str | os.PathLike, offset: int, nbytes: int, what: str, fd: int | None = None
) -> tuple[int, str]:
    """The CRC-32 and the XXH3-64 of ``nbytes`` bytes at ``offset`` of a file, in one pass (:func:`file_blocks`).

    >>> import tempfile, zlib
    >>> f = tempfile.mkdtemp() + "/b"; _ = pathlib.Path(f).write_bytes(b"abc")
    >>> file_crc32_xxh3(f, 0, 3, "the letters") == (zlib.crc32(b"abc"), xxhash.xxh3_64_hexdigest(b"abc"))
    True
    """
    crc, hasher = 0, xxhash.xxh3_64()
    for block in file_blocks(path, offset, nbytes, what, fd):
        crc = crc32(block, crc)
        hasher.update(block)
    return crc, hasher.hexdigest()


class _Intended(NamedTuple):
    """What a tensor's bytes in the output must be: their XXH3-64, taken from the source or, for a tensor of a
    canonical file copied whole, the one that file records; or, for a record of a torch zip copied whole
    (``crc32`` set), the CRC-32 that zip records for it, checked on read-back (the checksum then recorded is the
    one read back). Either way a tensor copied whole is not read from its source a second time to hash it."""

    xxh3: str | None
    crc32: int | None = None
    source: str = ""


def _write_tensor(
    fd: int,
    entry: _Entry,
    array: np.ndarray,
    mappings: Sequence[FileMapping] | None,
    hashing: ThreadPoolExecutor,
    sources: SourceFiles,
) -> _Intended:
    """Write one entry's materialised ``array`` at ``fd``'s position; return what the bytes written must read
    back as (:class:`_Intended`). ``hashing`` computes a mapped array's checksum from its file while the
    kernel copies it from ``sources``."""
    if array.shape != entry.shape or array.dtype.newbyteorder("<") != entry.dtype:
        raise FormatError(
            f"tensor {entry.key!r}: the array has shape {list(array.shape)} and dtype {array.dtype}, "
            f"the header declared shape {list(entry.shape)} and dtype {entry.dtype}"
        )
    done, span = 0, None
    if array.nbytes >= COPY_MIN_BYTES and array.dtype == entry.dtype:
        span = file_span(array, mappings)
    src = None if span is None else sources.fd(span)
    if span is not None and src is not None:
        known = recorded(span, array.nbytes) or Recorded()  # what the input records of these bytes, if anything
        source = None
        if known == Recorded():
            # The source read a second time, beside the copy, from the file the copy reads (pread into a buffer:
            # no page faults, and the hash lets go of the GIL): bytes that change under the copy show on read-back.
            source = hashing.submit(file_checksums, span.path, {entry.key: (span.offset, array.nbytes)}, src)
        done = copy_span(span, fd, array.nbytes, sources)
        if done == array.nbytes:
            if source is not None:
                return _Intended(source.result()[entry.key])
            return _Intended(known.xxh3, known.crc32, span.path)  # a file records one of the two
        # The copy failed: the array's bytes are written from memory, its checksum taken from there.
        if source is not None and not source.cancel():  # already running: waited for, what it found no longer matters
            with contextlib.suppress(FormatError, OSError):
                source.result()
    if done:
        write_all(fd, array.reshape(-1).view(np.uint8)[done:])
        return _Intended(checksum(array))
    if mappings is not None:  # a mapped array not copied in the kernel (small): its hash must not meet a SIGBUS
        array = read_into_memory(array, mappings, f"tensor {entry.key!r}", sources)
    hasher = xxhash.xxh3_64()
    for block in little_endian_bytes(array):
        write_all(fd, block)
        hasher.update(block.data)
    return _Intended(hasher.hexdigest())


def _with_checksums(metadata: Mapping[str, str], checksums: Mapping[str, str]) -> dict[str, str]:
    return {**metadata, CHECKSUM_KEY: json.dumps(checksums, separators=(",", ":"))}


def _write_file(
    path: str | os.PathLike,
    entries: Sequence[_Entry],
    metadata: Mapping[str, str],
    progress: Callable[[int], Any] | None,
    destination: str | os.PathLike | None = None,
) -> None:
    """Write a safetensors file into ``path``, an empty file (a fresh temporary), with each tensor's checksum
    in its header; then read it back (:func:`verify_written`; errors name ``destination``)."""
    # Arrays that exist now keep their mappings alive for the whole write, so one snapshot serves
    # them all; a lazy entry's array may be mapped later, at an address an old mapping had: read anew.
    mappings = shared_file_mappings()
    checksums = dict.fromkeys((e.key for e in entries), _NO_CHECKSUM)
    intended: dict[str, _Intended] = {}
    header = _header(entries, _with_checksums(metadata, checksums))
    # Not "wb": ext4 starts writing back, on close, a file that was truncated to zero and rewritten.
    # Two hashing threads: a mapped tensor's source is hashed beside its copy, and the tensor written
    # before it is read back meanwhile, so the checks overlap the copying instead of following it.
    read_back: list[Future] = []
    offset = len(header)
    with (
        open(path, "r+b", buffering=0) as f,
        SourceFiles() as sources,  # closed after the threads that read them are done
        ThreadPoolExecutor(1) as ahead,
        ThreadPoolExecutor(2) as hashing,
    ):
        write_all(f.fileno(), np.frombuffer(header, np.uint8))
        # The next lazy entry (a layout move: a transpose) is computed while this one is written; two
        # tensors in memory at most, and both cores busy.
        pending = ahead.submit(np.asarray, entries[0].value) if entries else None
        for i, entry in enumerate(entries):
            assert pending is not None  # one is submitted for each entry
            array = pending.result()
            pending = ahead.submit(np.asarray, entries[i + 1].value) if i + 1 < len(entries) else None
            mapped = mappings if isinstance(entry.value, np.ndarray) else None
            intended[entry.key] = _write_tensor(f.fileno(), entry, array, mapped, hashing, sources)
            what = f"tensor {entry.key!r}"
            read_back.append(hashing.submit(file_crc32_xxh3, path, offset, entry.nbytes, what))
            offset += entry.nbytes
            del array  # released before the one after next is made
            if progress is not None:
                progress(entry.nbytes)
        read = _checked_against_recorded_crc32s(entries, intended, [done.result() for done in read_back])
        checksums.update({key: it.xxh3 or read[key] for key, it in intended.items()})
        final = _header(entries, _with_checksums(metadata, checksums))
        if len(final) != len(header):  # fixed-width digits: the data offsets stay where they are
            raise AssertionError("the header changed length when its checksums were filled in")
        os.pwrite(f.fileno(), final, 0)
    verify_written(path, entries, checksums, destination or path, read)


def _checked_against_recorded_crc32s(
    entries: Sequence[_Entry], intended: Mapping[str, _Intended], read_back: Sequence[tuple[int, str]]
) -> dict[str, str]:
    """The XXH3-64 of each tensor read back, once each tensor copied whole from a torch zip's record read back
    with the CRC-32 that zip records for it (a mismatch: the input is damaged, or changed under the copy)."""
    for entry, (crc, _) in zip(entries, read_back, strict=True):
        it = intended[entry.key]
        if it.crc32 is not None and crc != it.crc32:
            raise FormatError(
                f"{it.source}: tensor {entry.key!r} reads back with CRC-32 {crc:08x}, the input's zip records "
                f"{it.crc32:08x} for its bytes (the input is damaged, or changed while it was copied)"
            )
    return {entry.key: digest for entry, (_, digest) in zip(entries, read_back, strict=True)}


def verify_written(
    path: str | os.PathLike,
    entries: Sequence[_Entry],
    checksums: Mapping[str, str],
    destination: str | os.PathLike,
    read_back: Mapping[str, str] | None = None,
) -> None:
    """Read back a file just written, before it is renamed into place: its header parses, it holds the
    entries' tensors with their shapes and dtypes, and each tensor's bytes have the checksum computed as
    it was written (``read_back``: the checksums of the file's tensors, read back as each was written;
    read now when ``None``). Catches another process, or a bad disk, changing the file or its source."""
    where = os.fspath(destination)
    try:
        layout, metadata, data_start = _read_layout(path)
    except FormatError as exc:
        raise FormatError(f"{where}: the file written does not read back: {exc}") from None
    if metadata.get(CHECKSUM_KEY) != json.dumps(dict(checksums), separators=(",", ":")):
        raise FormatError(f"{where}: the file written reads back with another header than was written")
    if set(layout) != {e.key for e in entries}:
        raise FormatError(f"{where}: the file written reads back with other tensors than were written")
    for entry in entries:
        dtype, shape, *_ = layout[entry.key]
        if shape != entry.shape or dtype != entry.dtype:
            raise FormatError(f"{where}: tensor {entry.key!r} does not read back as written")
    actuals = (
        read_back
        if read_back is not None
        else file_checksums(path, {key: (data_start + begin, end - begin) for key, (*_, begin, end) in layout.items()})
    )
    for entry in entries:
        actual = actuals[entry.key]
        if actual != checksums[entry.key]:
            raise FormatError(
                f"{where}: tensor {entry.key!r} reads back with checksum {actual}, written with "
                f"{checksums[entry.key]} (the file, or the input it was copied from, changed while being written)"
            )


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, Any]],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> None:
    """Write ``(key, array)`` pairs in the safetensors layout, atomically, streaming one tensor at a time.

    An array may be lazy: any object with ``.shape``, ``.dtype`` and ``__array__()``; the header is
    written from the shapes and dtypes, then each array is materialised, checked against its header
    entry, written and released before the next. ``progress(nbytes)`` is called after each tensor.

    >>> import tempfile, numpy as np, safetensors.numpy
    >>> f = tempfile.mkdtemp() + "/t.safetensors"
    >>> write_safetensors(f, [("a", np.arange(3, dtype=">i4"))], {})
    >>> safetensors.numpy.load_file(f)["a"].tolist()
    [0, 1, 2]
    """
    entries = _entries(tensors)
    with atomic_file(path, force=force, fsync=fsync) as tmp:
        _write_file(tmp, entries, metadata, progress, path)


def _shard_stem(path: pathlib.Path) -> str:
    for suffix in (INDEX_SUFFIX, ".safetensors"):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _plan_shards(entries: Sequence[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Entries in order, cut into shards of at most ``max_bytes`` of data; a bigger tensor alone."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _is_file_name(name: Any) -> bool:
    """A plain file name: no directory part, no ``..``: a shard lies beside its index."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and os.path.basename(name) == name
        and "\0" not in name
        and "\\" not in name
    )


def _shard_name(stem: str, k: int, n: int, save_id: str | None = None) -> str:
    """Hugging Face's shard name; with ``save_id``, one no earlier save used (a save over an existing one)."""
    return (
        f"{stem}-{k:05d}-of-{n:05d}.safetensors"
        if save_id is None
        else f"{stem}-{save_id[:8]}-{k:05d}-of-{n:05d}.safetensors"
    )


def shard_pattern(stem: str) -> re.Pattern[str]:
    """The names optstate gives the shards of ``stem``: Hugging Face's, or with a save's id where a save
    replaced an existing one.

    >>> bool(shard_pattern("s").fullmatch("s-00001-of-00002.safetensors")), bool(shard_pattern("s").fullmatch(
    ...     "s-0123abcd-00001-of-00002.safetensors"))
    (True, True)
    """
    return re.compile(re.escape(stem) + r"-(?:[0-9a-f]{8}-)?\d{5}-of-\d{5}\.safetensors")


def _indexed_shards(index: pathlib.Path, stem: str) -> set[str]:
    """The names of our shards of ``stem`` that an existing index lists (none when it is unreadable)."""
    pattern = shard_pattern(stem)
    try:
        weight_map = strict_json_loads(index.read_bytes(), os.fspath(index))["weight_map"]
        return {name for name in weight_map.values() if isinstance(name, str) and pattern.fullmatch(name)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, FormatError):
        return set()


def write_sharded(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, Any]],
    document: Mapping[str, Any],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> pathlib.Path:
    """Write the tensors as ``<stem>-0000k-of-0000N.safetensors`` shards plus ``<stem>.safetensors.index.json``.

    ``path`` names the index or ends in ``.safetensors`` (the stem). All files go to temporary names
    and are fsynced, the shards renamed, then the index last: an index always names shards of its
    own save (each shard carries the save's id, checked on reading). ``force`` replaces an existing
    sharded save whole, and the old one stays readable until the new one is: where a shard name is
    taken, the new shards are named ``<stem>-<save id>-0000k-of-0000N.safetensors``, and the shards
    the old index listed are removed only once the new index is in place. Returns the index path.

    >>> import tempfile, numpy as np
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_sharded(d / "w.safetensors", [("a", np.zeros(4)), ("b", np.ones(4))], {}, max_shard_bytes=32).name
    'w.safetensors.index.json'
    >>> sorted(p.name for p in d.iterdir())
    ['w-00001-of-00002.safetensors', 'w-00002-of-00002.safetensors', 'w.safetensors.index.json']
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = pathlib.Path(path)
    stem = _shard_stem(path)
    index = path.with_name(stem + INDEX_SUFFIX)
    shards = _plan_shards(_entries(tensors), max_shard_bytes)
    save_id = uuid.uuid4().hex
    names = [_shard_name(stem, k, len(shards)) for k in range(1, len(shards) + 1)]
    if force and any(os.path.lexists(index.with_name(n)) for n in names):  # never over a shard an old index names
        names = [_shard_name(stem, k, len(shards), save_id) for k in range(1, len(shards) + 1)]
    stale = _indexed_shards(index, stem) - set(names) if force else set()
    document = {
        "metadata": {
            "total_size": sum(e.nbytes for shard in shards for e in shard),
            SAVE_KEY: save_id,
            METADATA_KEY: dict(document),
        },
        "weight_map": {e.key: name for name, shard in zip(names, shards, strict=True) for e in shard},
    }
    with atomic_files([*(index.with_name(n) for n in names), index], force=force, fsync=fsync) as tmps:
        for k, (tmp, shard) in enumerate(zip(tmps, shards, strict=False), 1):  # the last tmp is the index's
            _write_file(
                tmp,
                shard,
                {SHARD_KEY: f"{k}/{len(shards)}", SAVE_KEY: save_id},
                progress,
                index.with_name(names[k - 1]),
            )
        tmps[-1].write_text(json.dumps(document, indent=2))
    for name in stale:
        index.with_name(name).unlink(missing_ok=True)
    return index


def save(
    state: OptimizerState,
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    max_shard_bytes: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> pathlib.Path:
    """Write ``state`` as a canonical file, atomically, one tensor at a time; returns the path to :func:`load`.

    With ``max_shard_bytes``, or a ``path`` ending in ``.safetensors.index.json``, the tensors go to
    shards of at most that many bytes of data (default 5 GB) beside an index (see :func:`write_sharded`).
    ``fsync=False`` skips the fsyncs (still atomic renames, not durable against a crash).
    ``progress(nbytes)`` is called after each tensor is written.

    >>> import tempfile, numpy as np, optstate
    >>> from optstate.schema.state import OptimizerState, ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> f = tempfile.mkdtemp() + "/s.safetensors"
    >>> load(save(s, f)).param_groups[0]["lr"]
    0.1
    >>> save(s, f, max_shard_bytes=2**20).name
    's.safetensors.index.json'
    """
    path = pathlib.Path(path)
    tensors = ((tensor_key(kind, p), a) for kind, p, a in state.iter_tensors())
    if max_shard_bytes is not None or path.name.endswith(INDEX_SUFFIX):
        return write_sharded(
            path,
            tensors,
            state_metadata(state),
            force=force,
            fsync=fsync,
            progress=progress,
            max_shard_bytes=DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
        )
    write_safetensors(
        path, tensors, {METADATA_KEY: json.dumps(state_metadata(state))}, force=force, fsync=fsync, progress=progress
    )
    return path


# ----------------------------------------------------------------------------- reading


def strict_json_loads(text: str | bytes, source: str) -> Any:
    """``json.loads`` that refuses a key repeated in one object, naming the key and ``source``: plain
    ``json.loads`` keeps the last one silently, so an edited or corrupted file would read as another state.

    >>> strict_json_loads('{"a": 1, "b": {"c": 2}}', "f.json")
    {'a': 1, 'b': {'c': 2}}
    >>> strict_json_loads('{"a": 1, "a": 2}', "f.json")
    Traceback (most recent call last):
    optstate.errors.FormatError: f.json: key 'a' appears twice in one JSON object (expected each key once)

    JSON nested deeper than ``MAX_JSON_DEPTH`` levels is refused too (Python's parser would end in a
    RecursionError, or hand on a document that every later walk of it would):

    >>> strict_json_loads("[" * 100000 + "]" * 100000, "f.json")
    Traceback (most recent call last):
    optstate.errors.FormatError: f.json: JSON nested deeper than 64 levels (expected a few)
    >>> strict_json_loads("{not json", "f.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: f.json: not valid JSON (Expecting property name enclosed in double quotes: ...)
    """

    def refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise FormatError(f"{source}: key {key!r} appears twice in one JSON object (expected each key once)")
            document[key] = value
        return document

    too_deep = FormatError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels (expected a few)")
    try:
        document = json.loads(text, object_pairs_hook=refuse_repeated_keys)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError from bytes that are not UTF-8
        raise FormatError(f"{source}: not valid JSON ({exc})") from None
    if json_depth(document) > MAX_JSON_DEPTH:
        raise too_deep
    return document


def json_depth(document: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON document (a scalar: 0), without recursion.

    >>> json_depth({"a": [1, {"b": []}]}), json_depth(3)
    (4, 0)
    """
    deepest, pending = 0, [(document, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def refuse_special_file(path: str | os.PathLike) -> None:
    """Refuse an input that is neither a regular file nor a directory (a FIFO, a device, a socket) before
    anything opens it: reading one blocks forever or never ends. Symbolic links are followed (a Hugging
    Face hub cache links to its blobs); a missing path passes, for the reader to name.

    >>> import tempfile
    >>> fifo = tempfile.mkdtemp() + "/f.pt"; os.mkfifo(fifo)
    >>> refuse_special_file(fifo)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: .../f.pt: a named pipe (FIFO), not a regular file or a directory; ...
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "special file")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FormatError(
            f"{os.fspath(path)}: a {kind}, not a regular file or a directory; optstate reads checkpoint "
            "files and directories only (copy the data to a file first)"
        )


def _header_entry(key: str, entry: Any, source: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{source}: tensor {key!r}: malformed header entry")
    dtype = safetensors_dtype(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise FormatError(f"{source}: tensor {key!r}: unknown dtype {entry['dtype']!r}")
    # type() is int, not isinstance: JSON's true and false are bools, and bools are ints to isinstance
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"{source}: tensor {key!r}: malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise FormatError(f"{source}: tensor {key!r}: malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise FormatError(
            f"{source}: tensor {key!r}: shape {shape} of {entry['dtype']} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets span {end - begin}"
        )
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors-layout file strictly; arrays are read-only views of a memory map. With ``verify``,
    the tensors' checksums (``__metadata__["optstate_xxh3"]``, where optstate wrote them) are checked: now,
    or inside a conversion while it writes (:func:`optstate.atomic.checks_in_background`)."""
    entries, metadata, data_start = _read_layout(path)
    data_len = os.path.getsize(path) - data_start
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if data_len else np.empty(0, np.uint8)
    arrays = {key: data[begin:end].view(dtype).reshape(shape) for key, (dtype, shape, begin, end) in entries.items()}
    if verify and CHECKSUM_KEY in metadata:
        spans = {key: (data_start + begin, end - begin) for key, (*_, begin, end) in entries.items()}
        with contextlib.suppress(FormatError):  # refused by check_checksums, naming what is wrong
            recorded_xxh3 = strict_json_loads(metadata[CHECKSUM_KEY], os.fspath(path))
            if isinstance(data, np.memmap) and isinstance(recorded_xxh3, dict):
                # A writer copying a tensor whole checks its read-back against the checksum recorded here.
                xxh3s = {span: recorded_xxh3.get(key) for key, span in spans.items()}
                note_recorded(data, {span: Recorded(xxh3=x) for span, x in xxh3s.items() if isinstance(x, str)})
        # In a conversion, beside the writing: its output is renamed into place only once this passed.
        check_soon(functools.partial(check_checksums, path, spans, metadata[CHECKSUM_KEY]))
    return arrays, metadata


_Layout = dict[str, tuple[np.dtype, tuple[int, ...], int, int]]  # key -> dtype, shape, data offsets


def _read_layout(path: str | os.PathLike) -> tuple[_Layout, dict[str, str], int]:
    """A safetensors file's tensors (``key -> (dtype, shape, begin, end)`` within the data), its
    ``__metadata__`` and where its data starts, checked strictly: the data exactly covered, no overlap."""
    source = os.fspath(path)
    refuse_special_file(path)
    size = os.path.getsize(path)
    if size < 8:
        raise FormatError(f"{source}: truncated: {size} bytes, not even a header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise FormatError(
                f"{source}: header length {header_len} does not fit a file of {size} bytes "
                "(truncated or not a safetensors file)"
            )
        header = strict_json_loads(f.read(header_len), f"{source}: header")
    if not isinstance(header, dict):
        raise FormatError(f"{source}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"{source}: __metadata__ must map strings to strings")
    entries = {key: _header_entry(key, entry, source) for key, entry in header.items()}
    data_len = size - 8 - header_len
    expected = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != expected:
            raise FormatError(
                f"{source}: tensor {key!r} starts at byte {begin}, expected {expected} "
                "(overlapping or non-contiguous data)"
            )
        expected = end
    if expected != data_len:
        raise FormatError(
            f"{source}: tensors cover {expected} bytes of data, the file holds {data_len} (truncated or trailing bytes)"
        )
    return entries, metadata, 8 + header_len


def check_checksums(path: str | os.PathLike, spans: Mapping[str, tuple[int, int]], recorded: str) -> None:
    """Refuse a file whose tensors (``key -> (offset, nbytes)`` in the file) do not have the checksums its
    header records (``recorded``, the JSON object), naming the first tensor that differs; every tensor
    must have one.

    >>> import tempfile
    >>> f = tempfile.mkdtemp() + "/s.safetensors"; _ = pathlib.Path(f).write_bytes(np.arange(3.0).tobytes())
    >>> check_checksums(f, {"w": (0, 24)}, json.dumps({"w": checksum(np.arange(3.0))}))
    >>> check_checksums(f, {"w": (0, 24)}, json.dumps({"w": "0" * 16}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: .../s.safetensors: tensor 'w' has checksum ..., the file records 0000000000000000 ...
    """
    source = os.fspath(path)
    checksums = strict_json_loads(recorded, f"{source}: {CHECKSUM_KEY}")
    if not (isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())):
        raise FormatError(f"{source}: {CHECKSUM_KEY} is not a JSON object of tensor names to checksums")
    if set(checksums) != set(spans):
        odd = sorted(set(checksums) ^ set(spans))[0]
        raise FormatError(f"{source}: tensor {odd!r} is in the file or in its checksums ({CHECKSUM_KEY}), not both")
    for key, actual in file_checksums(path, spans).items():
        if actual != checksums[key]:
            raise FormatError(
                f"{source}: tensor {key!r} has checksum {actual}, the file records {checksums[key]} "
                "(its bytes changed since it was written: a bad disk, a partial copy or an edit)"
            )


def _state_from_tensors(meta: Any, arrays: Mapping[str, np.ndarray], source: str) -> OptimizerState:
    """The state from its JSON document and ``key -> array``, which must hold exactly the tensors it lists."""
    if not isinstance(meta, dict):
        raise FormatError(f"{source}: optstate metadata is not a JSON object")
    check_format_version(meta, source)
    by_kind_path = {parse_tensor_key(key): a for key, a in arrays.items()}
    try:
        expected = {(s["slot"], tuple(s["path"])) for s in meta["slots"]}
        expected |= {("model", tuple(w["path"])) for w in (meta["weights"] or [])}
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{source}: malformed optstate metadata ({type(exc).__name__}: {exc})") from None
    if set(by_kind_path) != expected:
        extra = sorted(set(by_kind_path) - expected)[:3]
        missing = sorted(expected - set(by_kind_path))[:3]
        raise FormatError(f"{source}: tensors do not match the metadata (missing: {missing}, unexpected: {extra})")
    return state_from_metadata(meta, by_kind_path, source)


def _read_index(index: pathlib.Path) -> tuple[dict[str, Any], dict[str, str]]:
    """An index's ``metadata`` and ``weight_map``, checked for shape; shard names must be plain file names."""
    source, size = os.fspath(index), index.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise FormatError(f"{source}: {size} bytes, too large for an index")
    document = strict_json_loads(index.read_bytes(), source)
    if not (
        isinstance(document, dict)
        and isinstance(document.get("metadata"), dict)
        and isinstance(document.get("weight_map"), dict)
    ):
        raise FormatError(f"{source}: not a safetensors index (a JSON object with 'metadata' and 'weight_map')")
    for key, shard in document["weight_map"].items():
        if not _is_file_name(shard):
            raise FormatError(f"{source}: tensor {key!r}: shard {shard!r} is not a file name beside the index")
    return document["metadata"], document["weight_map"]


def _read_shard(
    index: pathlib.Path, shard: str, keys: set[str], save_id: Any, weight_map: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """One shard's arrays, which must be exactly the tensors the index places in it, of the same save."""
    path = index.with_name(shard)
    if not path.is_file():
        raise FormatError(f"{index}: shard {shard} (holding {sorted(keys)[0]!r}) is missing")
    arrays, metadata = read_safetensors(path)
    if metadata.get(SAVE_KEY) != save_id:
        raise FormatError(
            f"{path}: written by another save than {index} ({SAVE_KEY} {metadata.get(SAVE_KEY)!r}, "
            f"the index has {save_id!r})"
        )
    missing, extra = sorted(keys - arrays.keys()), sorted(arrays.keys() - keys)
    if missing:
        raise FormatError(f"{path}: tensor {missing[0]!r} is missing; the index {index.name} places it in this shard")
    if extra:
        elsewhere = weight_map.get(extra[0])
        raise FormatError(
            f"{path}: holds tensor {extra[0]!r}, which the index {index.name} "
            + (f"places in {elsewhere}" if elsewhere else "does not list")
        )
    return arrays


def _read_shards(index: pathlib.Path, metadata: Mapping[str, Any], weight_map: Mapping[str, str]) -> dict[str, Any]:
    """Every tensor the index lists, each shard holding exactly those the index places in it."""
    keys_by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, set()).add(key)
    arrays: dict[str, np.ndarray] = {}
    for shard, keys in keys_by_shard.items():
        arrays.update(_read_shard(index, shard, keys, metadata.get(SAVE_KEY), weight_map))
    return arrays


def read_sharded_safetensors(index: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of a sharded safetensors save (``*.safetensors.index.json`` and its shards, as Hugging
    Face writes them, or optstate) and the index's ``metadata``: :func:`read_safetensors` for each shard,
    with the index read strictly (shard names are plain file names beside it) and every shard checked
    to hold exactly what the index places in it.

    >>> import tempfile, json
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_safetensors(d / "m-00001-of-00001.safetensors", [("w", np.ones(2))], {})
    >>> _ = (d / "m.safetensors.index.json").write_text(json.dumps(
    ...     {"metadata": {}, "weight_map": {"w": "m-00001-of-00001.safetensors"}}))
    >>> read_sharded_safetensors(d / "m.safetensors.index.json")[0]["w"].tolist()
    [1.0, 1.0]
    """
    index = pathlib.Path(index)
    metadata, weight_map = _read_index(index)
    return _read_shards(index, metadata, weight_map), metadata


def _load_sharded(index: pathlib.Path) -> OptimizerState:
    metadata, weight_map = _read_index(index)
    if METADATA_KEY not in metadata:
        raise FormatError(f"{index}: a safetensors index without optstate metadata (model weights only?)")
    return _state_from_tensors(metadata[METADATA_KEY], _read_shards(index, metadata, weight_map), os.fspath(index))


def load(path: str | os.PathLike) -> OptimizerState:
    """Read a canonical file written by :func:`save` (or by any safetensors writer with our metadata),
    or the ``.safetensors.index.json`` of a sharded one. Arrays are read-only memory-mapped views.

    Example: see :func:`save`.
    """
    source = os.fspath(path)
    if source.endswith(INDEX_SUFFIX):
        return _load_sharded(pathlib.Path(path))
    arrays, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        if SHARD_KEY in metadata:
            raise FormatError(f"{source}: shard {metadata[SHARD_KEY]} of a sharded save; load its {INDEX_SUFFIX} file")
        raise FormatError(f"{source}: a safetensors file without optstate metadata (model weights only?)")
    meta = strict_json_loads(metadata[METADATA_KEY], f"{source}: optstate metadata")
    return _state_from_tensors(meta, arrays, source)


# ----------------------------------------------------------------------------- the "optstate" format's entries


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``optstate`` format (:mod:`optstate.converters.formats`): :func:`load`. The file
    records everything the options could say, so they are not needed.

    >>> import tempfile
    >>> from optstate.converters.formats import ReadOptions
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> read(save(s, tempfile.mkdtemp() + "/s.safetensors"), ReadOptions()).optimizer
    'sgd'
    """
    return load(path)


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``optstate`` format: :func:`save`, sharded when ``options.max_shard_bytes`` says so.

    >>> import tempfile
    >>> from optstate.converters.formats import WriteOptions
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write(s, d / "s.safetensors", WriteOptions(max_shard_bytes=2**20)); sorted(p.name for p in d.iterdir())
    ['s-00001-of-00001.safetensors', 's.safetensors.index.json']
    """
    save(
        state,
        path,
        force=options.force,
        fsync=options.fsync,
        max_shard_bytes=options.max_shard_bytes,
        progress=options.progress,
    )
