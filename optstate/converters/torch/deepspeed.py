"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3, and the universal layout), read without DeepSpeed or torch.

``engine.save_checkpoint(root)`` writes ``root/latest`` (the tag, ``global_stepN``) and ``root/<tag>/``:

- ``mp_rank_00_model_states.pt`` (ZeRO-3: ``zero_pp_rank_{r}_mp_rank_00_model_states.pt``, one per rank):
  the module's ``state_dict`` (its bf16/fp16/fp32 copies; empty placeholders under ZeRO-3),
  ``param_shapes`` (one ordered ``name -> shape`` per flat group: the order its values are flattened in),
  ``buffer_names``, ``frozen_param_shapes`` and ``frozen_param_fragments``, ``shared_params``,
  ``lr_scheduler`` (the scheduler's ``state_dict()``), ``global_steps``, ``ds_config``, ``ds_version``.
- ``[bf16_|fp16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``, one per data-parallel rank: the
  ``optimizer_state_dict`` of DeepSpeed's ZeRO optimizer, which wraps a torch optimizer whose
  "parameters" are the rank's flat partitions.

ZeRO 1 and 2 (``deepspeed/runtime/zero/stage_1_and_2.py``): a param group's parameters are flattened in
``param_shapes`` order (each followed by its ``param_alignment_paddings``), padded at the end to a
multiple of the ranks and cut into one equal partition per rank, so a parameter may straddle two.
``base_optimizer_state`` is the torch optimizer's ``state_dict()`` over those partitions, padding
included; ``single_partition_of_fp32_groups`` holds the fp32 master partitions, the padding cut off
(``group_paddings``, on the last rank).

ZeRO 3 (``stage3.py``): each parameter is partitioned by itself, ``ceil(numel / ranks)`` values per rank
(the last rank's padded), and a rank concatenates its pieces per sub-group: ``fp32_flat_groups`` and
the torch optimizer's ``state_dict()`` under ``optimizer_state_dict``.

The universal layout (``deepspeed.checkpoint.ds_to_universal``): ``<dir>/zero/<name>/fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt`` (and ``step.pt`` under ZeRO 1/2), whole parameters, the param groups
in ``zero/optimizer_state.pt``, the model states copied beside.

The fp32 master weights become the state's weights: they are what the optimizer updates, the module's
half-precision weights are copies of them. Every file is memory-mapped (:func:`.ptfile.load`; DeepSpeed's
own objects, its loss scaler or ZeRO stage, are read as inert :class:`.ptfile.Record` s): a parameter
that lies in one rank's partition is a view of it, and one that straddles two is joined when it is read
(a :class:`~optstate.schema.state.Deferred`), so that a conversion holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import FormatError, OptstateError, UnsupportedError
from ...schema.state import Deferred, OptimizerState, all_finite, name_to_path, non_finite_slot
from ..formats import ReadOptions, WriteOptions
from ..schedules.identify import refuse_uncarried_schedule
from . import ptfile
from . import state_dict as torch_dict
from .state_dict import _FLOAT32_EXACT_STEPS
from .target import TargetModel, load_target, require_torch_order, scheduled_group, write_directory, written_step

if TYPE_CHECKING:
    from ...report import Report

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"  # where ds_to_universal names the universal folder
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL = "zero"  # ds_to_universal's folder of per-parameter files
# One data-parallel rank's optimizer file; bf16_/fp16_ when the model trains in half precision.
RANK_FILE = re.compile(r"(?P<prefix>(?:bf16_|fp16_)?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt")
EXPERT_FILE = re.compile(r"(?:layer_\d+_expert_\d+_.*|(?:bf16_)?expp_rank_\d+_.*)\.pt")
ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt")
# What DeepSpeed's own LR schedulers (deepspeed.runtime.lr_schedules) save: their step count, nothing else.
DEEPSPEED_SCHEDULER_KEYS = frozenset({"last_batch_iteration"})
DEFAULT_GRADIENT_CLIPPING = 1.0  # deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT (0.19)
NOT_BELONGING = "the rank files do not belong together"


# ----------------------------------------------------------------------------- where a parameter's values lie


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive values of a parameter, from ``start`` in rank ``rank``'s flat partition."""

    rank: int
    start: int
    count: int


@dataclass(frozen=True)
class ParamLayout:
    """A trainable parameter: its name, its shape, its flat group (a param group under ZeRO 1/2, a
    sub-group under ZeRO-3) and the pieces that hold its values, in order.

    >>> ParamLayout("w", (2, 3), 0, (Piece(0, 4, 2), Piece(1, 0, 4))).ranks
    (0, 1)
    """

    name: str
    shape: tuple[int, ...]
    flat_group: int
    pieces: tuple[Piece, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks that hold some of its values."""
        return tuple(p.rank for p in self.pieces)


def zero12_layout(
    shapes: Mapping[str, tuple[int, ...]], partition: int, flat_group: int = 0, alignment: Sequence[int] = ()
) -> list[ParamLayout]:
    """ZeRO 1/2: the parameters of one param group flattened one after the other (each followed by its
    ``alignment`` padding) and cut into partitions of ``partition`` values, one per rank.

    >>> for p in zero12_layout({"a": (3,), "w": (2, 2)}, partition=4):
    ...     print(p.name, [(q.rank, q.start, q.count) for q in p.pieces])
    a [(0, 0, 3)]
    w [(0, 3, 1), (1, 0, 3)]
    """
    layouts, offset = [], 0
    for i, (name, shape) in enumerate(shapes.items()):
        pieces, position, end = [], offset, offset + math.prod(shape)
        while position < end:
            rank, start = divmod(position, partition)
            count = min(end - position, partition - start)
            pieces.append(Piece(rank, start, count))
            position += count
        layouts.append(ParamLayout(name, shape, flat_group, tuple(pieces)))
        offset = end + (alignment[i] if alignment else 0)
    return layouts


def zero3_partition(numel: int, ranks: int) -> int:
    """How many values of a parameter of ``numel`` values each rank holds under ZeRO-3 (the last rank padded).

    >>> zero3_partition(15, 2), zero3_partition(16, 2), zero3_partition(0, 2)
    (8, 8, 0)
    """
    return -(-numel // ranks)


def zero3_layout(shapes: Mapping[str, tuple[int, ...]], ranks: int, flat_group: int = 0) -> list[ParamLayout]:
    """ZeRO-3: each parameter of a sub-group cut into :func:`zero3_partition` values per rank; each rank
    holds its pieces of the sub-group's parameters one after the other.

    >>> for p in zero3_layout({"w": (3,), "b": (2,)}, ranks=2):
    ...     print(p.name, [(q.rank, q.start, q.count) for q in p.pieces])
    w [(0, 0, 2), (1, 0, 1)]
    b [(0, 2, 1), (1, 2, 1)]
    """
    layouts, offset = [], 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        per_rank = zero3_partition(numel, ranks)
        pieces = tuple(
            Piece(rank, offset, min(per_rank, numel - rank * per_rank))
            for rank in range(ranks)
            if numel > rank * per_rank
        )
        layouts.append(ParamLayout(name, shape, flat_group, pieces))
        offset += per_rank
    return layouts


def assemble(partitions: Sequence[np.ndarray], layout: ParamLayout, slot: str | None = None) -> Any:
    """A parameter's values from the ranks' flat partitions (``partitions[rank]``): a view where they lie in
    one partition, a :class:`~optstate.schema.state.Deferred` that joins them when read where they straddle
    two. The values of a ``slot`` are checked to be finite as they are joined (a view is checked by
    :class:`~optstate.schema.state.OptimizerState` itself).

    >>> layout = zero12_layout({"a": (1,), "w": (2, 2)}, partition=3)[1]
    >>> w = assemble([np.arange(3.0), np.arange(3.0, 6.0)], layout)
    >>> type(w).__name__, np.asarray(w).tolist()
    ('Deferred', [[1.0, 2.0], [3.0, 4.0]])
    >>> assemble([np.arange(6.0)], zero12_layout({"w": (2, 3)}, partition=6)[0]).base is not None
    True
    """
    if len(layout.pieces) != 1:
        if not layout.pieces:  # a parameter of no values
            return partitions[0][:0].reshape(layout.shape)
        return Deferred(layout.shape, partitions[layout.ranks[0]].dtype, lambda: _join(partitions, layout, slot))
    piece = layout.pieces[0]
    return partitions[piece.rank][piece.start : piece.start + piece.count].reshape(layout.shape)


def _join(partitions: Sequence[np.ndarray], layout: ParamLayout, slot: str | None) -> np.ndarray:
    joined = np.concatenate([partitions[p.rank][p.start : p.start + p.count] for p in layout.pieces])
    if slot is not None and not all_finite(joined):
        raise non_finite_slot(name_to_path(layout.name), slot)
    return joined.reshape(layout.shape)


# ----------------------------------------------------------------------------- the files of a checkpoint


def step_directory(path: str | os.PathLike) -> Path:
    """The checkpoint directory a path names: the tag in ``path/latest``, or ``path`` itself.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()); (root / "global_step3").mkdir()
    >>> _ = (root / "latest").write_text("global_step3")
    >>> step_directory(root).name, step_directory(root / "global_step3").name
    ('global_step3', 'global_step3')
    """
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory (a DeepSpeed checkpoint is one)")
    # A root of ds_to_universal's (or optstate's) universal output names its folder in latest_universal.
    latest = next((root / n for n in (LATEST, LATEST_UNIVERSAL) if (root / n).is_file()), None)
    if latest is None:
        return root
    tag = latest.read_text().strip()
    if not tag or not (root / tag).is_dir():
        raise FormatError(f"{latest} names {tag!r}, which is not a directory of {root}")
    return root / tag


def is_universal(directory: Path) -> bool:
    """Whether a checkpoint directory is in ds_to_universal's layout (a ``zero/`` folder of parameters).

    >>> is_universal(Path("."))
    False
    """
    return (directory / UNIVERSAL / "optimizer_state.pt").is_file()


def rank_files(directory: Path) -> list[Path]:
    """The optimizer files of a checkpoint directory by rank, checked to be ranks 0, 1, ... of one kind.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for r in (0, 2): _ = (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    >>> rank_files(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: ...: rank 1's optimizer file is missing (found ranks 0, 2: zero_pp_rank_*...)
    """
    found: dict[int, Path] = {}
    kinds: dict[str, str] = {}  # prefix -> a file of it
    for path in sorted(directory.iterdir()):
        match = RANK_FILE.fullmatch(path.name)
        if match is None:
            continue
        if match["mp"] != "00":
            raise UnsupportedError(
                f"{path}: a tensor- or pipeline-parallel checkpoint (model-parallel rank {int(match['mp'])}); "
                "optstate reads data-parallel ZeRO checkpoints (mp_rank_00 only)"
            )
        kinds.setdefault(match["prefix"], path.name)
        found[int(match["rank"])] = path
    if not found:
        raise FormatError(f"{directory}: no zero_pp_rank_*_mp_rank_00_optim_states.pt (ZeRO writes one per rank)")
    if len(kinds) > 1:
        a, b = sorted(kinds.values())[:2]
        raise FormatError(f"{directory}: {a} and {b} come from different runs (one trained in half precision)")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise FormatError(
            f"{directory}: rank {missing[0]}'s optimizer file is missing (found ranks "
            f"{', '.join(map(str, sorted(found)))}: {next(iter(kinds))}zero_pp_rank_*_mp_rank_00_optim_states.pt)"
        )
    return [found[r] for r in sorted(found)]


def refuse_experts(directory: Path) -> None:
    """Refuse a mixture-of-experts checkpoint: its experts' weights and optimizer states are in files of
    their own (``layer_*_expert_*_model_states.pt``, ``expp_rank_*_optim_states.pt``), partitioned over the
    expert-parallel ranks, which optstate does not join.

    >>> refuse_experts(Path("."))
    """
    for path in directory.iterdir():
        if EXPERT_FILE.fullmatch(path.name):
            raise UnsupportedError(
                f"{path}: a mixture-of-experts checkpoint (expert-parallel files); optstate reads data-parallel "
                "ZeRO checkpoints"
            )


def model_states_files(directory: Path) -> list[Path]:
    """The model states files: ``mp_rank_00_model_states.pt`` (ZeRO 1/2), else one per rank (ZeRO-3).

    >>> model_states_files(Path("."))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: .: no mp_rank_00_model_states.pt or zero_pp_rank_0_...: not a DeepSpeed checkpoint
    """
    if (directory / MODEL_STATES).is_file():
        return [directory / MODEL_STATES]
    per_rank = {}
    for path in directory.iterdir():
        match = ZERO3_MODEL_STATES.fullmatch(path.name)
        if match is not None and match["mp"] == "00":
            per_rank[int(match["rank"])] = path
    if 0 not in per_rank:
        raise FormatError(
            f"{directory}: no {MODEL_STATES} or zero_pp_rank_0_{MODEL_STATES}: not a DeepSpeed checkpoint"
        )
    return [per_rank[r] for r in sorted(per_rank)]


def _load_model_states(path: Path) -> Mapping[str, Any]:
    """A model states file, checked to come from a ZeRO run of data parallelism alone."""
    model = ptfile.load(path, records=True)
    if not isinstance(model, Mapping) or not isinstance(model.get("param_shapes"), list):
        held = sorted(map(str, model)) if isinstance(model, Mapping) else type(model).__name__
        raise FormatError(
            f"{path}: no 'param_shapes' (holds {held}): not the model states of a ZeRO checkpoint "
            "(ZeRO stage 0 keeps the optimizer in this file; optstate reads ZeRO stages 1 to 3)"
        )
    dims = model.get("checkpoint_parallel_dimensions") or {}
    parallel = {k: v for k, v in dims.items() if isinstance(v, int) and v > 1}
    if model.get("mp_world_size", 1) != 1 or parallel:
        raise UnsupportedError(
            f"{path}: tensor or pipeline parallelism ({parallel or {'mp_world_size': model['mp_world_size']}}); "
            "optstate reads data-parallel ZeRO checkpoints"
        )
    return model


def param_shapes(model: Mapping[str, Any], path: Path) -> list[dict[str, tuple[int, ...]]]:
    """``param_shapes``: per flat group, each trainable parameter's name and shape, in flattening order.

    >>> param_shapes({"param_shapes": [{"fc.weight": (2, 3)}]}, Path("m.pt"))
    [{'fc.weight': (2, 3)}]
    """
    groups = []
    for g, shapes in enumerate(model["param_shapes"]):
        if not isinstance(shapes, Mapping):
            raise FormatError(f"{path}: param_shapes[{g}] is a {type(shapes).__name__}, expected name -> shape")
        group = {}
        for name, shape in shapes.items():
            if not isinstance(shape, (tuple, list)) or not all(type(n) is int and n >= 0 for n in shape):
                raise FormatError(f"{path}: param_shapes[{g}][{name!r}] is {shape!r}, not a shape")
            group[str(name)] = tuple(shape)
        groups.append(group)
    return groups


def zero_stage(value: Any) -> int | None:
    """The ZeRO stage a file records: an int, or DeepSpeed's ``ZeroStageEnum`` read as a record.

    >>> zero_stage(ptfile.Record("deepspeed.runtime.zero.config", "ZeroStageEnum", (2,))), zero_stage(3)
    (2, 3)
    """
    if isinstance(value, ptfile.Record):
        value = value.value
    return value if type(value) is int else None


# ----------------------------------------------------------------------------- the ranks' flat partitions


@dataclass(frozen=True)
class RankFile:
    """One data-parallel rank's optimizer file: its rank, path and ``optimizer_state_dict``."""

    rank: int
    path: str
    sd: Mapping[str, Any]


@dataclass(frozen=True)
class FlatGroup:
    """One flat group as the ranks saved it: its parameters' layout, how many values each rank's slots
    (``slot_size``) and fp32 master partition (``master_sizes[rank]``) must hold, and what each rank saved:
    ``entries[rank]``, the wrapped torch optimizer's state (``step`` and slots), and ``masters[rank]``."""

    index: int
    layouts: tuple[ParamLayout, ...]
    slot_size: int
    master_sizes: tuple[int, ...]
    entries: tuple[Mapping[str, Any], ...]
    masters: tuple[Any, ...]

    def names_on(self, rank: int) -> str:
        """The parameters with values on ``rank``, for a message.

        >>> FlatGroup(0, tuple(zero12_layout({"a": (3,), "w": (2,)}, partition=2)), 2, (2, 2), ({}, {}), ()).names_on(1)
        'a, w'
        """
        return ", ".join(p.name for p in self.layouts if rank in p.ranks) or "none of its parameters"


@dataclass(frozen=True)
class Trainable:
    """A trainable parameter as the optimizer holds it: its param group, its state as torch keeps it per
    parameter (``step`` and slots by torch key; empty before its first step), its fp32 master weight."""

    name: str
    group: int
    entry: Mapping[str, Any]
    master: Any


def _load_rank_files(directory: Path) -> list[RankFile]:
    """Every rank's ``optimizer_state_dict``, memory-mapped."""
    files = []
    for rank, path in enumerate(rank_files(directory)):
        checkpoint = ptfile.load(path, records=True)
        sd = checkpoint.get("optimizer_state_dict") if isinstance(checkpoint, Mapping) else None
        if not isinstance(sd, Mapping):
            raise FormatError(f"{path}: no 'optimizer_state_dict': not a ZeRO optimizer file")
        files.append(RankFile(rank, os.fspath(path), sd))
    return files


def _check_same_run(files: Sequence[RankFile]) -> int:
    """The ZeRO stage, after checking that every rank's file records the same and counts the ranks there are."""
    stage = zero_stage(files[0].sd.get("zero_stage"))
    if stage not in (1, 2, 3):
        raise FormatError(f"{files[0].path}: zero_stage is {files[0].sd.get('zero_stage')!r}, expected 1, 2 or 3")
    for f in files:
        theirs = zero_stage(f.sd.get("zero_stage"))
        if theirs != stage:
            raise FormatError(
                f"{f.path}: rank {f.rank} was saved by ZeRO stage {theirs}, rank 0 by stage {stage}: {NOT_BELONGING}"
            )
        counts = f.sd.get("partition_count")
        wrong = [c for c in (counts if isinstance(counts, list) else [counts]) if c != len(files)]
        if wrong:
            raise FormatError(
                f"{f.path}: rank {f.rank} was one of {wrong[0]} ranks (partition_count), the directory holds "
                f"{len(files)} rank files: {NOT_BELONGING}"
            )
    return stage


def flat_group_owners(groups: Sequence[Mapping[str, Any]], flat_groups: int, where: str) -> list[int]:
    """The param group of each flat group: the wrapped optimizer's param groups hold the flat groups in
    order, one each under ZeRO 1/2, one per sub-group under ZeRO-3.

    >>> flat_group_owners([{"params": [0, 1]}, {"params": [2]}], 3, "f")
    [0, 0, 1]
    """
    indices = [i for group in groups for i in group.get("params", ())]
    if indices != list(range(flat_groups)):
        raise FormatError(f"{where}: the param groups hold flat groups {indices}, param_shapes describes {flat_groups}")
    return [g for g, group in enumerate(groups) for _ in group.get("params", ())]


def _per_rank(f: RankFile, key: str, group: int) -> Any:
    """The entry of a per-flat-group list of a rank file (``None`` where the file has no such list)."""
    values = f.sd.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or group >= len(values):
        raise FormatError(f"{f.path}: rank {f.rank}'s {key} has no entry for flat group {group}")
    return values[group]


def _zero12_groups(files: Sequence[RankFile], shapes: Sequence[Mapping[str, tuple[int, ...]]]) -> list[FlatGroup]:
    """ZeRO 1/2: each param group's partitions; the last rank's padding is cut from its fp32 values only."""
    groups = []
    for g, group_shapes in enumerate(shapes):
        alignment = _per_rank(files[0], "param_alignment_paddings", g) or ()
        masters = tuple(_per_rank(f, "single_partition_of_fp32_groups", g) for f in files)
        padding = _per_rank(files[0], "group_paddings", g) or 0
        # Rank 0's partition is all values (its padding, if any, ends the flat group); the others' are as large.
        partition = (masters[0].size if isinstance(masters[0], np.ndarray) else 0) + padding
        values = sum(math.prod(s) for s in group_shapes.values()) + sum(alignment)
        layouts = tuple(zero12_layout(group_shapes, max(partition, 1), g, alignment))
        sizes = tuple(min(max(values - rank * partition, 0), partition) for rank in range(len(files)))
        entries = tuple(f.sd["base_optimizer_state"]["state"].get(g, {}) for f in files)
        groups.append(FlatGroup(g, layouts, partition, sizes, entries, masters))
        if values > partition * len(files):
            raise FormatError(
                f"{files[0].path}: the parameters of param group {g} ({', '.join(group_shapes)}) hold {values} "
                f"values, the {len(files)} rank files {partition} each: {NOT_BELONGING}"
            )
    return groups


def _zero3_groups(files: Sequence[RankFile], shapes: Sequence[Mapping[str, tuple[int, ...]]]) -> list[FlatGroup]:
    """ZeRO-3: each sub-group's per-rank pieces, every parameter padded to a multiple of the ranks."""
    groups = []
    for s, group_shapes in enumerate(shapes):
        layouts = tuple(zero3_layout(group_shapes, len(files), s))
        partition = sum(zero3_partition(math.prod(shape), len(files)) for shape in group_shapes.values())
        entries = tuple(f.sd["optimizer_state_dict"]["state"].get(s, {}) for f in files)
        masters = tuple(_per_rank(f, "fp32_flat_groups", s) for f in files)
        groups.append(FlatGroup(s, layouts, partition, (partition,) * len(files), entries, masters))
    return groups


def _check_flat_group(group: FlatGroup, files: Sequence[RankFile], model_file: Path) -> None:
    """Every rank's partition of a flat group is as large as ``param_shapes`` says, keeps the same slots,
    and is at the same step; the fragments a ZeRO 1/2 file names lie where ``param_shapes`` puts them."""
    for f in files:
        _check_partition(
            f, "fp32 master partition", group.masters[f.rank], group.master_sizes[f.rank], group, model_file
        )
        entry, first = group.entries[f.rank], group.entries[0]
        if set(entry) != set(first):
            raise FormatError(
                f"{f.path}: rank {f.rank} keeps {sorted(entry)} for flat group {group.index} "
                f"({group.names_on(f.rank)}), rank 0 {sorted(first)}: {NOT_BELONGING}"
            )
        for key, value in entry.items():
            if key != "step" and not (isinstance(value, np.ndarray) and value.ndim == 0):
                _check_partition(f, repr(key), value, group.slot_size, group, model_file)
        if _step(entry) != _step(first):
            raise FormatError(
                f"{f.path}: rank {f.rank} is at step {_step(entry)} on flat group {group.index} "
                f"({group.names_on(f.rank)}), rank 0 at step {_step(first)}: the rank files come from "
                "different saves"
            )
        _check_slice_mappings(f, group)


def _check_partition(f: RankFile, what: str, array: Any, expected: int, group: FlatGroup, model_file: Path) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.size != expected:
        held = f"{array.size} values" if isinstance(array, np.ndarray) else f"a {type(array).__name__}"
        raise FormatError(
            f"{f.path}: rank {f.rank}'s {what} of flat group {group.index} holds {held}; {model_file.name}'s "
            f"param_shapes put {expected} there ({group.names_on(f.rank)}): {NOT_BELONGING}"
        )


def _step(entry: Mapping[str, Any]) -> int | float | None:
    """A state's step (a tensor, in torch 2), as an int where it is one."""
    if entry.get("step") is None:
        return None
    step = float(np.asarray(entry["step"]).reshape(()))
    return int(step) if step.is_integer() else step


def _check_slice_mappings(f: RankFile, group: FlatGroup) -> None:
    """The fragments a ZeRO 1/2 rank file names (``param_slice_mappings``) are where ``param_shapes`` puts them."""
    mappings = _per_rank(f, "param_slice_mappings", group.index)
    if mappings is None:
        return
    expected = {p.name: (q.start, q.count) for p in group.layouts for q in p.pieces if q.rank == f.rank}
    saved = {str(n): (a.get("start"), a.get("numel")) for n, a in mappings.items() if isinstance(a, ptfile.Record)}
    for name in [*expected, *(n for n in saved if n not in expected)]:
        if expected.get(name) != saved.get(name):
            held = f"{saved[name][1]} values at {saved[name][0]}" if name in saved else "no values"
            computed = f"{expected[name][1]} values at {expected[name][0]}" if name in expected else "none"
            raise FormatError(
                f"{f.path}: rank {f.rank} holds {held} of {name} (param_slice_mappings), param_shapes put "
                f"{computed} of flat group {group.index} there: {NOT_BELONGING}"
            )


def _hyperparams(files: Sequence[RankFile], groups_of: Callable[[RankFile], Any]) -> list[dict[str, Any]]:
    """The param groups' hyperparameters (``groups_of(rank file)``), checked to agree on every rank: an lr
    that differs is another step of a schedule."""
    mine = [{k: v for k, v in g.items() if k != "params"} for g in groups_of(files[0])]
    for f in files[1:]:
        theirs = [{k: v for k, v in g.items() if k != "params"} for g in groups_of(f)]
        if len(theirs) != len(mine):
            raise FormatError(f"{f.path}: rank {f.rank} has {len(theirs)} param groups, rank 0 {len(mine)}")
        for g, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if differ:
                raise FormatError(
                    f"{f.path}: rank {f.rank}'s param group {g} has {differ[0]}={b.get(differ[0])!r}, rank 0's "
                    f"{a.get(differ[0])!r}: the rank files come from different saves"
                )
    return mine


def _trainables(groups: Sequence[FlatGroup], owners: Sequence[int]) -> list[Trainable]:
    """Each parameter's state and fp32 master weight, cut out of its flat group's partitions."""
    params = []
    for group in groups:
        first = group.entries[0]
        for layout in group.layouts:
            entry: dict[str, Any] = {"step": first["step"]} if "step" in first else {}
            for key in (k for k in first if k != "step"):
                values = [e[key] for e in group.entries]
                # One value per flat group (NAdam's mu_product) is each of its parameters' value.
                entry[key] = values[0] if values[0].ndim == 0 else assemble(values, layout, slot=key)
            master = assemble(group.masters, layout)
            params.append(Trainable(layout.name, owners[group.index], entry, master))
    return params


def _read_partitions(
    directory: Path, shapes: Sequence[Mapping[str, tuple[int, ...]]], model_file: Path
) -> tuple[list[RankFile], int, list[dict[str, Any]], list[Trainable]]:
    """A ZeRO checkpoint's rank files, its stage, the param groups' hyperparameters and each parameter's state."""
    files = _load_rank_files(directory)
    stage = _check_same_run(files)
    wrapped = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    for f in files:
        sd: Any = f.sd.get(wrapped)
        if isinstance(sd, list):
            raise UnsupportedError(
                f"{f.path}: saved with elastic_checkpoint, which keeps no param groups (lr, betas, ...); "
                'save with "elastic_checkpoint": false'
            )
        if not torch_dict.is_optimizer_state_dict(sd):
            raise FormatError(f"{f.path}: rank {f.rank}'s {wrapped} holds no optimizer state_dict")
    owners = flat_group_owners(files[0].sd[wrapped]["param_groups"], len(shapes), files[0].path)
    if stage < 3 and owners != list(range(len(shapes))):
        raise FormatError(f"{files[0].path}: a param group holds several flat groups; ZeRO {stage} keeps one each")
    groups = _zero3_groups(files, shapes) if stage == 3 else _zero12_groups(files, shapes)
    for group in groups:
        _check_flat_group(group, files, model_file)
    return files, stage, _hyperparams(files, lambda f: f.sd[wrapped]["param_groups"]), _trainables(groups, owners)


# ----------------------------------------------------------------------------- the universal layout


def _read_universal(
    directory: Path, shapes: Sequence[Mapping[str, tuple[int, ...]]]
) -> tuple[list[dict[str, Any]], list[Trainable]]:
    """ds_to_universal's layout: one folder per parameter under ``zero/``, one file per slot, whole."""
    common_path = directory / UNIVERSAL / "optimizer_state.pt"
    common = ptfile.load(common_path, records=True)
    groups = common.get("param_groups") if isinstance(common, Mapping) else None
    if not isinstance(groups, list):
        raise FormatError(f"{common_path}: no 'param_groups'")
    owners = flat_group_owners(groups, len(shapes), os.fspath(common_path))
    # ZeRO-3's universal files keep no step.pt: the step is the saved rank-0 optimizer's.
    inner = common.get("optimizer_state_dict")
    flat_steps = inner.get("state", {}) if isinstance(inner, Mapping) else {}
    params = []
    for s, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            folder = directory / UNIVERSAL / name
            entry = {}
            if (folder / "step.pt").is_file():
                entry["step"] = ptfile.load(folder / "step.pt", records=True)
            elif "step" in flat_steps.get(s, {}):
                entry["step"] = flat_steps[s]["step"]
            for slot in sorted(folder.glob("*.pt")):
                if slot.stem not in ("fp32", "step"):
                    entry[slot.stem] = _whole(slot, shape)
            params.append(Trainable(name, owners[s], entry, _whole(folder / "fp32.pt", shape)))
    return [{k: v for k, v in g.items() if k != "params"} for g in groups], params


def _whole(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A universal file's tensor (``{"param": tensor, "cat_dim": ...}``, or the bare tensor) in ``shape``."""
    if not path.is_file():
        raise FormatError(f"{path}: missing (ds_to_universal writes fp32.pt for every parameter)")
    value = ptfile.load(path, records=True)
    array = value.get("param") if isinstance(value, Mapping) else value
    if not isinstance(array, np.ndarray) or array.size != math.prod(shape):
        held = f"{array.size} values" if isinstance(array, np.ndarray) else f"a {type(array).__name__}"
        raise FormatError(f"{path}: holds {held}, the parameter's shape {list(shape)} needs {math.prod(shape)}")
    return array.reshape(shape)


# ----------------------------------------------------------------------------- the rest of the model


def _other_weights(
    model_files: Sequence[Path], models: Sequence[Mapping[str, Any]], tracked: set[str], stage: int
) -> dict[str, Any]:
    """The module's tensors the optimizer does not update, in the module's order: buffers and frozen
    parameters (under ZeRO-3 partitioned too: joined from every rank's ``frozen_param_fragments``)."""
    module = models[0].get("module") or {}
    buffers = set(models[0].get("buffer_names") or ())
    frozen = dict(models[0].get("frozen_param_shapes") or {})
    weights: dict[str, Any] = {}
    for name, tensor in module.items():
        if name in tracked:
            continue
        if stage == 3 and name in frozen:
            weights[name] = _frozen_zero3(model_files, models, name, tuple(frozen[name]))
        elif name in buffers or stage < 3:  # ZeRO-3's module holds empty placeholders of its parameters
            weights[name] = tensor
    return weights


def _frozen_zero3(
    model_files: Sequence[Path], models: Sequence[Mapping[str, Any]], name: str, shape: tuple[int, ...]
) -> np.ndarray:
    pieces = []
    for path, model in zip(model_files, models, strict=True):
        piece = (model.get("frozen_param_fragments") or {}).get(name)
        if not isinstance(piece, np.ndarray):
            raise FormatError(f"{path}: no fragment of the frozen parameter {name}")
        pieces.append(piece.reshape(-1))
    joined = np.concatenate(pieces)
    if joined.size < math.prod(shape):
        raise FormatError(f"{model_files[0]}: the ranks' fragments of {name} hold {joined.size} values, not {shape}")
    return joined[: math.prod(shape)].reshape(shape)


def scheduler_state(model: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    """The LR scheduler's state: a torch scheduler's ``state_dict()``. DeepSpeed's own schedulers are refused
    by name: their state is a step count, their curve is in ``ds_config``, and optstate replays torch's.

    >>> scheduler_state({"lr_scheduler": {"last_batch_iteration": 9},
    ...                  "ds_config": {"scheduler": {"type": "WarmupLR"}}}, Path("m.pt"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: m.pt: the LR scheduler is DeepSpeed's own WarmupLR (ds_config 'scheduler'), ...
    """
    sd = model.get("lr_scheduler")
    if sd is None:
        return None
    if not isinstance(sd, Mapping):
        raise FormatError(f"{path}: lr_scheduler is a {type(sd).__name__}, expected a scheduler's state_dict")
    if set(sd) == DEEPSPEED_SCHEDULER_KEYS:
        kind = ((model.get("ds_config") or {}).get("scheduler") or {}).get("type", "scheduler")
        raise UnsupportedError(
            f"{path}: the LR scheduler is DeepSpeed's own {kind} (ds_config 'scheduler'), which optstate does not "
            "replay; give deepspeed.initialize a torch.optim.lr_scheduler (lr_scheduler=) instead"
        )
    return sd


def refuse_deepspeed_optimizers(
    groups: Sequence[Mapping[str, Any]], optimizer: str | None, model: Mapping[str, Any], where: str
) -> None:
    """Refuse DeepSpeed's own Adam kernels (FusedAdam, DeepSpeedCPUAdam: their groups hold ``bias_correction``),
    and an optimizer whose update is not elementwise: ZeRO steps the flat partitions, so a statistic over a
    tensor (Adafactor's factors, a trust ratio, Muon's matrix) was taken over a partition, not a parameter.

    >>> refuse_deepspeed_optimizers([{"lr": 1e-3, "bias_correction": True}], None, {}, "ckpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: ckpt: the optimizer is DeepSpeed's own FusedAdam or DeepSpeedCPUAdam kernel ...
    """
    if any("bias_correction" in g for g in groups):
        kind = ((model.get("ds_config") or {}).get("optimizer") or {}).get("type", "FusedAdam or DeepSpeedCPUAdam")
        raise UnsupportedError(
            f"{where}: the optimizer is DeepSpeed's own {kind} kernel (its param groups hold 'bias_correction'), "
            "which rounds differently from torch.optim.Adam/AdamW; optstate converts the torch optimizers "
            'DeepSpeed wraps: a client optimizer, or "torch_adam": true in ds_config\'s optimizer params'
        )
    spec = torch_dict.optimizer_family({"param_groups": groups}, optimizer, where)
    if spec.update_scope != "elementwise":
        raise UnsupportedError(
            f"{where}: {spec.torch_class} under ZeRO keeps {spec.update_scope} statistics of each rank's flat "
            "partition, "
            "not of each parameter: no per-parameter state corresponds to them"
        )


def _refuse_shared(model: Mapping[str, Any], path: Path) -> None:
    shared = model.get("shared_params") or {}
    if shared:
        alias, name = next(iter(shared.items()))
        raise UnsupportedError(
            f"{path}: {alias!r} is tied to {name!r} (shared_params); an Optax parameter tree has no tied "
            "leaves, so training would untie them"
        )


def _check_global_step(model: Mapping[str, Any], path: Path, params: Sequence[Trainable]) -> None:
    """The optimizer's step is the engine's: ``global_steps`` less the steps skipped on an overflow."""
    steps = {_step(p.entry) for p in params if "step" in p.entry}
    engine = model.get("global_steps")
    if not steps or type(engine) is not int:
        return
    taken = engine - int(model.get("skipped_steps") or 0)
    if steps != {taken}:
        raise FormatError(
            f"{path}: the engine took {taken} optimizer steps (global_steps {engine}), the optimizer files are "
            f"at step {', '.join(str(s) for s in sorted(s for s in steps if s is not None))}: "
            "the files come from different saves"
        )


def _warn_clipping(files: Sequence[RankFile], model: Mapping[str, Any]) -> None:
    # ZeRO 1/2 save the norm they clip to; ZeRO-3 does not, and ds_config holds only what the user set.
    clip = files[0].sd.get("clip_grad") if files else None
    if clip is None:
        clip = (model.get("ds_config") or {}).get("gradient_clipping", DEFAULT_GRADIENT_CLIPPING)
    if isinstance(clip, (int, float)) and clip > 0:
        warnings.warn(
            f"DeepSpeed clips the gradients to a global norm of {clip:g} (ds_config gradient_clipping, "
            f"{DEFAULT_GRADIENT_CLIPPING} unless set) before the optimizer steps; that is the training loop's "
            "doing, not the optimizer's state, so the converted optimizer does not clip: chain a clip before it "
            "to continue as DeepSpeed does",
            stacklevel=4,
        )


def optimizer_state_dict(groups: Sequence[Mapping[str, Any]], params: Sequence[Trainable]) -> dict[str, Any]:
    """The torch optimizer ``state_dict()`` the parameters would have had without ZeRO, named (``param_names``).

    >>> sd = optimizer_state_dict([{"lr": 0.1}], [Trainable("w", 0, {"step": 1.0}, np.zeros(2))])
    >>> sd["param_groups"], sd["state"]
    ([{'lr': 0.1, 'params': [0], 'param_names': ['w']}], {0: {'step': 1.0}})
    """
    torch_groups: list[dict[str, Any]] = [dict(hp, params=[], param_names=[]) for hp in groups]
    state = {}
    for index, p in enumerate(sorted(params, key=lambda p: p.group)):
        torch_groups[p.group]["params"].append(index)
        torch_groups[p.group]["param_names"].append(p.name)
        if p.entry:
            state[index] = dict(p.entry)
    return {"state": state, "param_groups": torch_groups}


# ----------------------------------------------------------------------------- the "deepspeed" format's entries


def read_checkpoint(path: str | os.PathLike, options: ReadOptions = ReadOptions()) -> OptimizerState:
    """A DeepSpeed ZeRO checkpoint (the root holding ``latest``, a ``global_stepN`` directory, or
    ds_to_universal's output) as the canonical state: the torch optimizer DeepSpeed wrapped, its parameters
    named by ``param_shapes``, the fp32 master weights as the weights, a torch LR scheduler's state.
    :func:`read` shows one.

    >>> read_checkpoint("no/such/checkpoint")
    Traceback (most recent call last):
    optstate.errors.FormatError: no/such/checkpoint: not a directory (a DeepSpeed checkpoint is one)
    """
    directory = step_directory(path)
    refuse_experts(directory)
    model_files = model_states_files(directory)
    models = [_load_model_states(p) for p in model_files]
    model, model_file = models[0], model_files[0]
    _refuse_shared(model, model_file)
    shapes = param_shapes(model, model_file)
    files: list[RankFile] = []
    if is_universal(directory):
        groups, params = _read_universal(directory, shapes)
        stage = zero_stage(((model.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")) or 0
        layout = f"a universal checkpoint of ZeRO-{stage}"  # ds_to_universal's or optstate's own
    else:
        files, stage, groups, params = _read_partitions(directory, shapes, model_file)
        layout = f"ZeRO-{stage}, {len(files)} rank{'s' * (len(files) > 1)}"
    refuse_deepspeed_optimizers(groups, options.optimizer, model, os.fspath(directory))
    _check_global_step(model, model_file, params)
    _warn_clipping(files, model)
    weights = {p.name: p.master for p in params} | _other_weights(model_files, models, {p.name for p in params}, stage)
    version = model.get("ds_version")
    return torch_dict.state_from_checkpoint(
        {"optimizer": optimizer_state_dict(groups, params)},
        os.fspath(directory),
        origin=f"DeepSpeed{f' {version}' if version else ''} ({layout})",
        optimizer=options.optimizer,
        weights=weights,
        buffers=[n for n in model.get("buffer_names") or () if n in weights],
        scheduler_state=scheduler_state(model, model_file),
    )


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``deepspeed`` format (:mod:`optstate.converters.formats`): :func:`read_checkpoint`.

    A ZeRO-2 checkpoint of one rank, written here as DeepSpeed lays it out:

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "global_step1"; d.mkdir()
    >>> _ = (d.parent / "latest").write_text("global_step1")
    >>> _ = ptfile.save({"module": {"w": np.zeros(3, np.float32)}, "param_shapes": [{"w": (3,)}],
    ...              "buffer_names": [], "global_steps": 1}, d / "mp_rank_00_model_states.pt")
    >>> group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
    ...          "decoupled_weight_decay": True, "params": [0]}
    >>> ones = np.ones(4, np.float32)  # the partition: 3 values and 1 of padding
    >>> _ = ptfile.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [1], "group_paddings": [1],
    ...     "base_optimizer_state": {"state": {0: {"step": np.array(1.0), "exp_avg": ones, "exp_avg_sq": ones}},
    ...                              "param_groups": [group]},
    ...     "single_partition_of_fp32_groups": [np.arange(3, dtype=np.float32)], "clip_grad": 0.0}},
    ...     d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    >>> state = read(d.parent, ReadOptions())
    >>> state.optimizer, state.params, state.weights[("w",)].tolist()
    ('adamw', (ParamInfo(path=('w',), shape=(3,), dtype='float32', group=0, step=1),), [0.0, 1.0, 2.0])
    """
    return read_checkpoint(path, options)


def inspect(path: str | os.PathLike, fmt: str = "deepspeed", options: ReadOptions = ReadOptions()) -> Report:
    """The report of a DeepSpeed checkpoint (the ``deepspeed`` format's inspector): the state, the layout it
    was read from, and what DeepSpeed does that the optimizer state does not carry (gradient clipping).

    >>> inspect(".")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.FormatError: .: no mp_rank_00_model_states.pt or ...: not a DeepSpeed checkpoint
    """
    from ...report import inspect_state  # the report module imports the format registry, which names this one

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = read_checkpoint(path, dataclasses.replace(options, allow_approximate=True))
    report = inspect_state(os.fspath(path), fmt, state)
    notes = (f"read from {state.metadata.source}; the weights are the fp32 master weights",)
    return dataclasses.replace(report, notes=report.notes + notes + tuple(str(w.message) for w in caught))


# ----------------------------------------------------------------------------- writing


# The DeepSpeed release whose layout is written (``ds_version``: its ZeRO optimizer asserts one, and ZeRO-1
# refuses a checkpoint older than 0.3.17). The files hold plain dicts, lists, numbers and tensors: DeepSpeed
# reads its loss scaler, clip norm and overflow flag with its own values as the default, so none is written.
WRITTEN_VERSION = "0.19.8"
WRITTEN_STAGE = 2  # the rank files' zero_stage: ZeRO 1 and 2 save and load the same files
NCCL_START_ALIGNMENT = 2  # stage_1_and_2.py's nccl_start_alignment_factor: a flat group pads to 2 x ranks values


@dataclass(frozen=True)
class FlatPartition:
    """One rank's partition of a flat group, made when it is written (an array-like for :func:`.ptfile.save`):
    ``pieces`` of parameters' values, each ``(array, start, count)`` of the array flattened, one after the
    other, then zeros up to ``size`` (DeepSpeed's padding, which no parameter reads).

    >>> part = FlatPartition(((np.arange(4.0), 2, 2), (np.ones((1, 1)), 0, 1)), 4, np.dtype("float64"))
    >>> part.shape, np.asarray(part).tolist()
    ((4,), [2.0, 3.0, 1.0, 0.0])
    """

    pieces: tuple[tuple[Any, int, int], ...]
    size: int
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The partition's shape: flat."""
        return (self.size,)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        flat = np.empty(self.size, self.dtype)
        at = 0
        for array, start, count in self.pieces:
            flat[at : at + count] = np.asarray(array).reshape(-1)[start : start + count]
            at += count
        flat[at:] = 0
        return flat if dtype is None else flat.astype(dtype)


@dataclass(frozen=True)
class WriteGroup:
    """A param group as ZeRO flattens it: its hyperparameters (torch's defaults filled in), its trainable
    parameters in flattening order, and their state as torch keeps it per parameter (``entries``, by name).

    >>> from optstate.schema.state import ParamInfo
    >>> g = WriteGroup({"lr": 0.1}, (ParamInfo(("w",), (2, 3), "float32", 0),), {"w": {"step": np.array(2.0)}})
    >>> g.shapes, g.numel, float(g.step), g.slot_keys
    ({'w': (2, 3)}, 6, 2.0, ())
    """

    hyperparams: Mapping[str, Any]
    params: tuple[Any, ...]  # ParamInfo, in the order the group's parameters are flattened
    entries: Mapping[str, Mapping[str, Any]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``param_shapes``' entry of the group: each parameter's name and shape, in flattening order."""
        return {_name(p): p.shape for p in self.params}

    @property
    def numel(self) -> int:
        """How many values the group's parameters hold."""
        return sum(math.prod(p.shape) for p in self.params)

    @property
    def step(self) -> Any:
        """The group's ``step`` (one per flat partition under ZeRO), ``None`` where it keeps none."""
        return next((e["step"] for e in self.entries.values() if "step" in e), None)

    @property
    def slot_keys(self) -> tuple[str, ...]:
        """The torch keys of the group's tensor slots (``exp_avg``, ...), ``()`` before its first step."""
        return tuple(k for k in next(iter(self.entries.values()), {}) if k != "step")


def _name(info: Any) -> str:
    return ".".join(info.path)


def zero12_partition(numel: int, ranks: int) -> int:
    """The values of each rank's partition of a flat group of ``numel`` values under ZeRO 1/2: the group padded
    to a multiple of ``2 x ranks`` (``flatten_dense_tensors_aligned``), cut in ``ranks`` equal parts.

    >>> zero12_partition(53, 2), zero12_partition(53, 1), zero12_partition(3, 4)
    (28, 54, 2)
    """
    alignment = NCCL_START_ALIGNMENT * ranks
    return -(-numel // alignment) * alignment // ranks


def zero12_padding(numel: int, partition: int, rank: int) -> int:
    """How many of rank ``rank``'s ``partition`` values are padding (``groups_padding``): the tail of the last
    rank holding values, and the whole of a rank past it.

    >>> [zero12_padding(3, 2, r) for r in range(4)]
    [0, 1, 2, 2]
    """
    return partition - min(max(numel - rank * partition, 0), partition)


def _refuse_unwritable(state: OptimizerState, where: str) -> None:
    """What a ZeRO checkpoint cannot hold exactly: an optimizer DeepSpeed does not wrap per element, a slot of
    one value per parameter (ZeRO keeps one per flat group), and anything but fp32 (ZeRO's master weights and
    the optimizer's state over them are fp32: a float64 or bf16 state would be rounded or widened)."""
    spec = state.spec
    torch_dict.refuse_optax_native(spec)
    if spec.update_scope != "elementwise":
        raise UnsupportedError(
            f"{where}: {spec.torch_class} keeps {spec.update_scope} statistics of each parameter; ZeRO steps the "
            "ranks' flat partitions, so DeepSpeed would take them over a partition instead"
        )
    scalar = [s.name for s in spec.slots if s.scalar]
    if scalar:
        raise UnsupportedError(
            f"{where}: {spec.torch_class} keeps {scalar[0]!r}, one value per parameter; ZeRO keeps one per flat "
            "group, which the parameters of a group need not share"
        )
    if state.weights is None:
        raise UnsupportedError(
            f"{where}: the state holds no weights; a DeepSpeed checkpoint holds the fp32 master weights beside the "
            "optimizer state (convert from a checkpoint that saved the model)"
        )
    for info in state.params:
        weight = state.weights.get(info.path)
        dtype = info.dtype if weight is None else str(weight.dtype)
        if weight is None or info.dtype != "float32" or dtype != "float32":
            held = "no weight" if weight is None else f"a {info.dtype} parameter with a {dtype} weight"
            raise UnsupportedError(
                f"{where}: {_name(info)} is {held}; DeepSpeed ZeRO keeps fp32 master weights and fp32 optimizer "
                "state, so only an fp32 state is written exactly (expected float32)"
            )


def _target(model: Any) -> TargetModel | None:
    """The model the checkpoint will be resumed with (``--model``), as a record; ``None`` without one."""
    return model if model is None or isinstance(model, TargetModel) else load_target(model)[0]


def write_groups(state: OptimizerState, model: Any = None, where: str = "deepspeed") -> list[WriteGroup]:
    """The state's param groups as ZeRO flattens them: trainable parameters with values (ZeRO leaves
    zero-element ones to the frozen), in the state's order or, with ``model`` (a :class:`.target.TargetModel`,
    or what :func:`.target.load_target` takes), in its ``named_parameters()`` order; each group's parameters
    checked to share one step (ZeRO keeps one per flat partition) and the same slots, its ``lr`` the scheduler's.

    >>> from optstate.schema.state import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float32", 0),),
    ...     {("momentum", ("w",)): np.ones(2, np.float32)}, weights={("w",): np.zeros(2, np.float32)})
    >>> [(g.shapes, g.slot_keys, g.hyperparams["momentum"]) for g in write_groups(s)]
    [({'w': (2,)}, ('momentum_buffer',), 0.9)]
    """
    target = _target(model)
    order = None
    if target is not None:
        order = {n: i for i, n in enumerate(target.trainable)}
        missing = [_name(p) for p in state.params if _name(p) not in order]
        if missing:
            raise FormatError(f"{where}: {missing[0]} is not a trainable parameter of the model {target.source}")
    scheduler = _scheduler(state, where)
    groups = []
    for g, hyperparams in enumerate(state.param_groups):
        params = tuple(p for p in state.params if p.group == g and math.prod(p.shape) > 0)
        if order is not None:
            params = tuple(sorted(params, key=lambda p: order[_name(p)]))
        if not params:
            raise UnsupportedError(f"{where}: param group {g} holds no parameter with values; ZeRO flattens each group")
        entries = {_name(p): torch_dict.param_entry(state, p) for p in params}
        _check_one_partition_state(entries, g, where)
        groups.append(
            WriteGroup(scheduled_group(state.spec.with_defaults(hyperparams), g, scheduler, where), params, entries)
        )
    return groups


def _check_one_partition_state(entries: Mapping[str, Mapping[str, Any]], group: int, where: str) -> None:
    first_name, first = next(iter(entries.items()))
    for name, entry in entries.items():
        if set(entry) != set(first) or _step(entry) != _step(first):
            mine = f"step {_step(entry)} with {sorted(entry) or 'no state'}"
            theirs = f"step {_step(first)} with {sorted(first) or 'no state'}"
            raise UnsupportedError(
                f"{where}: {name} is at {mine}, {first_name} of the same param group {group} at {theirs}; ZeRO "
                "keeps one step and one state per param group's flat partition"
            )


def _engine_step(state: OptimizerState, requested: int | None, where: str) -> int:
    """The engine's ``global_steps`` (:func:`.target.written_step`), which ZeRO also keeps as each flat group's
    float32 ``step``: a count past 2**24, which float32 does not hold exactly, is refused."""
    step = written_step(state, requested, where)
    if step > _FLOAT32_EXACT_STEPS:
        raise UnsupportedError(
            f"{where}: step {step} is past 2**24 = {_FLOAT32_EXACT_STEPS}; ZeRO keeps each flat group's step in "
            "float32, which does not hold it exactly"
        )
    return step


def _ds_config(stage: int) -> dict[str, Any]:
    return {"zero_optimization": {"stage": stage}}


def _model_states(
    state: OptimizerState, groups: Sequence[WriteGroup], step: int, world_size: int, where: str
) -> dict[str, Any]:
    """``mp_rank_00_model_states.pt`` as ``engine.save_checkpoint`` writes it under ZeRO 2: the module's
    ``state_dict`` (the fp32 weights), ``param_shapes``, the frozen parameters apart, the LR scheduler's
    state, the step and the world size. Shapes are tuples (DeepSpeed saves ``torch.Size``; its loader reads
    neither)."""
    weights = state.weights or {}
    trainable = {p.path for g in groups for p in g.params}
    buffers = set(state.buffers)
    frozen = {".".join(path): w for path, w in weights.items() if path not in trainable and path not in buffers}
    return {
        "module": {".".join(path): w for path, w in weights.items()},
        "buffer_names": [".".join(path) for path in state.buffers],
        "optimizer": None,
        "param_shapes": [g.shapes for g in groups],
        "frozen_param_shapes": {name: tuple(w.shape) for name, w in frozen.items()},
        "shared_params": {},
        "frozen_param_fragments": frozen,
        "lr_scheduler": _scheduler(state, where),
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": step,
        "dp_world_size": world_size,
        "mp_world_size": 1,
        "ds_config": _ds_config(WRITTEN_STAGE),
        "ds_version": WRITTEN_VERSION,
    }


def _scheduler(state: OptimizerState, where: str) -> Mapping[str, Any] | None:
    """The LR scheduler state the engine loads into the scheduler given to ``deepspeed.initialize``: the
    state's own; a schedule the state does not carry is refused (:func:`.identify.refuse_uncarried_schedule`)."""
    refuse_uncarried_schedule(state, where)
    return None if state.metadata.lr_scheduler is None else dict(state.metadata.lr_scheduler)


def _partitions(
    group: WriteGroup, values: Callable[[str], Any], ranks: int, dtype: np.dtype, padded: bool
) -> list[FlatPartition]:
    """Each rank's partition of a flat group, from each parameter's array (``values(name)``); ``padded``:
    the optimizer's state, whole, else the fp32 master weights, the padding cut off as DeepSpeed saves them."""
    partition = zero12_partition(group.numel, ranks)
    pieces: list[list[tuple[Any, int, int]]] = [[] for _ in range(ranks)]
    for layout in zero12_layout(group.shapes, partition):
        offset = 0
        for piece in layout.pieces:
            pieces[piece.rank].append((values(layout.name), offset, piece.count))
            offset += piece.count
    return [
        FlatPartition(tuple(pieces[r]), partition - (0 if padded else zero12_padding(group.numel, partition, r)), dtype)
        for r in range(ranks)
    ]


def _slot_of(group: WriteGroup, key: str) -> Callable[[str], Any]:
    """A parameter's array of slot ``key`` by its name."""
    return lambda name: group.entries[name][key]


def _optimizer_files(state: OptimizerState, groups: Sequence[WriteGroup], ranks: int) -> list[dict[str, Any]]:
    """Each rank's ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` under ZeRO 1/2, as DeepSpeed saves it
    without ``elastic_checkpoint``: the wrapped torch optimizer's ``state_dict()`` over the rank's padded flat
    partitions, the fp32 master partitions without their padding, the paddings and the world size."""
    weights = state.weights or {}
    fp32 = np.dtype(np.float32)
    by_name = {_name(p): p.path for g in groups for p in g.params}
    masters = [_partitions(g, lambda n: weights[by_name[n]], ranks, fp32, padded=False) for g in groups]
    slots = [{key: _partitions(g, _slot_of(g, key), ranks, fp32, padded=True) for key in g.slot_keys} for g in groups]
    files = []
    for r in range(ranks):
        base_state = {
            index: ({"step": g.step} if g.step is not None else {}) | {k: parts[r] for k, parts in slots[index].items()}
            for index, g in enumerate(groups)
            if g.slot_keys
        }
        sd = {
            "zero_stage": WRITTEN_STAGE,
            "partition_count": [ranks] * len(groups),
            "group_paddings": [zero12_padding(g.numel, zero12_partition(g.numel, ranks), r) for g in groups],
            "param_alignment_paddings": [[0] * len(g.params) for g in groups],
            "base_optimizer_state": {
                "state": base_state,
                "param_groups": [dict(g.hyperparams, params=[index]) for index, g in enumerate(groups)],
            },
            "single_partition_of_fp32_groups": [parts[r] for parts in masters],
            "ds_version": WRITTEN_VERSION,
        }
        files.append(
            {"optimizer_state_dict": sd, "ds_config": _ds_config(WRITTEN_STAGE), "ds_version": WRITTEN_VERSION}
        )
    return files


def _write_zero(
    state: OptimizerState,
    save: Callable[[Any, str], None],
    step: int,
    ranks: int,
    target: TargetModel | None,
    where: str,
) -> None:
    """A ZeRO 1/2 checkpoint for ``ranks`` ranks (``latest``, ``global_stepN/``), its files given to ``save``.
    ZeRO numbers a group's parameters by position: their order must be a torch optimizer's or the model's."""
    require_torch_order(state, target, where)
    groups = write_groups(state, target, where)
    tag = f"global_step{step}"
    save(_model_states(state, groups, step, ranks, where), f"{tag}/{MODEL_STATES}")
    for r, rank_file in enumerate(_optimizer_files(state, groups, ranks)):
        save(rank_file, f"{tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    save(tag, LATEST)


def _write_universal(
    state: OptimizerState, save: Callable[[Any, str], None], step: int, target: TargetModel | None, where: str
) -> None:
    """ds_to_universal's layout (``latest_universal``, ``global_stepN_universal/``), its files given to ``save``:
    the model states, and under ``zero/`` each parameter's whole tensors, ``{"param": tensor, "cat_dim": 0}`` per
    slot (``fp32.pt`` the master weight) and its ``step.pt``, with the param groups in ``zero/optimizer_state.pt``.
    DeepSpeed loads it by parameter name, so the state's own order will do."""
    groups = write_groups(state, target, where)
    tag = f"global_step{step}_universal"
    # dp_world_size: the world size it was saved at, which does not bind a universal checkpoint (loaded at any).
    save(_model_states(state, groups, step, 1, where), f"{tag}/{MODEL_STATES}")
    common = {
        "param_groups": [dict(g.hyperparams, params=[index]) for index, g in enumerate(groups)],
        "zero_stage": WRITTEN_STAGE,
        "ds_version": WRITTEN_VERSION,
    }
    save(common, f"{tag}/{UNIVERSAL}/optimizer_state.pt")
    weights = state.weights or {}
    for g in groups:
        for info in g.params:
            folder = f"{tag}/{UNIVERSAL}/{_name(info)}"
            save({"param": weights[info.path], "cat_dim": 0}, f"{folder}/fp32.pt")
            for key, value in g.entries[_name(info)].items():
                save(value if key == "step" else {"param": value, "cat_dim": 0}, f"{folder}/{key}.pt")
    save(tag, LATEST_UNIVERSAL)


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``deepspeed`` format: with ``options.world_size`` M, a ZeRO 1/2 checkpoint for M ranks
    that ``engine.load_checkpoint(path)`` resumes on M ranks; without, a universal checkpoint, which DeepSpeed
    loads at any world size under ZeRO 1/2 with ``"checkpoint": {"load_universal": true}``. Written into a
    temporary directory, fsynced, renamed to ``path``.

    >>> import tempfile
    >>> from optstate.schema.state import ParamInfo
    >>> s = OptimizerState("adamw", ({"lr": 0.1},), (ParamInfo(("w",), (3,), "float32", 0, 2),),
    ...     {("first_moment", ("w",)): np.ones(3, np.float32), ("second_moment", ("w",)): np.ones(3, np.float32)},
    ...     weights={("w",): np.arange(3, dtype=np.float32)}).with_metadata(source="torch")
    >>> out = Path(tempfile.mkdtemp()) / "ds"
    >>> write(s, out, WriteOptions(world_size=2))
    >>> sorted(p.name for p in (out / "global_step2").iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['mp_rank_00_model_states.pt', 'zero_pp_rank_0_mp_rank_00_optim_states.pt',
     'zero_pp_rank_1_mp_rank_00_optim_states.pt']
    >>> back = read(out, ReadOptions())
    >>> np.asarray(back.weights[("w",)]).tolist(), back.params[0].step
    ([0.0, 1.0, 2.0], 2)
    """
    where = os.fspath(path)
    _refuse_unwritable(state, where)
    if options.world_size is not None and options.world_size < 1:
        raise OptstateError(
            f"{where}: --world-size {options.world_size}: a ZeRO checkpoint is written for 1 rank or more"
        )
    step = _engine_step(state, options.step, where)
    target = _target(options.model)
    with write_directory(path, options) as save:
        if options.world_size is None:
            _write_universal(state, save, step, target, where)
        else:
            _write_zero(state, save, step, options.world_size, target, where)
