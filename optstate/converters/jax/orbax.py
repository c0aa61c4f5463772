"""Orbax checkpoint directories of Optax states: ``{"params": params, "opt_state": opt_state}``, and, read
by their structure alone, a linen ``TrainState`` and Flax NNX's ``{"model": ..., "optimizer": ...}`` or
``nnx.state(optimizer)`` (:func:`recognise_tree`); a ``CheckpointManager``'s directory, or one of its steps,
is read at the step and item the manager would restore (:func:`pytree_directory`).

What ``convert --to optax`` writes (with ``--step N``, as step ``DST/<N>/`` of a ``CheckpointManager``):
an Orbax checkpoint that plain Orbax restores with the target ``{"params": params, "opt_state":
tx.init(params)}``, plus ``optstate.json`` (the canonical metadata, so that :func:`load_optax` can rebuild
``tx``) and, when the model has buffers (BatchNorm statistics, ...), ``buffers.safetensors`` beside its items.
Before its rename, the output is read back array by array and checked against the bytes written
(:func:`read_back_orbax`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.metadata import array_metadata_store

from ...atomic import atomic_directory, signals_held
from ...errors import FormatError, UnsupportedError
from ...schema.families import optimizer_spec
from ...schema.fileformat import (
    check_format_version,
    checksum,
    parse_tensor_key,
    read_safetensors,
    state_from_metadata,
    state_metadata,
    strict_json_loads,
    tensor_key,
    write_safetensors,
)
from ...schema.state import Deferred, OptimizerState, ParamPath, numpy_dtype, path_to_name
from ..formats import ReadOptions, WriteOptions
from ..readback import Written, check_files, first_difference, in_destination, written_bytes, written_safetensors
from ..schedules.torch_schedulers import last_epoch, restore_torch_scheduler_state
from .optax import (
    collected_slots,
    fill_state,
    from_optax,
    key_path_to_path,
    named_optimizer,
    nest,
    param_shapes,
    recorded_types,
    restored_types,
    slot_paths,
    template,
)

SIDECAR = "optstate.json"
BUFFERS = "buffers.safetensors"
BATCH_STATS = "batch_stats"


def _needs_x64(shapes: Mapping[ParamPath, jax.ShapeDtypeStruct]) -> bool:
    return any(np.dtype(s.dtype).itemsize == 8 for s in shapes.values())


class _Array(NamedTuple):
    """An array of an Orbax checkpoint as written (or read back): shape, dtype, XXH3-64 checksum of its bytes.

    >>> _Array.of(np.arange(3.0))  # doctest: +ELLIPSIS
    _Array(shape=(3,), dtype='float64', checksum='...')
    """

    shape: tuple[int, ...]
    dtype: str
    checksum: str

    @classmethod
    def of(cls, value: Any) -> _Array:
        array = np.asarray(value)
        return cls(tuple(array.shape), str(array.dtype), checksum(array))


class _HeldFailures:
    """For Orbax's NumPy handlers: a failed write (a full disk) is recorded in ``failures``, not raised, so that
    Orbax awaits every other write to its end; raised at once, it would abandon them, still writing into the
    temporary directory after that is removed, each with a traceback. :func:`orbax_write_errors` raises the
    first after the save. Each array written is recorded in ``written`` (its name in the checkpoint ->
    :class:`_Array`, the checksum computed in a thread while TensorStore writes it), for the read-back."""

    failures: list[BaseException]
    written: dict[str, _Array]

    async def _open_and_write(self, value: Any, tspec: dict[str, Any], ts_context: Any) -> None:
        hashed = asyncio.ensure_future(asyncio.to_thread(_Array.of, value))  # xxhash lets go of the GIL
        try:
            await super()._open_and_write(value, tspec, ts_context)  # type: ignore[misc]
        except Exception as exc:  # held, and raised by orbax_write_errors once every write has ended
            self.failures.append(exc)
        self.written[tspec["kvstore"]["path"].rstrip("/")] = await hashed  # OCDBT: its path in the store is its name


class _ScalarWriter(_HeldFailures, ocp.type_handlers.ScalarHandler):
    """Orbax's scalar handler (a count, a step), its failures held (:class:`_HeldFailures`)."""

    def __init__(self, failures: list[BaseException], written: dict[str, _Array]) -> None:
        super().__init__()
        self.failures = failures
        self.written = written


class _ArrayWriter(_HeldFailures, ocp.type_handlers.NumpyHandler):
    """Orbax's NumPy handler, minus what costs memory when a checkpoint is converted from a file:
    it does not deep-copy every array before writing (the default; our arrays are memory maps or
    lazy layout moves that nothing else can modify), and makes a lazy array (``Deferred``: a
    transpose) only when its turn comes to be written, a few at a time, not all at once up front.
    Arrays are saved as Orbax saves ``np.ndarray`` leaves, so plain Orbax restores them."""

    IN_FLIGHT = 8  # lazy arrays made and being written at once; measured 5.1 s at 8, 6.8 s at 2 (3 GB)

    def __init__(
        self,
        progress: Callable[[int], None] | None,
        failures: list[BaseException] | None = None,
        written: dict[str, _Array] | None = None,
    ) -> None:
        super().__init__(deepcopy_host_arrays=False)
        self._progress = progress
        self.failures = [] if failures is None else failures
        self.written = {} if written is None else written
        self._slots: asyncio.Semaphore | None = None  # made in Orbax's event loop, on first use

    async def _open_and_write(self, value: Any, tspec: dict[str, Any], ts_context: Any) -> None:
        if isinstance(value, Deferred):
            self._slots = self._slots or asyncio.Semaphore(self.IN_FLIGHT)
            async with self._slots:
                await super()._open_and_write(np.asarray(value), tspec, ts_context)
        else:  # memory-mapped or already in memory: nothing to bound, and Orbax is faster all at once
            await super()._open_and_write(value, tspec, ts_context)
        if self._progress is not None:
            self._progress(value.nbytes)


class _JaxArrayWriter(ocp.type_handlers.ArrayHandler):
    """Orbax's ``jax.Array`` handler, recording each array written in ``written`` (:class:`_HeldFailures`)."""

    def __init__(self, written: dict[str, _Array]) -> None:
        super().__init__(array_metadata_store=array_metadata_store.Store())  # as Orbax's default handler
        self.written = written

    async def serialize(self, values: Sequence[Any], infos: Sequence[Any], args: Any = None) -> Any:
        self.written.update({info.name: _Array.of(value) for value, info in zip(values, infos, strict=True)})
        return await super().serialize(values, infos, args)


