"""torch.distributed.checkpoint (DCP) directories, as FSDP, FSDP2 and torchtitan write them.

A DCP directory holds ``.metadata`` (a pickle naming every entry, its chunks and where their
bytes lie) and ``__<rank>_<n>.distcp`` files holding one ``torch.save`` blob per chunk or
non-tensor value. ``.metadata`` is read by an unpickler that admits only DCP's metadata classes;
each blob with ``torch.load(weights_only=True)``. Nothing in the directory can run code.

Two layouts of the optimizer are understood, both keyed by parameter name (FQN):
``get_optimizer_state_dict``'s nested form ``{"state": {fqn: {...}}, "param_groups": [{...,
"params": [fqn, ...]}]}``, and its ``flatten_optimizer_state_dict=True`` form
``{"state.<fqn>.<key>": ..., "param_groups.<fqn>.<key>": ...}`` that torchtitan saves, with
the model's tensors at the top level.

A directory written is read back entry by entry and checked against what was saved before its rename
(:func:`read_back_dcp`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pathlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from ...atomic import atomic_directory, signals_held
from ...errors import FormatError, OptstateError, UnsupportedError
from ...schema import fileformat
from ...schema.state import Deferred, OptimizerState, path_to_name
from ..formats import ReadOptions, WriteOptions
from ..readback import in_destination
from . import ptfile
from . import state_dict as torch_dict
from .live import (
    MODEL_KEYS,
    OPTIMIZER_KEYS,
    SCHEDULER_KEYS,
    from_torch,
    numpy_to_tensor,
    step_dtype,
    tensor_to_numpy,
    unpickler_detail,
)

METADATA_FILE = ".metadata"
LAYOUTS = ("nested", "torchtitan")

# Everything torch 2.x pickles into ``.metadata`` (found with pickletools on real checkpoints),
# and nothing else: the dataclasses, torch.Size, layouts by name, the memory-format enum. Paths
# (StorageMeta.checkpoint_id) come back as pure paths, which never touch the file system.
_METADATA_GLOBALS: Mapping[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A global that DCP metadata never holds: a function, a class of the file's choosing."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses every other global, so loading cannot call anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(f"{module}.{name}")


def read_metadata(directory: str | os.PathLike) -> dcp_metadata.Metadata:
    """The ``Metadata`` of a DCP directory, unpickled without running code from the file.

    >>> read_metadata("no/such/dir")
    Traceback (most recent call last):
    optstate.errors.FormatError: no/such/dir: not a DCP checkpoint directory (no .metadata file)
    """
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FormatError(f"{os.fspath(directory)}: not a DCP checkpoint directory (no {METADATA_FILE} file)")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except _RefusedGlobal as exc:
            raise FormatError(
                f"{path}: refused: global {exc} is not DCP metadata; unpickling it would run code "
                "from the file, which optstate never does"
            ) from None
        except Exception as exc:  # unpickling arbitrary bytes fails in arbitrary ways
            raise FormatError(
                f"{path}: not readable DCP metadata (truncated or corrupted?): {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise FormatError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    try:
        _check_metadata(metadata, path)
    except AttributeError as exc:  # a pickle may BUILD a Metadata without the fields DCP's own code sets
        raise FormatError(f"{path}: malformed DCP metadata: {exc}") from None
    return metadata


def _check_metadata(metadata: dcp_metadata.Metadata, path: pathlib.Path) -> None:
    """Refuse fields of other types than DCP writes: the unpickler admits the classes, not their nesting."""

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{path}: malformed DCP metadata: {what}")

    size = torch.Size
    require(isinstance(metadata.state_dict_metadata, dict), "state_dict_metadata is not a dict")
    require(isinstance(metadata.storage_data, dict), "storage_data is not a dict")
    for fqn, meta in metadata.state_dict_metadata.items():
        require(isinstance(fqn, str), f"entry key {fqn!r} is not a string")
        if isinstance(meta, dcp_metadata.TensorStorageMetadata):
            require(
                isinstance(meta.properties, dcp_metadata.TensorProperties)
                and isinstance(meta.properties.dtype, torch.dtype),
                f"{fqn}: no dtype",
            )
            require(
                isinstance(meta.size, size)
                and isinstance(meta.chunks, list)
                and all(
                    isinstance(c, dcp_metadata.ChunkStorageMetadata)
                    and isinstance(c.offsets, size)
                    and isinstance(c.sizes, size)
                    for c in meta.chunks
                ),
                f"{fqn}: malformed shape or chunks",
            )
        else:
            require(isinstance(meta, dcp_metadata.BytesStorageMetadata), f"{fqn}: described by a {type(meta).__name__}")
    for index, info in metadata.storage_data.items():
        require(
            isinstance(index, dcp_metadata.MetadataIndex)
            and isinstance(index.fqn, str)
            and (index.offset is None or isinstance(index.offset, size)),
            f"storage key {index!r}",
        )
        require(
            isinstance(info, dcp_filesystem._StorageInfo)
            and isinstance(info.relative_path, str)
            and type(info.offset) is int
            and type(info.length) is int,
            f"storage of {index.fqn}: {info!r}",
        )


# ----------------------------------------------------------------------------- entries and their bytes


@dataclass(frozen=True)
class _Stored:
    """One value of the saved state dict, not yet read: its DCP key and what ``.metadata`` says of it."""

    fqn: str
    meta: dcp_metadata.TensorStorageMetadata | dcp_metadata.BytesStorageMetadata

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.meta, dcp_metadata.TensorStorageMetadata)


def _entry_tree(metadata: dcp_metadata.Metadata, source: str) -> dict:
    """The saved state dict as nested dicts of ``_Stored`` leaves (integer keys are list positions).

    DCP stores entries flat under dotted keys; ``planner_data`` keeps each key's path in the
    original nesting, which the dots cannot tell (parameter names have dots of their own).
    """
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tree: dict = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        path = tuple(paths.get(fqn, (fqn,)))
        if not path or not all(isinstance(k, (str, int)) for k in path):
            raise FormatError(f"{source}: entry {fqn!r} has the malformed path {path!r}")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise FormatError(f"{source}: entry {fqn!r} lies under another entry")
        if path[-1] in node:
            raise FormatError(f"{source}: two entries at {'.'.join(map(str, path))}")
        node[path[-1]] = _Stored(fqn, meta)
    return tree


def check_chunks(fqn: str, meta: dcp_metadata.TensorStorageMetadata) -> None:
    """Refuse chunks that leave the tensor, overlap, or leave part of it uncovered.

    >>> from torch.distributed.checkpoint.metadata import ChunkStorageMetadata as C, TensorProperties, \
