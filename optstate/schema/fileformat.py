"""The canonical file: the safetensors layout with optstate's JSON document in ``__metadata__``.

Layout: 8-byte little-endian header length, a JSON header, then raw little-endian tensor data.
Tensor keys are ``kind/path/joined/by/slashes`` where kind is a slot name or ``model``; ``%`` and
``/`` inside a path component are percent-escaped so every key parses back to one path.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from ..atomic import atomic_file
from ..errors import FormatError
from .state import OptimizerState, ParamInfo, Path

FORMAT_VERSION = 1
METADATA_KEY = "optstate"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code of a NumPy dtype.

    >>> dtype_code(np.dtype("float32")), dtype_code(np.dtype(ml_dtypes.bfloat16))
    ('F32', 'BF16')
    """
    code = _CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise FormatError(f"dtype {dtype} has no safetensors code")
    return code


def _escape(component: str) -> str:
    return component.replace("%", "%25").replace("/", "%2F")


def _unescape(component: str) -> str:
    return component.replace("%2F", "/").replace("%25", "%")


def tensor_key(kind: str, path: Path) -> str:
    """The key of one tensor in the file.

    >>> tensor_key("first_moment", ("layers", "0", "a/b"))
    'first_moment/layers/0/a%2Fb'
    """
    return "/".join((kind, *map(_escape, path)))


def parse_tensor_key(key: str) -> tuple[str, Path]:
    kind, *rest = key.split("/")
    return kind, tuple(map(_unescape, rest))


# ----------------------------------------------------------------------------- metadata

def encode_extra(value: Any) -> Any:
    """Free-form metadata (a torch scheduler's state) as JSON: Counters tagged, tuples as lists."""
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
        "weights": None if state.weights is None else [
            {"path": list(path), "shape": list(a.shape), "dtype": str(a.dtype)} for path, a in state.weights.items()],
        "buffers": [list(p) for p in state.buffers],
        "slots": [{"slot": slot, "path": list(path), "dtype": str(a.dtype)} for (slot, path), a in state.slots.items()],
        "metadata": encode_extra(state.metadata),
    }


def check_format_version(meta: Mapping[str, Any], source: str) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{source}: format_version {version!r} is not supported; "
                          f"this optstate reads format_version {FORMAT_VERSION}")


def state_from_metadata(meta: Mapping[str, Any], arrays: Mapping[tuple[str, Path], np.ndarray],
                        source: str) -> OptimizerState:
    """Rebuild an OptimizerState from its JSON document and ``(kind, path) -> array``."""
    check_format_version(meta, source)
    try:
        params = tuple(ParamInfo(tuple(p["path"]), tuple(p["shape"]), p["dtype"], p["group"], p["step"])
                       for p in meta["params"])
        slots = {(s["slot"], tuple(s["path"])): arrays[(s["slot"], tuple(s["path"]))] for s in meta["slots"]}
        weights = None if meta["weights"] is None else {
            tuple(w["path"]): arrays[("model", tuple(w["path"]))] for w in meta["weights"]}
        return OptimizerState(
            optimizer=meta["optimizer"],
            param_groups=tuple({k: _from_json(v) for k, v in g.items()} for g in meta["param_groups"]),
            params=params,
            slots=slots,
            weights=weights,
            buffers=tuple(tuple(b) for b in meta["buffers"]),
            metadata=decode_extra(meta.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: malformed optstate metadata ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- writing

def _little_endian(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str], *, force: bool = False) -> None:
    """Write ``(key, array)`` pairs in the safetensors layout, atomically, one tensor at a time."""
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, array in tensors:
        if key in header:
            raise FormatError(f"tensor key {key!r} occurs twice")
        nbytes = array.size * array.dtype.itemsize
        header[key] = {"dtype": dtype_code(array.dtype), "shape": list(array.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    with atomic_file(path, force=force) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(_little_endian(array).reshape(-1).view(np.uint8).data)


def save(state: OptimizerState, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write ``state`` as a canonical file.

    >>> import tempfile, numpy as np, optstate
    >>> from optstate.schema.state import OptimizerState, ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> f = tempfile.mkdtemp() + "/s.safetensors"
    >>> save(s, f); load(f).param_groups[0]["lr"]
    0.1
    """
    tensors = [(tensor_key(kind, p), a) for kind, p, a in state.iter_tensors()]
    write_safetensors(path, tensors, {METADATA_KEY: json.dumps(state_metadata(state))}, force=force)


# ----------------------------------------------------------------------------- reading

def _header_entry(key: str, entry: Any, source: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{source}: tensor {key!r}: malformed header entry")
    dtype = DTYPES.get(entry["dtype"])
    shape, offsets = entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise FormatError(f"{source}: tensor {key!r}: unknown dtype {entry['dtype']!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FormatError(f"{source}: tensor {key!r}: malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise FormatError(f"{source}: tensor {key!r}: malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise FormatError(f"{source}: tensor {key!r}: shape {shape} of {entry['dtype']} needs "
                          f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors-layout file strictly; arrays are read-only views of a memory map."""
    source = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise FormatError(f"{source}: truncated: {size} bytes, not even a header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise FormatError(f"{source}: header length {header_len} does not fit a file of {size} bytes "
                              "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{source}: header is not valid JSON ({exc})") from exc
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
            raise FormatError(f"{source}: tensor {key!r} starts at byte {begin}, expected {expected} "
                              "(overlapping or non-contiguous data)")
        expected = end
    if expected != data_len:
        raise FormatError(f"{source}: tensors cover {expected} bytes of data, the file holds {data_len} "
                          "(truncated or trailing bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_len else np.empty(0, np.uint8)
    arrays = {key: data[begin:end].view(dtype).reshape(shape) for key, (dtype, shape, begin, end) in entries.items()}
    return arrays, metadata


def load(path: str | os.PathLike) -> OptimizerState:
    """Read a canonical file written by :func:`save` (or by any safetensors writer with our metadata).

    Example: see :func:`save`.
    """
    source = os.fspath(path)
    arrays, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise FormatError(f"{source}: a safetensors file without optstate metadata (model weights only?)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{source}: optstate metadata is not valid JSON ({exc})") from exc
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