def _checkpointer(
    progress: Callable[[int], None] | None, failures: list[BaseException], written: dict[str, _Array]
) -> ocp.Checkpointer:
    """A PyTree checkpointer that writes arrays with :class:`_ArrayWriter`, uncompressed: zstd holds
    every compressed chunk until the end, and optimizer moments hardly compress."""
    return ocp.Checkpointer(_tree_handler(progress, failures, written))


def _tree_handler(
    progress: Callable[[int], None] | None, failures: list[BaseException], written: dict[str, _Array]
) -> ocp.PyTreeCheckpointHandler:
    """The PyTree handler that writes arrays with :class:`_ArrayWriter`, uncompressed; the writes that fail go
    to ``failures``, what each array was written as to ``written``."""
    arrays, scalar = _ArrayWriter(progress, failures, written), _ScalarWriter(failures, written)
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
        (np.ndarray, arrays),
        (Deferred, arrays),
        (jax.Array, _JaxArrayWriter(written)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)


def _leaf(array: Any) -> Any:
    """A leaf for Orbax: lazy arrays stay lazy (:class:`_ArrayWriter` makes them), others are NumPy arrays."""
    return array if isinstance(array, Deferred) else np.asarray(array)


def save_optax_dir(
    state: OptimizerState,
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], None] | None = None,
    step: int | None = None,
) -> None:
    """Write ``state`` as an Orbax checkpoint directory plus ``optstate.json``, atomically, holding a few
    arrays in memory at a time (``progress(nbytes)`` as each array is written); ``step``: as that step of a
    ``CheckpointManager`` directory (see :func:`save_tree`).

    >>> import tempfile, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)},
    ...     {("w",): np.zeros(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/out"
    >>> save_optax_dir(s, d)
    >>> restored = ocp.PyTreeCheckpointer().restore(d)  # plain Orbax reads it
    >>> sorted(restored), restored["opt_state"][0]["trace"]["w"].tolist()
    (['opt_state', 'params'], [1.0, 1.0])
    """
    _, _, opt_state = template(state)
    tree = {"opt_state": fill_state(state, opt_state, _leaf)}
    weights = state.weights or {}  # buffers are weights: none without them
    if state.weights is not None:
        tree["params"] = nest({p: _leaf(weights[p]) for p in param_shapes(state)})
    stats = {p[1:]: _leaf(weights[p]) for p in state.buffers if p[0] == BATCH_STATS}
    if stats:  # BatchNorm statistics in a Flax layout: the linen collection, beside params
        tree[BATCH_STATS] = nest(stats)
    buffers = [(tensor_key("model", p), weights[p]) for p in state.buffers if p[0] != BATCH_STATS]

    def beside(item: Path) -> None:
        if buffers:
            write_safetensors(item / BUFFERS, buffers, {})

    save_tree(tree, path, state, opt_state, force=force, fsync=fsync, progress=progress, step=step, beside_items=beside)


def save_tree(
    tree: Any,
    path: str | os.PathLike,
    state: OptimizerState,
    opt_state: Any,
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], None] | None = None,
    step: int | None = None,
    beside_items: Callable[[Path], None] | None = None,
) -> None:
    """Write ``tree`` as an Orbax checkpoint of one PyTree at ``path``, with ``optstate.json`` (``state``'s
    metadata, and the types of the Optax state ``opt_state`` that Orbax forgets) beside its items, atomically;
    with ``step``, as step ``path/<step>/`` of a ``CheckpointManager`` (its item ``default``), written by a
    ``CheckpointManager`` so that ``CheckpointManager(path).latest_step()`` finds it and its ``restore`` reads it.
    ``beside_items(directory)`` writes more files beside the items.

    >>> import tempfile, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1},), (optstate.ParamInfo(("w",), (2,), "float32", 0),), {})
    >>> root = tempfile.mkdtemp() + "/ckpts"
    >>> save_tree({"opt_state": (), "params": {"w": np.zeros(2, np.float32)}}, root, s, (), step=7)
    >>> manager_steps(root)
    [7]
    """
    sidecar = {**state_metadata(state), "optax_types": recorded_types(opt_state)}
    written = _WrittenCheckpoint({}, {})

    def finish(item: Path) -> None:
        text = json.dumps(sidecar, indent=1).encode()
        (item / SIDECAR).write_bytes(text)
        written.files[SIDECAR] = written_bytes(text)
        if beside_items is not None:
            beside_items(item)
        if (item / BUFFERS).is_file():  # written, and read back, by write_safetensors: its header's checksums
            written.files[BUFFERS] = written_safetensors(item / BUFFERS)

    if step is None:
        with (
            _removed_if_failed(Path(path).parent),
            atomic_directory(
                path, force=force, fsync=fsync, read_back=lambda tmp: read_back_orbax(tmp, written, Path(path))
            ) as tmp,
        ):
            # Signals wait for the save: TensorStore's threads would write on into a temporary directory removed.
            with signals_held(), orbax_write_errors(Path(path)) as failures:
                _checkpointer(progress, failures, written.arrays).save(
                    os.path.abspath(tmp), args=ocp.args.PyTreeSave(tree)
                )
            finish(tmp)
        return
    root = Path(path)
    if (root / STEP_METADATA).is_file():
        raise FormatError(
            f"{root}: --step {step} writes a step of a CheckpointManager's directory, and this is one checkpoint"
        )
    destination = _step_directory(root, step) / DEFAULT_ITEM
    with (
        _removed_if_failed(root),
        atomic_directory(
            _step_directory(root, step),
            force=force,
            fsync=fsync,
            read_back=lambda tmp: read_back_orbax(tmp / DEFAULT_ITEM, written, destination),
        ) as tmp,
    ):
        # The step's own CheckpointManager, in the temporary directory's parent: it writes tmp (step, metadata
        # and item), which is then renamed into place beside the root's other steps.
        with signals_held(), orbax_write_errors(root / str(step)) as failures:
            manager = ocp.CheckpointManager(
                os.path.abspath(tmp.parent),
                item_handlers=_tree_handler(progress, failures, written.arrays),
                options=_MANAGER_OPTIONS,
            )
            try:
                manager.save(step, args=ocp.args.PyTreeSave(tree))
                manager.wait_until_finished()
            finally:
                manager.close()
        if tmp.name != str(step) or not (tmp / DEFAULT_ITEM).is_dir():
            raise FormatError(f"{root}: Orbax did not write step {step} as {tmp.name}/{DEFAULT_ITEM}")
        finish(tmp / DEFAULT_ITEM)


# ----------------------------------------------------------------------------- reading the output back


@dataclass(frozen=True)
class _WrittenCheckpoint:
    """What an Orbax checkpoint directory was written as: ``arrays`` its arrays by name (:class:`_Array`), and
    ``files`` the files optstate wrote beside them (:class:`.readback.Written`): ``optstate.json`` and
    ``buffers.safetensors``."""

    arrays: dict[str, _Array]
    files: dict[str, Written]