TensorStorageMetadata
    >>> meta = TensorStorageMetadata(TensorProperties(torch.float32), torch.Size([4]),
    ...                              [C(torch.Size([0]), torch.Size([3])), C(torch.Size([2]), torch.Size([2]))])
    >>> check_chunks("w", meta)
    Traceback (most recent call last):
    optstate.errors.FormatError: w: chunks at [0] and [2] overlap
    """
    size = tuple(meta.size)
    boxes = []
    for chunk in meta.chunks:
        lo, extent = tuple(chunk.offsets), tuple(chunk.sizes)
        if (
            len(lo) != len(size)
            or len(extent) != len(size)
            or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(lo, extent, size, strict=True))
        ):
            raise FormatError(
                f"{fqn}: chunk at {list(lo)} of shape {list(extent)} lies outside the tensor's shape {list(size)}"
            )
        if all(extent):  # an empty chunk covers nothing and overlaps nothing
            boxes.append((lo, tuple(o + n for o, n in zip(lo, extent, strict=True))))
    # Sweep along the first axis so only chunks whose rows overlap are compared: near-linear for
    # the row-sharded layouts FSDP writes.
    boxes.sort()
    for i, (lo, hi) in enumerate(boxes):
        for other_lo, other_hi in boxes[i + 1 :]:
            if size and other_lo[0] >= hi[0]:
                break
            if all(a < d and c < b for a, b, c, d in zip(lo, hi, other_lo, other_hi, strict=True)):
                raise FormatError(f"{fqn}: chunks at {list(lo)} and {list(other_lo)} overlap")
    covered = sum(math.prod(b - a for a, b in zip(lo, hi, strict=True)) for lo, hi in boxes)
    expected = math.prod(size)
    if covered != expected:
        raise FormatError(f"{fqn}: chunks cover {covered} of the tensor's {expected} elements (shape {list(size)})")


class _Blobs(contextlib.ExitStack):
    """Reads one chunk or value at a time from a DCP directory's data files, each opened once."""

    def __init__(self, directory: pathlib.Path, metadata: dcp_metadata.Metadata):
        super().__init__()
        self.directory = directory
        self.storage = {
            (index.fqn, None if index.offset is None else tuple(index.offset)): info
            for index, info in metadata.storage_data.items()
        }
        self.files: dict[str, tuple[BinaryIO, int]] = {}

    def _file(self, name: str, fqn: str) -> tuple[BinaryIO, int]:
        if name not in self.files:
            # Data files sit in the directory itself; a path elsewhere is refused, not followed.
            if pathlib.PurePath(name).name != name or name in ("", ".", ".."):
                raise FormatError(
                    f"{self.directory}: {fqn} is stored in {name!r}, which is not a file of the checkpoint directory"
                )
            path = self.directory / name
            if not path.is_file():
                raise FormatError(f"{path}: missing; .metadata stores {fqn} in it")
            f = self.enter_context(open(path, "rb"))  # noqa: SIM115 (this ExitStack closes it)
            self.files[name] = (f, os.fstat(f.fileno()).st_size)
        return self.files[name]

    def load(self, fqn: str, offset: tuple[int, ...] | None, what: str) -> Any:
        """``torch.load(weights_only=True)`` of the blob stored for ``(fqn, offset)``."""
        info = self.storage.get((fqn, offset))
        if info is None:
            raise FormatError(f"{self.directory}: .metadata lists {what} but says nowhere where its bytes are")
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedError(
                f"{self.directory}: {what} was written through the DCP extension(s) "
                f"{list(info.transform_descriptors)}; optstate reads plain FileSystemWriter output"
            )
        f, size = self._file(info.relative_path, fqn)
        where = f"{self.directory / info.relative_path}: {what} (bytes {info.offset}..{info.offset + info.length})"
        if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            raise FormatError(f"{where} lies past the end of the file ({size} bytes): truncated?")
        f.seek(info.offset)
        blob = io.BytesIO(f.read(info.length))
        try:
            return torch.load(blob, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = unpickler_detail(str(exc))
            if "global" in detail.lower():
                raise FormatError(
                    f"{where}: refused: loading it would run code from the file, which optstate never does ({detail})"
                ) from None
            raise FormatError(f"{where}: not a readable torch.save blob (corrupted?): {detail}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise FormatError(
                f"{where}: not a readable torch.save blob (corrupted?): "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None

    def tensor(self, entry: _Stored) -> torch.Tensor:
        """The whole tensor, its chunks placed where ``.metadata`` says."""
        meta = entry.meta
        assert isinstance(meta, dcp_metadata.TensorStorageMetadata)  # value() sends tensors only
        check_chunks(entry.fqn, meta)
        dtype, size = meta.properties.dtype, tuple(meta.size)
        out = None
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            what = f"{entry.fqn} chunk at {list(offsets)}"
            part = self.load(entry.fqn, offsets, what)
            if not isinstance(part, torch.Tensor) or part.dtype != dtype or tuple(part.shape) != sizes:
                actual = f"{part.dtype} {list(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
                raise FormatError(f"{self.directory}: {what} holds {actual}, .metadata says {dtype} {list(sizes)}")
            if sizes == size:
                return part
            if out is None:
                out = torch.empty(size, dtype=dtype)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))] = part
        return out if out is not None else torch.empty(size, dtype=dtype)

    def value(self, entry: _Stored) -> Any:
        # A tensor becomes a NumPy view of its own memory at once: nothing else holds it, so no copy is needed.
        return (
            tensor_to_numpy(self.tensor(entry), copy=False)
            if entry.is_tensor
            else self.load(entry.fqn, None, entry.fqn)
        )


