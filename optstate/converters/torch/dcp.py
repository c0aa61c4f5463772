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
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pathlib
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from ...atomic import atomic_directory
from ...errors import FormatError, OptstateError, UnsupportedError
from ...schema import fileformat
from ...schema.state import Deferred, OptimizerState, path_to_name
from ..formats import ReadOptions, WriteOptions
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
    with atomic_directory(path, force=force, fsync=fsync) as tmp:
        if any(isinstance(a, Deferred) for _, _, a in state.iter_tensors()):
            # Lazy arrays (layout moves, tensors on an accelerator) are made one at a time into a
            # file beside the output and read back memory-mapped, not made and held all at once.
            staged = tmp.parent / f"{tmp.name}.staged.safetensors"  # never the output's own name
            state = fileformat.load(fileformat.save(state, staged, fsync=False))
        _save_dcp(state, tmp, layout)


def _save_dcp(state: OptimizerState, directory: pathlib.Path, layout: str) -> None:
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
    with warnings.catch_warnings():
        # One process on purpose: torch warns about that even when told so (no_dist=True).
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        # atomic_directory fsyncs the whole tree before the rename, so the writer need not.
        dcp.save(ckpt, storage_writer=dcp.FileSystemWriter(directory, sync_files=False), no_dist=True)


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