def read_back_orbax(directory: Path, written: _WrittenCheckpoint, destination: Path) -> None:
    """Read back an Orbax checkpoint just written (``directory``, the item holding ``_METADATA``), before it is
    renamed to ``destination``: Orbax's tree metadata lists exactly the ``written`` arrays, with their shapes and
    dtypes; each array, read with TensorStore as Orbax reads it (one at a time: one array in memory), has the
    checksum of the bytes written; ``optstate.json`` has its checksum, ``buffers.safetensors`` its tensors'.
    The first difference is refused naming ``destination``, the array or file, and what was written and read.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "out"
    >>> written = _WrittenCheckpoint({}, {})
    >>> _checkpointer(None, [], written.arrays).save(os.path.abspath(d), args=ocp.args.PyTreeSave({"w": np.ones(2)}))
    >>> read_back_orbax(d, written, Path("out"))
    >>> written.arrays["w"] = _Array((2,), "float64", "0" * 16)
    >>> read_back_orbax(d, written, Path("out"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: out: array w reads back with checksum ..., written with 0000000000000000 (...)
    """
    directory = Path(os.path.abspath(directory))  # Orbax reads absolute paths only
    try:
        _check_arrays(directory, written.arrays, destination)
        check_files(directory, written.files, destination)
    except FormatError as exc:
        raise FormatError(in_destination(exc, directory, destination)) from None