def _read_tree(node: Any, blobs: _Blobs) -> Any:
    """Read every entry under ``node``, one at a time; keys 0..n-1 become a list again, as DCP saved lists."""
    if isinstance(node, _Stored):
        return blobs.value(node)
    values = {key: _read_tree(child, blobs) for key, child in node.items()}
    if values and all(type(k) is int for k in values) and sorted(values) == list(range(len(values))):
        return [values[i] for i in range(len(values))]
    return values


# ----------------------------------------------------------------------------- layouts

_OPTIMIZER_PREFIXES = ("state.", "param_groups.")


def _is_nested_optimizer(node: Any) -> bool:
    # An empty "state" saves no entry at all, so only "param_groups" is sure to be there.
    return isinstance(node, dict) and "param_groups" in node and set(node) <= {"state", "param_groups"}


def _is_flat_optimizer(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and any(str(k).startswith("param_groups.") for k in node)
        and all(str(k).startswith(_OPTIMIZER_PREFIXES) for k in node)
    )


def _optimizer_node(tree: dict) -> tuple[Any, set]:
    """The optimizer's entries (under a known key, or at the top level) and the top-level keys they use."""
    for key in OPTIMIZER_KEYS:
        if _is_nested_optimizer(tree.get(key)) or _is_flat_optimizer(tree.get(key)):
            return tree[key], {key}
    top = {k: v for k, v in tree.items() if k in ("state", "param_groups") or str(k).startswith(_OPTIMIZER_PREFIXES)}
    if _is_nested_optimizer(top) or _is_flat_optimizer(top):
        return top, set(top)
    return None, set()


def _model_entries(tree: dict, taken: set) -> dict[str, _Stored]:
    """The model's tensors: under a known key, else the tensors at the top level (torchtitan's layout)."""
    for key in MODEL_KEYS:
        node = tree.get(key)
        if isinstance(node, dict) and any(isinstance(v, _Stored) and v.is_tensor for v in node.values()):
            return {k: v for k, v in node.items() if isinstance(v, _Stored) and v.is_tensor}
    return {k: v for k, v in tree.items() if k not in taken and isinstance(v, _Stored) and v.is_tensor}


def unflatten_optimizer_state_dict(flat: Mapping[str, Any], source: str = "optimizer") -> dict[str, Any]:
    """``flatten_optimizer_state_dict=True``'s form back in ``get_optimizer_state_dict``'s nested form.

    Parameters with equal hyperparameters form one group, as the flat form keeps no groups.

    >>> unflatten_optimizer_state_dict({"state.fc.weight.momentum_buffer": 1, "param_groups.fc.weight.lr": 0.1})
    {'state': {'fc.weight': {'momentum_buffer': 1}}, 'param_groups': [{'lr': 0.1, 'params': ['fc.weight']}]}
    """
    hyperparams: dict[str, dict[str, Any]] = {}
    state: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, rest = str(key).partition(".")
        fqn, _, name = rest.rpartition(".")
        if not fqn or section not in ("state", "param_groups"):
            raise FormatError(
                f"{source}: key {key!r} is not 'state.<parameter>.<key>' or 'param_groups.<parameter>.<key>'"
            )
        (hyperparams if section == "param_groups" else state).setdefault(fqn, {})[name] = value
    stray = sorted(set(state) - set(hyperparams))
    if stray:
        raise FormatError(
            f"{source}: state for {stray[:5]}, which no param group lists (state nested deeper than "
            "one key per parameter is not supported)"
        )
    groups: dict[str, dict[str, Any]] = {}
    for fqn, hp in hyperparams.items():
        groups.setdefault(repr(sorted(hp.items())), dict(hp, params=[]))["params"].append(fqn)
    return {"state": state, "param_groups": list(groups.values())}


def flatten_optimizer_state_dict(osd: Mapping[str, Any]) -> dict[str, Any]:
    """``get_optimizer_state_dict``'s nested form as ``flatten_optimizer_state_dict=True`` writes it.

    >>> flatten_optimizer_state_dict({"state": {"w": {"step": 1}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]})
    {'state.w.step': 1, 'param_groups.w.lr': 0.1}
    """
    flat = {f"state.{fqn}.{key}": value for fqn, entry in osd["state"].items() for key, value in entry.items()}
    flat.update(
        {
            f"param_groups.{fqn}.{key}": value
            for group in osd["param_groups"]
            for fqn in group["params"]
            for key, value in group.items()
            if key != "params"
        }
    )
    return flat