def _stored_arrays(directory: Path, destination: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` of the arrays Orbax's tree metadata lists."""
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(directory)
        leaves = jax.tree_util.tree_leaves(metadata.tree)
        return {leaf.name: (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for leaf in leaves}
    except Exception as exc:  # Orbax fails in its own ways on a damaged _METADATA
        raise FormatError(f"{destination}: the checkpoint written does not read back: {_one_line(exc)}") from None


def _read_array(directory: Path, name: str, context: Any, destination: Path) -> np.ndarray:
    """Array ``name`` of the checkpoint, read with the TensorStore spec Orbax reads it with."""
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=directory, use_zarr3=False, ts_context=context)
    try:
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
        return np.asarray(ts.open(spec, context=context).result().read().result())
    except Exception as exc:  # TensorStore's errors on a damaged store: ValueError, RuntimeError, ...
        raise FormatError(f"{destination}: array {name} does not read back: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """:func:`_read_failure`'s words for ``exc``, its first line (TensorStore's errors run on)."""
    return next(iter(_read_failure(exc).splitlines()), type(exc).__name__)


def _check_arrays(directory: Path, written: Mapping[str, _Array], destination: Path) -> None:
    stored = _stored_arrays(directory, destination)
    meant = {name: (array.shape, array.dtype) for name, array in written.items()}
    if stored != meant:
        name = first_difference(stored, meant)
        raise FormatError(
            f"{destination}: array {name} reads back as {stored.get(name, 'missing')} in Orbax's metadata, "
            f"written as {meant.get(name, 'nothing')}"
        )
    context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
    for name, array in written.items():
        found = _Array.of(_read_array(directory, name, context, destination))
        if found != array:
            detail = (
                f"checksum {found.checksum}, written with {array.checksum}"
                if found[:2] == array[:2]
                else f"{list(found.shape)} {found.dtype}, written as {list(array.shape)} {array.dtype}"
            )
            raise FormatError(
                f"{destination}: array {name} reads back with {detail} "
                "(the checkpoint, or the input it was written from, changed before the rename)"
            )


# Orbax's logs while it writes: its background threads log a failure with a traceback before it reaches us.
_ORBAX_LOGGERS = ("absl", "asyncio")
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
_WRITING = re.compile(r'Error (?:writing|opening "zarr" driver: Error writing) "([^"/]+)')
_THREADS_GRACE_S = 30.0  # how long a failed write waits for Orbax's own threads to stop writing into tmp


class _HeldRecords(logging.Filter):
    """Holds the records of a logger back: re-emitted if the write succeeds, dropped if it fails (its one
    error line says it all).

    >>> held = _HeldRecords()
    >>> held.filter(logging.makeLogRecord({"msg": "x"})), len(held.records)
    (False, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _write_failure(exc: BaseException, path: Path) -> OSError:
    r"""One line for an error Orbax (TensorStore) raised while writing ``path``: the system's words for the
    OS error it carries (``os_error_code``: a full disk, a file-size limit), and the array it was writing.

    >>> e = _write_failure(ValueError('Error writing "params.w/0" ...: Failed [os_error_code=\'28\']'), Path("out"))
    >>> e.errno
    28
    >>> print(e)
    out: writing the Orbax checkpoint failed at params.w: No space left on device (errno 28); nothing was written
    """
    code = _OS_ERROR_CODE.search(str(exc))
    where = _WRITING.search(str(exc))
    at = f" at {where.group(1)}" if where else ""
    cause = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else f"{type(exc).__name__}: {exc}"
    failure = OSError(f"{path}: writing the Orbax checkpoint failed{at}: {cause}; nothing was written")
    failure.errno = int(code.group(1)) if code else None
    return failure


class _QuietClosedLoops:
    """``sys.unraisablehook`` that drops TensorStore's callbacks into the event loop of an Orbax read or write
    that has failed (``RuntimeError: Event loop is closed``, one traceback per array still in flight, some
    before the failure reaches us, some after): a loop closes under them only when the operation failed, and
    that failure is reported in its one line. Anything else goes to the previous hook."""

    def __init__(self, previous: Callable[[Any], Any]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        self.previous(unraisable)


def quiet_closed_loops() -> None:
    """Keep the stray callbacks of a failed Orbax read or write off the terminal (:class:`_QuietClosedLoops`),
    from the start of the operation on: they can come before its error does.

    >>> quiet_closed_loops(); type(sys.unraisablehook).__name__
    '_QuietClosedLoops'
    """
    if not isinstance(sys.unraisablehook, _QuietClosedLoops):
        sys.unraisablehook = _QuietClosedLoops(sys.unraisablehook)


@contextlib.contextmanager
def orbax_write_errors(path: Path) -> Iterator[list[BaseException]]:
    r"""Run an Orbax write so that a failure is one ``OSError`` line naming ``path``, the array and the OS
    error (a full disk: ENOSPC), not Orbax's tracebacks from its threads. Yields the list in which the array
    writers hold their failures (:class:`_HeldFailures`); waits for Orbax's threads before the caller
    removes the temporary directory, which they would otherwise write into again.

    >>> with orbax_write_errors(Path("out")):
    ...     raise ValueError('Error writing "mu/0": [os_error_code=\'28\']')
    Traceback (most recent call last):
    OSError: out: writing the Orbax checkpoint failed at mu: No space left on device (errno 28); nothing was written
    """
    held = _HeldRecords()
    loggers = [logging.getLogger(name) for name in _ORBAX_LOGGERS]
    for logger in loggers:
        logger.addFilter(held)
    before = set(threading.enumerate())
    quiet_closed_loops()
    failures: list[BaseException] = []
    try:
        yield failures
        if failures:
            raise failures[0]
    except (ValueError, RuntimeError, OSError) as exc:
        for thread in set(threading.enumerate()) - before:
            thread.join(_THREADS_GRACE_S)
        raise _write_failure(failures[0] if failures else exc, path) from None
    finally:
        for logger in loggers:
            logger.removeFilter(held)
    for record in held.records:  # the write went through: its warnings are the user's to see
        logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _removed_if_failed(directory: Path) -> Iterator[None]:
    """Remove ``directory`` and the parents of it that the block created, if the block fails: an output
    appears whole or not at all, and that includes the directories made to hold it. Only empty ones go
    (another process may have written there meanwhile).

    >>> import tempfile
    >>> base = Path(tempfile.mkdtemp())
    >>> with _removed_if_failed(base / "a" / "b"):
    ...     (base / "a" / "b").mkdir(parents=True); raise FormatError("the write failed")
    Traceback (most recent call last):
    optstate.errors.FormatError: the write failed
    >>> list(base.iterdir())
    []
    """
    missing = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for created in missing:
            with contextlib.suppress(OSError):  # not empty, or already gone: left as it is
                created.rmdir()
        raise


def _skeleton(meta: Mapping[str, Any], source: str) -> OptimizerState:
    """The state a sidecar describes, its arrays zero-strided placeholders of the right shape and dtype."""
    check_format_version(meta, source)
    try:
        shapes = {tuple(p["path"]): p["shape"] for p in meta["params"]}
        spec = optimizer_spec(meta["optimizer"])
        arrays = {("model", tuple(w["path"])): _placeholder(w["shape"], w["dtype"]) for w in meta.get("weights") or []}
        arrays.update(
            {
                (s["slot"], tuple(s["path"])): _placeholder(
                    spec.slot(s["slot"]).torch_shape(tuple(shapes[tuple(s["path"])])), s["dtype"]
                )
                for s in meta["slots"]
            }
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"{source}: malformed optstate metadata ({type(exc).__name__}: {exc})") from None
    return state_from_metadata(meta, arrays, source)


def _placeholder(shape: Sequence[int], dtype: str) -> np.ndarray:
    return np.broadcast_to(np.zeros((), numpy_dtype(dtype)), tuple(shape))


def _read_sidecar(directory: Path) -> dict[str, Any] | None:
    sidecar = directory / SIDECAR
    if not sidecar.is_file():
        return None
    # Bytes, not read_text: found by fuzzing, a byte that is not UTF-8 raised UnicodeDecodeError there
    meta = strict_json_loads(sidecar.read_bytes(), os.fspath(sidecar))
    if not isinstance(meta, dict):
        raise FormatError(f"{sidecar}: not an optstate metadata object")
    check_format_version(meta, os.fspath(sidecar))  # another version's fields are another version's to shape
    _check_sidecar_shape(meta, sidecar)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(c, str) or _is_int(c) for c in value)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(n) and n >= 0 for n in value)


def _records(value: Any, fields: Mapping[str, Callable[[Any], bool]]) -> bool:
    """Whether ``value`` is a list of objects whose ``fields`` (those present: a missing one is named later,
    by the KeyError it raises) pass their checks."""
    return isinstance(value, list) and all(
        isinstance(r, dict) and all(ok(r[k]) for k, ok in fields.items() if k in r) for r in value
    )


# What each field of optstate.json must be, as optstate writes it: found by fuzzing, a value of another JSON
# type (an optimizer of null, a buffer path of lists) ended in an AttributeError or TypeError traceback.
_SIDECAR_FIELDS: dict[str, Callable[[Any], bool]] = {
    "optimizer": lambda v: isinstance(v, str),
    "param_groups": lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
    "params": lambda v: _records(
        v,
        {
            "path": _is_path,
            "shape": _is_shape,
            "dtype": lambda d: isinstance(d, str),
            "group": lambda g: _is_int(g) and g >= 0,
            "step": lambda n: n is None or _is_int(n),
        },
    ),
    "weights": lambda v: (
        v is None or _records(v, {"path": _is_path, "shape": _is_shape, "dtype": lambda d: isinstance(d, str)})
    ),
    "buffers": lambda v: isinstance(v, list) and all(_is_path(p) for p in v),
    "slots": lambda v: _records(
        v, {"slot": lambda n: isinstance(n, str), "path": _is_path, "dtype": lambda d: isinstance(d, str)}
    ),
    "metadata": lambda v: isinstance(v, dict),
    "optax_types": lambda v: isinstance(v, dict),
}


def _check_sidecar_shape(meta: Mapping[str, Any], sidecar: Path) -> None:
    """Refuse a field of ``optstate.json`` whose JSON type is not the one optstate writes, naming it.

    >>> _check_sidecar_shape({"optimizer": None}, Path("d/optstate.json"))
    Traceback (most recent call last):
    optstate.errors.FormatError: d/optstate.json: field 'optimizer' is None, not what optstate writes there
    """
    for field, ok in _SIDECAR_FIELDS.items():
        if field in meta and not ok(meta[field]):
            raise FormatError(f"{sidecar}: field {field!r} is {meta[field]!r:.80}, not what optstate writes there")


Sharder = Callable[[ParamPath, jax.ShapeDtypeStruct], jax.sharding.Sharding]


def _with_shardings(target: Any, sharding: jax.sharding.Sharding | Sharder | None) -> Any:
    """``target`` whose leaves carry the sharding each array is restored with (Orbax reads only the
    shards a device holds: a multi-host job restores the converted state directly)."""
    if sharding is None:
        return target
    pick = sharding if callable(sharding) else lambda _path, _leaf: sharding

    def place(key_path: Any, leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=pick(key_path_to_path(key_path), leaf))

    return jax.tree_util.tree_map_with_path(place, target)


def _restore(path: str | os.PathLike, sharding: Any = None) -> tuple[Any, Any, Any, Any]:
    directory = Path(path)
    meta = _read_sidecar(directory)
    if meta is None:
        raise FormatError(
            f"{directory}: no {SIDECAR}; not written by optstate convert --to optax "
            "(read it with optstate.from_optax and your own tx)"
        )
    state = _skeleton(meta, str(directory / SIDECAR))
    if not (directory / "_CHECKPOINT_METADATA").exists() and not (directory / "_METADATA").exists():
        raise FormatError(f"{directory}: {SIDECAR} but no Orbax checkpoint beside it")
    if _needs_x64(param_shapes(state)) and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]
        raise UnsupportedError(
            f"{directory} holds 64-bit arrays, which JAX would silently round to 32 bits; "
            "call jax.config.update('jax_enable_x64', True) first (or set JAX_ENABLE_X64=1)"
        )
    tx, params, opt_state = template(state)
    target = {"opt_state": opt_state}
    if state.weights is not None:
        target["params"] = params
    weights = state.weights or {}  # buffers are weights: none without them
    stats = {p[1:]: weights[p] for p in state.buffers if p[0] == BATCH_STATS}
    if stats:
        target[BATCH_STATS] = nest({p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in stats.items()})
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory), _with_shardings(target, sharding))
    return restored.get("params"), restored["opt_state"], tx, restored.get(BATCH_STATS)


def load_optax(
    path: str | os.PathLike, *, sharding: jax.sharding.Sharding | Sharder | None = None
) -> tuple[Any, Any, Any]:
    """``(params, opt_state, tx)`` from a directory that ``optstate convert --to optax`` wrote.

    ``params`` is ``None`` when the converted checkpoint held no model weights. Float64 state
    needs ``jax.config.update("jax_enable_x64", True)`` first; without it JAX would silently
    round to float32, so this refuses instead. ``sharding`` places the arrays on devices as they
    are read: one ``jax.sharding.Sharding`` for every array, or a function of the array's path
    (``("opt_state", "0", "mu", "fc", "weight")``) and ``jax.ShapeDtypeStruct`` that returns one.

    >>> params, opt_state, tx = optstate.load_optax("out/")  # doctest: +SKIP
    >>> updates, opt_state = tx.update(grads, opt_state, params)  # doctest: +SKIP
    """
    return _restore(path, sharding)[:3]


def load_flax(
    path: str | os.PathLike, *, sharding: jax.sharding.Sharding | Sharder | None = None
) -> tuple[Any, Any, Any]:
    """``(variables, opt_state, tx)`` from a directory that ``convert --to optax --target-params`` wrote
    for a Flax linen model: ``variables`` is ``{"params": ..., "batch_stats": ...}`` (the latter when
    the model has BatchNorm), ready for ``model.apply``. ``sharding`` as for :func:`load_optax`.

    >>> variables, opt_state, tx = optstate.load_flax("out/")  # doctest: +SKIP
    >>> logits = model.apply(variables, x)  # doctest: +SKIP
    """
    params, opt_state, tx, stats = _restore(path, sharding)
    return {"params": params, **({BATCH_STATS: stats} if stats is not None else {})}, opt_state, tx


def _with_sidecar(state: OptimizerState, written: OptimizerState) -> OptimizerState:
    """What Optax does not keep but optstate recorded when it wrote the directory: torch's steps where
    Optax has no count (RMSprop, Adadelta), and the torch LR scheduler, moved to the schedule's count."""
    steps = {p.path: p.step for p in written.params}
    params = tuple(p if p.step is not None else dataclasses.replace(p, step=steps.get(p.path)) for p in state.params)
    # The way back to torch's layout, and the user's word on a scheduler that was not carried.
    metadata = dataclasses.replace(
        state.metadata, layout=written.metadata.layout, constant_lr=written.metadata.constant_lr
    )
    scheduler = written.metadata.lr_scheduler
    if scheduler is not None:
        count = last_epoch(scheduler) if metadata.schedule_count is None else metadata.schedule_count
        if count != last_epoch(scheduler):
            scheduler = restore_torch_scheduler_state(scheduler, count, param_groups=written.param_groups)
        metadata = dataclasses.replace(
            metadata, lr_scheduler=scheduler, schedule_count=None, lr_horizon=written.metadata.lr_horizon
        )
    return dataclasses.replace(state, params=params, metadata=metadata)


_PYTREE_FILES = ("_METADATA", "manifest.ocdbt", "d/")  # what Orbax reads a PyTree's metadata from
# What Orbax's metadata parsers raise on well-formed JSON of the wrong shape (found by fuzzing: a
# _METADATA of ``null``, or a tree entry of ``null``, gave AttributeError tracebacks).
_MALFORMED_METADATA = (AttributeError, TypeError, IndexError)


def _tree_metadata(directory: Path) -> Any:
    """Orbax's metadata of the PyTree in ``directory``; metadata of the wrong shape refused in one line."""
    try:
        return ocp.StandardCheckpointer().metadata(os.path.abspath(directory))
    except _MALFORMED_METADATA as exc:
        raise FormatError(
            f"{directory}: an Orbax checkpoint whose metadata (_METADATA, _CHECKPOINT_METADATA) is malformed "
            f"({type(exc).__name__}: {exc}); expected the JSON objects Orbax writes"
        ) from None


def _restore_as_numpy(directory: Path) -> Any:
    found = _tree_metadata(directory)
    metadata = None if found is None or found.item_metadata is None else found.item_metadata.tree
    if metadata is None and any((directory / name).exists() for name in _PYTREE_FILES):
        raise FormatError(
            f"{directory}: an Orbax checkpoint of one PyTree whose tree metadata cannot be read: one of "
            f"{', '.join(_PYTREE_FILES)} is damaged or cut short (a truncated copy?)"
        )
    if metadata is None:
        steps = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        hint = f"; it holds steps {steps[:5]}: name one of them" if steps else ""
        raise FormatError(f"{directory}: not an Orbax checkpoint of one PyTree (no metadata){hint}")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ocp.PyTreeCheckpointer().restore(os.path.abspath(directory), restore_args=restore_args)


# ----------------------------------------------------------------------------- CheckpointManager directories

STEP_METADATA = "_CHECKPOINT_METADATA"  # in every step of a CheckpointManager (and beside one PyTree); not in ROOT
DEFAULT_ITEM = "default"  # the item of a CheckpointManager that saves one PyTree without naming it
# A manager that writes one step: it creates the step, and keeps whatever else is in its root.
_MANAGER_OPTIONS = ocp.CheckpointManagerOptions(create=True, max_to_keep=None)


def manager_steps(root: str | os.PathLike) -> list[int]:
    """The steps of a ``CheckpointManager`` directory, oldest first, as Orbax's own manager finds them
    (finished steps only: a save cut short is not one); ``[]`` for any other directory.

    >>> import tempfile
    >>> manager_steps(tempfile.mkdtemp())
    []
    """
    # create=False: a manager that saves nothing writes nothing (read_only=True would say so in three warnings).
    manager = ocp.CheckpointManager(os.path.abspath(root), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _step_directory(root: Path, step: int) -> Path:
    """Where the manager put ``step`` (its default name format: the number itself)."""
    return Path(ocp.path.step.build_step_path(root, ocp.path.step.standard_name_format(), step))


def _step_items(directory: Path) -> list[str] | None:
    """The items of a CheckpointManager step (its metadata names a handler per item); ``None`` for a
    checkpoint of one PyTree (one handler) or a directory without step metadata."""
    if not (directory / STEP_METADATA).is_file():
        return None
    try:
        handlers = ocp.metadata.get_step_metadata(os.path.abspath(directory)).item_handlers
    except (ValueError, KeyError, *_MALFORMED_METADATA):  # unreadable metadata: left to the PyTree reader's error
        return None
    return sorted(handlers) if isinstance(handlers, dict) and handlers else None


def _holds_opt_state(item: Path) -> bool:
    """Whether the item is a PyTree with an ``opt_state`` at its top (read from its metadata alone)."""
    try:
        found = ocp.StandardCheckpointer().metadata(os.path.abspath(item))
    except (FileNotFoundError, ValueError, KeyError, *_MALFORMED_METADATA):  # not a PyTree item (JSON metrics, ...)
        return False
    tree = None if found is None or found.item_metadata is None else found.item_metadata.tree
    return _optimizer_part(tree) is not None


def _item_of_step(step_dir: Path, items: Sequence[str]) -> Path:
    """The item of a step that holds the optimizer state: the only one, else the only one with an ``opt_state``."""
    if len(items) == 1:
        return step_dir / items[0]
    holding = [name for name in items if _holds_opt_state(step_dir / name)]
    if len(holding) == 1:
        return step_dir / holding[0]
    which = "several hold" if holding else "none holds"
    raise FormatError(
        f"{step_dir}: a CheckpointManager step of items {list(items)}, and {which} an 'opt_state'; "
        f"name the item's directory ({step_dir / '<item>'})"
    )


def pytree_directory(path: str | os.PathLike, step: int | None = None) -> Path:
    """The directory of the one PyTree that ``path`` names: ``path`` itself (a checkpoint of one PyTree),
    the optimizer's item of a CheckpointManager step (``ROOT/5``), or that of the latest step of a
    manager's ``ROOT`` (``step`` chooses another). Anything else is returned as it is, for the reader to
    refuse.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> pytree_directory(d) == Path(d)
    True
    """
    directory = Path(path)
    if (directory / STEP_METADATA).is_file():  # one PyTree, or a step: ROOT has no metadata
        if step is not None:
            raise FormatError(
                f"{directory}: --step {step} chooses among a CheckpointManager's steps; this is one checkpoint "
                "(name the manager's directory with --step, or this one without it)"
            )
        return _tree_of_step(directory)
    steps = manager_steps(directory)
    if not steps:
        if step is not None:
            raise FormatError(f"{directory}: --step {step}, but this is not a CheckpointManager directory (no steps)")
        return directory
    if step is not None and step not in steps:
        raise FormatError(f"{directory}: no step {step}; the CheckpointManager's steps are {steps}")
    return _tree_of_step(_step_directory(directory, steps[-1] if step is None else step))


def _tree_of_step(directory: Path) -> Path:
    """A step's one PyTree: the step itself when it has no items (a checkpoint of one PyTree), else its item."""
    items = _step_items(directory)
    return directory if items is None else _item_of_step(directory, items)


def read_optax_dir(
    path: str | os.PathLike,
    *,
    optimizer: str | None = None,
    hyperparams: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    allow_approximate: bool = False,
    optstate_transform: bool = False,
    step: int | None = None,
) -> OptimizerState:
    """The canonical state of an Orbax checkpoint of an Optax state: ``{"params": ..., "opt_state": ...}``, a
    linen ``TrainState``, Flax NNX's ``{"model": ..., "optimizer": ...}`` or ``nnx.state(optimizer)`` (see
    :func:`recognise_tree`); the step a ``TrainState`` or an ``nnx.Optimizer`` records fills in the steps of
    optimizers whose Optax state keeps no count (RMSprop, Adadelta).

    Optimizer and hyperparameters come from the arguments, else from ``optstate.json`` when the
    directory was written by optstate. Orbax keeps no state type names, so a state whose fields fit
    both a stock Optax transform and optstate's torch-exact one counts as optstate's only in a
    directory optstate wrote, or with ``optstate_transform=True`` (the training used
    ``optstate.optax_transform``). A ``CheckpointManager``'s directory reads its latest step (``step``
    chooses one), a step directory its item (see :func:`pytree_directory`).

    >>> import tempfile, optax
    >>> params = {"w": np.arange(2.0, dtype=np.float32)}
    >>> tx = optax.adam(0.1)
    >>> _, opt_state = tx.update({"w": np.ones(2, np.float32)}, tx.init(params), params)
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> ocp.PyTreeCheckpointer().save(d, {"params": params, "opt_state": opt_state})  # as a training loop saves
    >>> state = read_optax_dir(d, optimizer="adam", hyperparams={"lr": 0.1})
    >>> state.optimizer, [p.step for p in state.params], state.slots[("first_moment", ("w",))].tolist()
    ('adam', [1], [0.10000000149011612, 0.10000000149011612])
    """
    directory = _tree_directory(path, step)
    tree = _restored_tree(directory)
    found = recognise_tree(tree, directory)
    meta = _read_sidecar(directory)
    skeleton = None if meta is None else _skeleton(meta, str(directory / SIDECAR))
    if optimizer is None and skeleton is not None:
        optimizer, hyperparams = skeleton.optimizer, _recorded_hyperparams(skeleton)
    spec = named_optimizer(optimizer)
    opt_state = restored_types(
        found.opt_state,
        spec,
        optstate_transform=optstate_transform or meta is not None,
        recorded=None if meta is None else meta.get("optax_types"),
    )
    parameters = slot_paths(opt_state, spec, allow_approximate)
    if skeleton is not None:  # optstate wrote it: its frozen parameters are parameters, not buffers
        parameters |= {p.path for p in skeleton.params} | set(skeleton.frozen_paths())
    found = split_model(found, parameters)
    state = from_optax(
        opt_state,
        _params_or_shapes(found, skeleton, opt_state, spec, directory),
        optimizer=optimizer,
        hyperparams=hyperparams,
        allow_approximate=allow_approximate,
        order_warning=False,  # what a conversion writes names its parameters (torch files: param_names)
    )
    state = _with_recorded_step(state, found.step)
    if skeleton is not None:
        state = _with_sidecar(state, skeleton)
    return _with_buffers(state, found, directory)


def _tree_directory(path: str | os.PathLike, step: int | None) -> Path:
    """The directory of the one PyTree to read (:func:`pytree_directory`); refuses a path that is not a directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory (an Orbax checkpoint is one)")
    return pytree_directory(directory, step)


def _restored_tree(directory: Path) -> Any:
    """The tree in ``directory`` as NumPy arrays, read without a target; an unreadable one refused in one line."""
    quiet_closed_loops()
    try:
        return _restore_as_numpy(directory)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        logging.getLogger("asyncio").addFilter(_ReadFailureReported(directory))
        raise FormatError(f"{directory}: not a readable Orbax checkpoint ({_read_failure(exc)})") from None


class _ReadFailureReported(logging.Filter):
    """Drops asyncio's later report ("Task exception was never retrieved", when the task is collected) of
    another array of a failed Orbax read of ``directory`` failing too: that read was refused in one line
    already. Anything else passes.

    >>> record = logging.makeLogRecord({"msg": "Task exception was never retrieved",
    ...     "exc_info": (ValueError, ValueError('Error reading "w/0" at local file "/ckpt/"'), None)})
    >>> _ReadFailureReported(Path("/ckpt")).filter(record), _ReadFailureReported(Path("/other")).filter(record)
    (False, True)
    """

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.where = f'local file "{os.path.abspath(directory)}/'

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ValueError) and self.where in str(exc))


_CUT_SHORT = re.compile(
    r'Error reading "([^"/]+)[^"]*".*Requested byte range \[(\d+), (\d+)\) is not valid for value of size (\d+)'
)
_NOT_THERE = re.compile(r'Error reading "([^"/]+)[^"]*".*Not enough data')


def _read_failure(exc: BaseException) -> str:
    """What Orbax could not read, in words: an array whose data file is cut short is named with the bytes it
    needs and the bytes there; anything else as TensorStore said it.

    >>> _read_failure(ValueError('Error reading "opt_state.mu.w/0.0" in ...: Requested byte range [2048, 4096) '
    ...     'is not valid for value of size 100'))
    'the data of opt_state.mu.w is cut short: bytes 2048 to 4096 of a data file needed, 100 there (a truncated copy?)'
    >>> _read_failure(ValueError('Error reading "opt_state.mu.w/0.0" in ...: Not enough data: expected at least 2048'))
    'the data of opt_state.mu.w is missing or cut short: a data file is absent or truncated'
    """
    absent = _NOT_THERE.search(str(exc))
    if absent is not None:
        return f"the data of {absent.group(1)} is missing or cut short: a data file is absent or truncated"
    short = _CUT_SHORT.search(str(exc))
    if short is None:
        return f"{type(exc).__name__}: {exc}"
    name, start, end, size = short.groups()
    needed = f"bytes {start} to {end} of a data file needed, {size} there"
    return f"the data of {name} is cut short: {needed} (a truncated copy?)"


def _recorded_hyperparams(skeleton: OptimizerState) -> list[dict[str, Any]]:
    """The param groups optstate recorded when it wrote the directory, each naming its parameters."""
    return [
        dict(hp, params=[path_to_name(p.path) for p in skeleton.group_params(gi)])
        for gi, hp in enumerate(skeleton.param_groups)
    ]


def _params_or_shapes(
    found: FoundTree, skeleton: OptimizerState | None, opt_state: Any, spec: Any, directory: Path
) -> Any:
    """The parameters the tree holds; else their shapes, recorded by optstate or shown by the optimizer state."""
    if found.params is not None:
        return found.params
    if skeleton is not None:
        return nest(param_shapes(skeleton))
    return _shapes_from_slots(opt_state, spec, directory)


def _with_buffers(state: OptimizerState, found: FoundTree, directory: Path) -> OptimizerState:
    """``state`` with the model's other arrays: the tree's (BatchNorm statistics), ``buffers.safetensors``'s."""
    buffers = dict(found.buffers)
    buffers_file = directory / BUFFERS
    if buffers_file.is_file():
        buffers.update({parse_tensor_key(key)[1]: array for key, array in read_safetensors(buffers_file)[0].items()})
    if state.weights is None or not buffers:
        return state
    return dataclasses.replace(state, weights={**state.weights, **buffers}, buffers=tuple(buffers))


# ----------------------------------------------------------------------------- the trees Flax and Optax users save

VALUE = "value"  # NNX saves every Variable as {"value": array}
NNX_KIND = "Flax NNX's {'model', 'optimizer'}"  # a whole model's state beside the optimizer's


@dataclass(frozen=True)
class FoundTree:
    """What a checkpoint's tree holds, whatever layout it was saved in: ``kind`` (for messages), the Optax
    state as Orbax restored it, the parameters (``None`` where the tree has none), the model's other arrays
    by path (BatchNorm statistics), and the step it records beside the optimizer state (``None``: none).

    >>> FoundTree("an Optax checkpoint", (), {"w": np.zeros(2)}, {}, None).step is None
    True
    """

    kind: str
    opt_state: Any
    params: Any
    buffers: Mapping[ParamPath, np.ndarray]
    step: int | None


def _leaf_paths(tree: Any, prefix: ParamPath = ()) -> Iterator[ParamPath]:
    children = tree.items() if isinstance(tree, Mapping) else enumerate(tree) if isinstance(tree, list) else None
    if children is None:
        yield prefix
        return
    for key, child in children:
        yield from _leaf_paths(child, (*prefix, str(key)))


def _is_variable(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {VALUE} and not isinstance(node[VALUE], (Mapping, list))


def without_variables(tree: Any) -> tuple[Any, bool]:
    """An NNX state as Orbax restores it, every Variable's ``{"value": array}`` replaced by the array, and whether
    it was one (every leaf ends in ``value``); any other tree comes back as it is.

    >>> without_variables({"fc": {"kernel": {"value": 1}, "value": {"value": 2}}})
    ({'fc': {'kernel': 1, 'value': 2}}, True)
    >>> without_variables({"fc": {"kernel": 1}})
    ({'fc': {'kernel': 1}}, False)
    """
    paths = list(_leaf_paths(tree))
    if not paths or not all(p and p[-1] == VALUE for p in paths):
        return tree, False

    def strip(node: Any) -> Any:
        if _is_variable(node):
            return node[VALUE]
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items()}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return strip(tree), True


def _optimizer_part(tree: Any) -> Any:
    """The part of a tree that holds ``opt_state`` (the tree itself, or NNX's ``optimizer``), else ``None``."""
    if not isinstance(tree, Mapping):
        return None
    if "opt_state" in tree:
        return tree
    optimizer = tree.get("optimizer")
    return optimizer if isinstance(optimizer, Mapping) and "opt_state" in optimizer else None


def _as_step(value: Any) -> int | None:
    array = np.asarray(value)
    return int(array) if array.shape == () and array.dtype.kind in "iu" else None


def recognise_tree(tree: Any, source: str | os.PathLike) -> FoundTree:
    """What ``tree`` (restored without a target) holds, by its structure alone:

    - ``{"params", "opt_state"}`` (what ``convert --to optax`` writes, and many training loops), with
      ``step`` a linen ``TrainState`` saved whole;
    - Flax NNX's ``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`` (and other top-level
      entries, such as a ``step``), or ``nnx.state(optimizer)`` alone: its Variables as ``{"value": ...}``.

    >>> found = recognise_tree({"optimizer": {"opt_state": {"0": {"count": {"value": 3}}}, "step": {"value": 3}}}, "c")
    >>> found.kind, found.opt_state, found.step
    ("Flax NNX's {'model', 'optimizer'}", {'0': {'count': 3}}, 3)
    """
    holder = _optimizer_part(tree)
    if holder is None:
        raise FormatError(f"{os.fspath(source)}: {_what_was_found(tree)}; {EXPECTED}")
    part, nnx_state = without_variables(holder)
    if holder is not tree:  # NNX's {"model": ..., "optimizer": ...}
        model, _ = without_variables(tree.get("model")) if tree.get("model") is not None else (None, False)
        step = _as_step(part.get("step")) if "step" in part else _top_level_step(tree)
        return FoundTree(NNX_KIND, part["opt_state"], model, {}, step)
    kind = "nnx.state(optimizer)" if nnx_state else "a linen TrainState" if "step" in part else "an Optax checkpoint"
    stats = {
        (BATCH_STATS, *key_path_to_path(kp)): np.asarray(leaf)
        for kp, leaf in jax.tree_util.tree_flatten_with_path(part.get(BATCH_STATS, {}))[0]
    }
    step = _as_step(part["step"]) if "step" in part else None
    return FoundTree(kind, part["opt_state"], part.get("params"), stats, step)


def _top_level_step(tree: Mapping[str, Any]) -> int | None:
    # The Flax examples save {"model": ..., "optimizer": ..., "step": step} as well.
    return _as_step(tree["step"]) if "step" in tree and not isinstance(tree["step"], Mapping) else None


EXPECTED = (
    "expected {'params': ..., 'opt_state': ...} (convert --to optax, a linen TrainState), Flax NNX's "
    "{'model': nnx.state(model), 'optimizer': nnx.state(optimizer)} or nnx.state(optimizer)"
)


def _what_was_found(tree: Any) -> str:
    """The top of a tree that holds no optimizer state, in a few words."""
    if not isinstance(tree, Mapping):
        return f"found a {type(tree).__name__}, not a dict"
    _, nnx_state = without_variables(tree)
    what = "an NNX state without optimizer state" if nnx_state else "a tree"
    return f"found {what} of {sorted(map(str, tree))[:8]} with no 'opt_state'"


def split_model(found: FoundTree, stateful: frozenset[ParamPath]) -> FoundTree:
    """An NNX model's state split: the arrays the optimizer keeps state for (``stateful``) are its parameters,
    the others (BatchNorm statistics, counters) buffers; all are parameters where it keeps none (plain SGD).
    Trees other than NNX's are returned as they are (their ``params`` are parameters, trained or frozen).

    >>> model = {"bn": {"scale": np.ones(2), "mean": np.zeros(2)}}
    >>> found = split_model(FoundTree(NNX_KIND, (), model, {}, 3), frozenset({("bn", "scale")}))
    >>> found.params, sorted(found.buffers)
    ({'bn': {'scale': array([1., 1.])}}, [('bn', 'mean')])
    """
    if found.params is None or found.kind != NNX_KIND or not stateful:
        return found
    leaves = {key_path_to_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(found.params)[0]}
    params = {p: leaf for p, leaf in leaves.items() if p in stateful}
    buffers = {p: np.asarray(leaf) for p, leaf in leaves.items() if p not in stateful}
    return dataclasses.replace(found, params=nest(params), buffers={**found.buffers, **buffers})


def _shapes_from_slots(opt_state: Any, spec: Any, source: Path) -> Any:
    """The parameters' shapes (and dtypes) from an optimizer state saved without its model: those of a slot that
    has each parameter's shape whatever its rank (Adam's ``mu``)."""
    full = [s.name for s in spec.slots if s.shape == "param" and s.min_ndim == 0 and s.max_ndim >= 64 and not s.needs]
    slots = collected_slots(opt_state, spec)
    shapes = {path: slots[(name, path)] for name in full for (slot, path) in slots if slot == name}
    if not shapes:
        raise FormatError(
            f"{source}: an optimizer state without the model, and {spec.torch_class}'s state does not show the "
            "parameters' shapes; save the model beside it ({'model': nnx.state(model), 'optimizer': ...})"
        )
    return nest({path: jax.ShapeDtypeStruct(a.shape, a.dtype) for path, a in shapes.items()})


def _with_recorded_step(state: OptimizerState, step: int | None) -> OptimizerState:
    """Steps the Optax state does not count (RMSprop, Adadelta) from the step the checkpoint records beside it."""
    if step is None or not state.spec.has_step or all(p.step is not None for p in state.params):
        return state
    params = tuple(p if p.step is not None else dataclasses.replace(p, step=step) for p in state.params)
    return dataclasses.replace(state, params=params)


# ----------------------------------------------------------------------------- the "optax" format's entries


def enable_x64() -> None:
    """Turn on JAX's 64-bit mode, so that float64 state stays float64 (else JAX rounds it to float32).

    The switch is global to the process: the command line turns it on before it reads an Orbax
    checkpoint (converting is that process's whole job); a library caller decides for itself.

    >>> before = jax.config.jax_enable_x64
    >>> enable_x64(); jax.numpy.zeros(1, "float64").dtype
    dtype('float64')
    >>> jax.config.update("jax_enable_x64", before)
    """
    jax.config.update("jax_enable_x64", True)


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``optax`` format (:mod:`optstate.converters.formats`): :func:`read_optax_dir`, with
    every option (an Orbax checkpoint does not record what optimizer made its state).

    >>> import tempfile, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/out"
    >>> save_optax_dir(s, d)
    >>> read(d, ReadOptions()).slots[("momentum", ("w",))].tolist()
    [1.0, 1.0]
    """
    return read_optax_dir(
        path,
        optimizer=options.optimizer,
        hyperparams=options.hyperparams,
        allow_approximate=options.allow_approximate,
        optstate_transform=options.optstate_transform,
        step=options.step,
    )


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``optax`` format: :func:`save_optax_dir` (Orbax chunks arrays itself: never sharded by
    size); ``options.step`` writes that step of a ``CheckpointManager`` directory.

    >>> import tempfile, optstate
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (optstate.ParamInfo(("w",), (2,), "float32", 0),), {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/out"
    >>> write(s, d, WriteOptions())
    >>> read_optax_dir(d).optimizer
    'sgd'
    """
    save_optax_dir(state, path, force=options.force, fsync=options.fsync, progress=options.progress, step=options.step)