def _indexed(osd: Any, source: str) -> dict[str, Any]:
    """A name-keyed optimizer state_dict as ``Optimizer.state_dict()``'s, with the names as ``param_names``."""
    if not isinstance(osd.get("param_groups"), list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in osd["param_groups"]
    ):
        raise FormatError(f"{source}: param_groups is not a list of groups with 'params'")
    state = osd.get("state", {})
    groups = osd["param_groups"]
    names = [n for g in groups for n in g["params"]]
    if all(type(n) is int for n in names):  # saved from optimizer.state_dict(): positional
        if not all(str(k).isdigit() for k in state):
            raise FormatError(f"{source}: positional param groups, but state keys {sorted(state)[:5]}")
        return {"state": {int(k): entry for k, entry in state.items()}, "param_groups": groups}  # DCP made keys str
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise FormatError(f"{source}: param groups must list each parameter once, by name")
    position = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(state) - set(position))
    if unknown:
        raise FormatError(f"{source}: state for {unknown[:5]}, which no param group lists")
    return {
        "state": {position[n]: entry for n, entry in state.items()},
        "param_groups": [
            dict(g, params=[position[n] for n in g["params"]], param_names=list(g["params"])) for g in groups
        ],
    }


def _checkpoint(directory: pathlib.Path) -> dict[str, Any]:
    """``{"optimizer": positional state_dict, "model": tensors, "lr_scheduler": ...}`` read from the directory."""
    source = os.fspath(directory)
    metadata = read_metadata(directory)
    tree = _entry_tree(metadata, source)
    optimizer, taken = _optimizer_node(tree)
    if optimizer is None:
        raise FormatError(
            f"{source}: no optimizer state (keys {', '.join(OPTIMIZER_KEYS)}, or 'state' and "
            f"'param_groups' at the top); top-level keys: {sorted(map(str, tree))}"
        )
    model = _model_entries(tree, taken)
    scheduler = next((tree[k] for k in SCHEDULER_KEYS if isinstance(tree.get(k), dict)), None)
    with _Blobs(directory, metadata) as blobs:
        osd = _read_tree(optimizer, blobs)
        if _is_flat_optimizer(optimizer):
            osd = unflatten_optimizer_state_dict(osd, source)
        ckpt = {"optimizer": _indexed(osd, source)}
        if model:
            ckpt["model"] = _read_tree(model, blobs)
        if scheduler is not None:
            ckpt["lr_scheduler"] = _milestones_as_counters(_read_tree(scheduler, blobs))
    return ckpt


def _milestones_as_counters(value: Any) -> Any:
    """DCP saves every dict key as a string; MultiStepLR's ``milestones`` are a Counter of epochs (ints)."""
    if isinstance(value, list):
        return [_milestones_as_counters(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {
        k: collections.Counter({int(e): n for e, n in v.items()})
        if k == "milestones" and isinstance(v, dict)
        else _milestones_as_counters(v)
        for k, v in value.items()
    }


# ----------------------------------------------------------------------------- public


def read_dcp(path: str | os.PathLike, *, optimizer: str | None = None) -> OptimizerState:
    """Read a DCP checkpoint directory into the canonical state.

    The directory is what ``torch.distributed.checkpoint.save`` wrote, by one process or many: of
    ``{"model": ..., "optimizer": get_optimizer_state_dict(model, opt)}`` (or the keys the torch
    adapter knows), of the optimizer alone, or torchtitan's layout (model tensors at the top
    level, the optimizer flattened). Sharded tensors are assembled whole, one at a time; an LR
    scheduler's state (``lr_scheduler``) travels with the state. ``optimizer`` names the family
    where the param groups cannot tell (Adam and AdamW of torch before 2.6).

    >>> import tempfile, torch, torch.distributed.checkpoint as dcp, optstate
    >>> from torch.distributed.checkpoint.state_dict import get_state_dict
    >>> net = torch.nn.Linear(3, 2); opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> model_sd, optim_sd = get_state_dict(net, opt)
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> _ = dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=d, no_dist=True)
    >>> state = read_dcp(d)
    >>> state.optimizer, state.common_step(), [p.path for p in state.params]
    ('adam', 1, [('weight',), ('bias',)])
    """
    directory = pathlib.Path(path)
    ckpt = _checkpoint(directory)
    try:
        return from_torch(ckpt, optimizer=optimizer)
    except OptstateError as exc:
        raise type(exc)(f"{os.fspath(directory)}: {exc}") from None


def write_dcp(
    state: OptimizerState, path: str | os.PathLike, *, force: bool = False, fsync: bool = True, layout: str = "nested"
) -> None:
    """Write ``state`` as a DCP checkpoint directory, atomically, for ``dcp.load`` in any number of processes.

    ``layout="nested"`` saves ``{"model": weights, "optimizer": optim_sd, "lr_scheduler": ...}``
    (``"model"`` when the state has weights, ``"lr_scheduler"`` when it has a scheduler's state)
    with ``optim_sd`` in ``get_optimizer_state_dict``'s form, so a job restores it with
    ``get_state_dict``, ``dcp.load`` and ``set_state_dict``. ``layout="torchtitan"`` saves the
    weights at the top level and the optimizer as ``flatten_optimizer_state_dict=True`` does.
    Steps are saved as torch keeps them (``float32`` unless the default dtype is ``float64``).
    ``fsync=False`` skips the fsyncs (still an atomic rename, not durable against a crash).

    >>> import tempfile, torch, optstate
    >>> net = torch.nn.Linear(3, 2); opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> write_dcp(optstate.from_torch(opt), d)
    >>> read_dcp(d).optimizer
    'sgd'
    """
    if layout not in LAYOUTS:
        raise OptstateError(f"unknown DCP layout {layout!r} (known: {', '.join(LAYOUTS)})")
    written: list[_Saved] = []  # what _save_dcp wrote, for the read-back
    with atomic_directory(
        path,
        force=force,
        fsync=fsync,
        read_back=lambda tmp: read_back_dcp(tmp, written[0], pathlib.Path(path)),
    ) as tmp:
        if any(isinstance(a, Deferred) for _, _, a in state.iter_tensors()):
            # Lazy arrays (layout moves, tensors on an accelerator) are made one at a time into a
            # file beside the output and read back memory-mapped, not made and held all at once.
            staged = tmp.parent / f"{tmp.name}.staged.safetensors"  # never the output's own name
            state = fileformat.load(fileformat.save(state, staged, fsync=False))
        written.append(_save_dcp(state, tmp, layout))


def _save_dcp(state: OptimizerState, directory: pathlib.Path, layout: str) -> _Saved:
    """Save ``state`` with ``dcp.save`` into ``directory``; return what was written, the tensors' checksums
    computed beside the save, for :func:`read_back_dcp`."""
    # Tensors view the state's arrays (memory maps of the source, mostly) instead of copying them:
    # DCP's writer keeps every tensor of a file until the file is done.
    sd = torch_dict.state_dict_arrays(state, step_dtype=step_dtype())
    names = [n for g in sd["param_groups"] for n in g["param_names"]]
    optim_sd = {
        "state": {
            names[i]: {k: numpy_to_tensor(a, copy=False) for k, a in entry.items()} for i, entry in sd["state"].items()
        },
        "param_groups": [dict(g, params=list(g["param_names"])) for g in sd["param_groups"]],
    }
    weights = {path_to_name(p): numpy_to_tensor(a, copy=False) for p, a in (state.weights or {}).items()}
    if layout == "torchtitan":
        ckpt: dict[str, Any] = {**weights, "optimizer": flatten_optimizer_state_dict(optim_sd)}
    else:
        ckpt = {"optimizer": optim_sd, **({"model": weights} if weights else {})}
    if state.metadata.lr_scheduler is not None:
        ckpt["lr_scheduler"] = dict(state.metadata.lr_scheduler)
    flat, paths = flatten_state_dict(ckpt)  # DCP's own flattening: the entries .metadata lists, and their paths
    with warnings.catch_warnings(), ThreadPoolExecutor(1) as hashing:
        # The checksums are computed in a thread while DCP writes (xxhash lets go of the GIL): the bytes
        # meant, read from the same arrays DCP saves.
        hashed = hashing.submit(lambda: {key: _Entry.of(value) for key, value in flat.items()})
        # One process on purpose: torch warns about that even when told so (no_dist=True).
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        # atomic_directory fsyncs the whole tree before the rename, so the writer need not. DCP's collectives
        # catch every exception (a KeyboardInterrupt comes out as their own error): signals wait for the save.
        with signals_held():
            dcp.save(ckpt, storage_writer=dcp.FileSystemWriter(directory, sync_files=False), no_dist=True)
        return _Saved(hashed.result(), paths)


# ----------------------------------------------------------------------------- reading the output back


@dataclass(frozen=True)
class _Entry:
    """One entry of a DCP checkpoint as it was written: a tensor's dtype, shape and XXH3-64 checksum of its
    bytes, or another value's ``repr`` (exact for the floats, ints, strings and tuples a state dict holds).

    >>> _Entry.of(torch.arange(3.0)).what, _Entry.of((0.9, 0.999)).what
    ('torch.float32 [3]', '(0.9, 0.999)')
    """

    what: str
    checksum: str | None = None

    @classmethod
    def of(cls, value: Any) -> _Entry:
        if isinstance(value, torch.Tensor):
            return cls(f"{value.dtype} {list(value.shape)}", fileformat.checksum(tensor_to_numpy(value, copy=False)))
        return cls(repr(value))


@dataclass(frozen=True)
class _Saved:
    """What ``dcp.save`` was given: ``entries`` by DCP key (:class:`_Entry`), ``paths`` each key's path in the
    nested state dict (what ``.metadata`` keeps as ``planner_data``)."""

    entries: Mapping[str, _Entry]
    paths: Mapping[str, tuple[str | int, ...]]


def _entry_file(metadata: dcp_metadata.Metadata, fqn: str) -> str:
    """The data file that holds (the first chunk of) entry ``fqn``."""
    return next(
        (info.relative_path for index, info in metadata.storage_data.items() if index.fqn == fqn), METADATA_FILE
    )


class _Window(io.RawIOBase):
    """Bytes ``offset`` to ``offset + length`` of an open file, as a read-only file of their own (for zipfile)."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self.fd, self.offset, self.length, self.position = f.fileno(), offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = max(0, base + position)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(0, self.length - self.position)]
        n = os.preadv(self.fd, [view], self.offset + self.position) if len(view) else 0
        self.position += n
        return n


def _small_records(blob: zipfile.ZipFile, storage: zipfile.ZipInfo, where: str) -> dict[str, bytes]:
    """The blob's records but its storage (the pickle, the byte order, ...), read whole: their CRC-32s checked."""
    try:
        return {i.filename.split("/", 1)[-1]: blob.read(i) for i in blob.infolist() if i is not storage}
    except zipfile.BadZipFile as exc:  # a record's CRC-32 is not the one written
        raise FormatError(f"{where}: {exc}") from None


def _storage_span(f: BinaryIO, offset: int, length: int, where: str) -> tuple[int, int] | None:
    """Where in the file the one storage record of the ``torch.save`` blob at ``offset`` lies, ``(offset, size)``,
    its other records read whole (a CRC-32 other than written is refused); ``None`` for a blob that is not one
    stored storage beside a pickle, in little-endian order."""
    with zipfile.ZipFile(_Window(f, offset, length)) as blob:
        storages = [i for i in blob.infolist() if i.filename.split("/", 1)[-1].startswith("data/")]
        if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
            return None
        records = _small_records(blob, storages[0], where)
        if "data.pkl" not in records or records.get("byteorder", b"little") != b"little":
            return None
    start = ptfile.record_data_start(f.fileno(), offset + storages[0].header_offset)
    return None if start is None else (start, storages[0].file_size)


def _stored_as_written(blobs: _Blobs, entry: _Stored, meant: _Entry) -> bool:
    """Whether a tensor entry is stored as written, found cheaply: ``.metadata`` gives it the dtype and shape
    written, in one chunk, whose blob's storage record holds exactly its bytes with the checksum written, hashed
    in place (no copy, one buffer). ``False`` sends the entry to the full reader, which says what differs."""
    meta = entry.meta
    if not isinstance(meta, dcp_metadata.TensorStorageMetadata) or len(meta.chunks) != 1:
        return False
    if f"{meta.properties.dtype} {list(meta.size)}" != meant.what or list(meta.chunks[0].sizes) != list(meta.size):
        return False
    info = blobs.storage.get((entry.fqn, tuple(meta.chunks[0].offsets)))
    if info is None or getattr(info, "transform_descriptors", None):
        return False
    f, size = blobs._file(info.relative_path, entry.fqn)
    if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
        return False
    where = f"{blobs.directory / info.relative_path}: {entry.fqn} (bytes {info.offset}..{info.offset + info.length})"
    try:
        span = _storage_span(f, info.offset, info.length, where)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError, RuntimeError):
        return False  # the full reader says what is wrong with the blob
    nbytes = math.prod(meta.size) * meta.properties.dtype.itemsize
    if span is None or span[1] != nbytes:
        return False
    return (
        fileformat.file_checksums(blobs.directory / info.relative_path, {entry.fqn: span})[entry.fqn] == meant.checksum
    )


def read_back_dcp(directory: pathlib.Path, written: _Saved, destination: pathlib.Path) -> None:
    """Read back a DCP directory just written, before it is renamed to ``destination``, with optstate's DCP
    reader: ``.metadata`` unpickles and lists exactly the ``written`` entries, at their paths; each reads back
    (one at a time: one tensor in memory) as the same dtype, shape and checksum (a tensor) or value (the
    rest). The first difference is refused naming the file under ``destination``, the entry, and what was
    written and read.

    >>> import tempfile, numpy as np, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "ckpt"; d.mkdir()
    >>> written = _save_dcp(s, d, "nested")
    >>> read_back_dcp(d, written, pathlib.Path("out"))
    >>> lr = {"optimizer.param_groups.0.lr": _Entry("0.2")}
    >>> read_back_dcp(d, _Saved({**written.entries, **lr}, written.paths), pathlib.Path("out"))
    Traceback (most recent call last):
    optstate.errors.FormatError: out/__0_0.distcp: entry optimizer.param_groups.0.lr reads back as 0.1, written as 0.2
    """
    try:
        _check_entries(directory, written, destination)
    except OptstateError as exc:
        raise FormatError(in_destination(exc, directory, destination)) from None


def _check_entries(directory: pathlib.Path, saved: _Saved, destination: pathlib.Path) -> None:
    try:
        metadata = read_metadata(directory)
    except FormatError as exc:
        raise FormatError(f"{destination / METADATA_FILE}: the file written does not read back: {exc}") from None
    stored, written = metadata.state_dict_metadata, saved.entries
    if set(stored) != set(written):
        odd = sorted(set(stored) ^ set(written))[0]
        how = "listed and was not written" if odd in stored else "not listed and was written"
        raise FormatError(f"{destination / METADATA_FILE}: entry {odd} is {how} (the file changed before the rename)")
    if metadata.planner_data != saved.paths:
        raise FormatError(f"{destination / METADATA_FILE}: the entries' paths read back other than were written")
    with _Blobs(directory, metadata) as blobs:
        for fqn, meant in written.items():
            entry = _Stored(fqn, stored[fqn])
            if _stored_as_written(blobs, entry, meant):
                continue
            value = blobs.tensor(entry) if entry.is_tensor else blobs.load(fqn, None, fqn)
            found = _Entry.of(value)
            del value  # one tensor in memory at a time
            if found != meant:
                where = destination / _entry_file(metadata, fqn)
                if found.what == meant.what:
                    raise FormatError(
                        f"{where}: tensor {fqn} reads back with checksum {found.checksum}, written with "
                        f"{meant.checksum} (the file, or the input it was written from, changed before the rename)"
                    )
                raise FormatError(f"{where}: entry {fqn} reads back as {found.what}, written as {meant.what}")


# ----------------------------------------------------------------------------- the "dcp" format's entries


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``dcp`` format (:mod:`optstate.converters.formats`): :func:`read_dcp`;
    ``options.optimizer`` names the optimizer where the param groups cannot tell.

    >>> import tempfile, numpy as np, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> write_dcp(s, d)
    >>> read(d, ReadOptions()).slots[("momentum", ("w",))].tolist()
    [1.0, 1.0]
    """
    return read_dcp(path, optimizer=options.optimizer)


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``dcp`` format: :func:`write_dcp` in the nested layout (never sharded by size: DCP
    splits by rank).

    >>> import tempfile, numpy as np, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> write(s, d, WriteOptions())
    >>> read_dcp(d).optimizer
    'sgd'
    """
    write_dcp(state, path, force=options.force, fsync=options.fsync)
