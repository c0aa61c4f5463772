"""Model layouts: where each tensor of a torch model goes in a Flax model, and moving a state there and back.

A :class:`Move` takes one torch tensor (or one piece of it) to one Flax leaf; a :class:`Layout` is a
whole model's moves, which ``optstate map -o`` writes as an editable JSON file. :func:`apply_layout`
moves an optimizer state by a layout and :func:`revert_layout` moves it back. Every optimizer slot
moves exactly as its parameter does, and a move that would change what the optimizer computes (a
statistic that depends on the tensor's shape) is refused. Which move each tensor gets is chosen by
the rules in :mod:`.rules`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import MappingError, UnsupportedError
from ...schema.families import Slot
from ...schema.mapped import FileMapping, read_into_memory, shared_file_mappings
from ...schema.state import Deferred, OptimizerState, ParamInfo, ParamPath, path_to_name
from .transpose import permute

__all__ = ["Layout", "Move", "Shape", "apply_layout", "problem_list", "revert_layout"]

#: A tensor's shape.
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Move:
    """Where one source tensor (or one part of it) goes, and how.

    The source, ``source_shape``, is cut into ``parts`` equal pieces along axis 0 and piece ``part``
    taken (torch packs attention's q, k and v into one tensor); its axes are then permuted by
    ``axes`` (empty: kept) and the result is reshaped to ``shape``, the target's.

    >>> m = Move(("fc", "weight"), ("fc", "kernel"), (3, 2), (2, 3), axes=(1, 0))
    >>> m.apply(np.arange(6).reshape(3, 2)).tolist()
    [[0, 2, 4], [1, 3, 5]]
    """

    source: ParamPath
    target: ParamPath
    source_shape: Shape
    shape: Shape
    axes: tuple[int, ...] = ()
    part: int = 0
    parts: int = 1

    def __post_init__(self) -> None:
        where = f"{path_to_name(self.source)} -> {'/'.join(self.target)}"
        if (self.source_shape and self.source_shape[0] % self.parts) or not 0 <= self.part < self.parts:
            raise MappingError(
                f"{where}: part {self.part} of {self.parts} of a tensor of shape {list(self.source_shape)}"
            )
        if self.axes and sorted(self.axes) != list(range(len(self.source_shape))):
            raise MappingError(
                f"{where}: axes {list(self.axes)} are not a permutation of a {len(self.source_shape)}-d tensor's"
            )
        if math.prod(self.moved_shape) != math.prod(self.shape):
            raise MappingError(f"{where}: a {list(self.moved_shape)} tensor cannot become {list(self.shape)}")

    @property
    def part_shape(self) -> Shape:
        """The shape of the piece taken from the source."""
        if self.parts == 1:
            return self.source_shape
        return (self.source_shape[0] // self.parts, *self.source_shape[1:])

    @property
    def moved_shape(self) -> Shape:
        """The piece's shape after the permutation, before the reshape."""
        return tuple(self.part_shape[a] for a in self.axes) if self.axes else self.part_shape

    @property
    def reshapes(self) -> bool:
        """Whether the piece is reshaped after the permutation (an axis split into heads, or merged)."""
        return self.moved_shape != self.shape

    @property
    def describe(self) -> str:
        """The move in words, for ``optstate map``."""
        steps = []
        if self.parts > 1:
            steps.append(f"part {self.part + 1} of {self.parts} (axis 0)")
        if self.axes:
            steps.append(f"transpose {tuple(self.axes)}")
        if self.reshapes:
            steps.append(f"reshape {list(self.shape)}")
        return ", ".join(steps) or "as is"

    def apply(self, array: Any, transpose: Callable[[Any, tuple[int, ...]], Any] | None = None) -> Any:
        """The source array moved to the target: a view of it where no axis moves (no copy: a view of
        a memory-mapped file is then copied file to file), a new array otherwise.

        ``transpose(array, axes)`` moves the axes of an array of another framework where it is (on
        its accelerator: ``jax.numpy.transpose``); by default the array is a NumPy one.
        """
        if transpose is None:
            array, transpose = np.asarray(array), permute
        if self.parts > 1:
            size = self.source_shape[0] // self.parts
            array = array[self.part * size : (self.part + 1) * size]
        return (transpose(array, self.axes) if self.axes else array).reshape(self.shape)

    def revert(self, array: Any) -> np.ndarray:
        """The target array moved back to the source's piece (shape ``part_shape``)."""
        array = np.asarray(array).reshape(self.moved_shape)
        return permute(array, tuple(np.argsort(self.axes))) if self.axes else array

    def to_json(self) -> dict[str, Any]:
        """The move as an entry of the mapping file (:meth:`Layout.to_json`)."""
        return {
            "source": list(self.source),
            "target": list(self.target),
            "source_shape": list(self.source_shape),
            "shape": list(self.shape),
            "axes": list(self.axes),
            "part": self.part,
            "parts": self.parts,
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Move:
        """The move an entry of the mapping file describes, checked; ``axes``, ``part``, ``parts`` optional."""
        try:
            return cls(
                tuple(entry["source"]),
                tuple(entry["target"]),
                tuple(entry["source_shape"]),
                tuple(entry["shape"]),
                tuple(entry.get("axes", ())),
                entry.get("part", 0),
                entry.get("parts", 1),
            )
        except (KeyError, TypeError) as exc:
            raise MappingError(f"malformed mapping entry {entry!r} ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Layout:
    """A whole model's moves, plus the source tensors that have no target (kept under their own path).

    >>> layout = Layout((Move(("fc", "weight"), ("fc", "kernel"), (3, 2), (2, 3), axes=(1, 0)),),
    ...                 dropped=(("bn", "num_batches_tracked"),))
    >>> layout.moves_of(("fc", "weight"))[0].target, Layout.from_json(layout.to_json()) == layout
    (('fc', 'kernel'), True)
    """

    moves: tuple[Move, ...]
    dropped: tuple[ParamPath, ...] = ()

    def __post_init__(self) -> None:
        twice = sorted(t for t, n in Counter(m.target for m in self.moves).items() if n > 1)
        if twice:
            raise MappingError("mapping sends several tensors to " + ", ".join("/".join(t) for t in twice[:5]))

    def moves_of(self, source: ParamPath) -> tuple[Move, ...]:
        """The moves of the tensor ``source``, in the order of its parts; none when it is not moved."""
        return self._by_source.get(source, ())

    @functools.cached_property  # looked up once per tensor and slot: built once, not each time
    def _by_source(self) -> dict[ParamPath, tuple[Move, ...]]:
        found: dict[ParamPath, list[Move]] = {}
        for m in self.moves:
            found.setdefault(m.source, []).append(m)
        return {s: tuple(sorted(ms, key=lambda m: m.part)) for s, ms in found.items()}

    def to_json(self) -> dict[str, Any]:
        """The editable mapping file's content (``optstate map -o``, ``--mapping``)."""
        return {"moves": [m.to_json() for m in self.moves], "dropped": [list(p) for p in self.dropped]}

    @classmethod
    def from_json(cls, doc: Any) -> Layout:
        """The layout a mapping file's content describes, checked."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("moves"), list):
            raise MappingError("a mapping is a JSON object with a 'moves' list (write one with optstate map -o)")
        return cls(tuple(Move.from_json(e) for e in doc["moves"]), tuple(tuple(p) for p in doc.get("dropped", ())))

    @classmethod
    def read(cls, filename: str) -> Layout:
        """The layout in a mapping file (JSON, as ``optstate map -o`` writes it)."""
        try:
            with open(filename) as f:
                return cls.from_json(json.load(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise MappingError(f"{filename}: not a readable mapping file ({exc})") from None


def problem_list(problems: Sequence[str], limit: int = 20) -> str:
    """The message refusing a mapping: the first ``limit`` problems, one a line, and how to fix them.

    >>> print(problem_list(["fc.weight [3, 2]: no target leaf"]))  # doctest: +ELLIPSIS
    no exact mapping to the target model (1 problem; fix the names, or edit the file ... and pass --mapping):
      fc.weight [3, 2]: no target leaf
    """
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (
        f"no exact mapping to the target model ({len(problems)} problem{'s' * (len(problems) > 1)}; fix the "
        "names, or edit the file `optstate map -o mapping.json` writes and pass --mapping):\n  "
        + "\n  ".join(problems[:limit])
        + more
    )


# ----------------------------------------------------------------------------- moving a state


def apply_layout(state: OptimizerState, layout: Layout) -> OptimizerState:
    """``state`` with every tensor moved as ``layout`` says: parameters, optimizer slots and weights.

    Arrays move when they are read (:class:`Deferred`), one at a time. The layout is recorded in the
    metadata, so :func:`revert_layout` (and ``convert --to torch``) can undo it.

    >>> s = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("fc", "weight"), (3, 2), "float32", 0, 1),),
    ...     {("first_moment", ("fc", "weight")): np.arange(6, dtype=np.float32).reshape(3, 2),
    ...      ("second_moment", ("fc", "weight")): np.ones((3, 2), np.float32)})
    >>> moved = apply_layout(s, Layout((Move(("fc", "weight"), ("fc", "kernel"), (3, 2), (2, 3), axes=(1, 0)),)))
    >>> np.asarray(moved.slots[("first_moment", ("fc", "kernel"))]).tolist()
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    if state.metadata.layout is not None:
        raise MappingError("this state was already moved to another layout; convert it back first")
    _check_layout_fits(state, layout)
    params = _moved_params(state, layout)
    # The state's arrays keep their mappings while they are moved: one look at them serves all (when needed).
    mappings = functools.cache(shared_file_mappings)
    slots = _moved_slots(state, layout, mappings)
    weights, buffers = _moved_weights(state, layout, mappings)
    return dataclasses.replace(
        state,
        params=params,
        slots=slots,
        weights=weights,
        buffers=buffers,
        metadata=dataclasses.replace(state.metadata, layout=layout.to_json()),
    )


def _check_layout_fits(state: OptimizerState, layout: Layout) -> None:
    """Refuse a layout that misses a tensor of the state, moves one it does not hold, or expects another shape."""
    shapes = {info.path: info.shape for info in state.params}
    shapes.update({p: tuple(a.shape) for p, a in (state.weights or {}).items() if p not in shapes})
    dropped = set(layout.dropped)
    unplaced = [path_to_name(p) for p in shapes if not layout.moves_of(p) and p not in dropped]
    if unplaced:
        raise MappingError(problem_list([f"{n}: not in the mapping" for n in unplaced]))
    stray = [m for m in layout.moves if m.source not in shapes]
    if stray:
        raise MappingError(
            problem_list([f"{path_to_name(m.source)}: in the mapping, not in the checkpoint" for m in stray])
        )
    for path, shape in shapes.items():
        for move in layout.moves_of(path):
            if tuple(shape) != move.source_shape:
                raise MappingError(
                    f"{path_to_name(path)}: the mapping expects shape {list(move.source_shape)}, the "
                    f"checkpoint holds {list(shape)}"
                )


def _moved_params(state: OptimizerState, layout: Layout) -> tuple[ParamInfo, ...]:
    params = []
    for info in state.params:
        for move in layout.moves_of(info.path):
            _check_move(state, move)
            params.append(dataclasses.replace(info, path=move.target, shape=move.shape))
    return tuple(params)


def _moved_slots(state: OptimizerState, layout: Layout, mappings: _Mappings) -> dict[tuple[str, ParamPath], Any]:
    slots: dict[tuple[str, ParamPath], Any] = {}
    for (slot, path), array in state.slots.items():
        for move in layout.moves_of(path):
            name, moved = _moved_slot(state, slot, array, move, mappings)
            slots[(name, move.target)] = moved
    return slots


def _moved_weights(
    state: OptimizerState, layout: Layout, mappings: _Mappings
) -> tuple[dict[ParamPath, Any] | None, tuple[ParamPath, ...]]:
    """The model's tensors moved (a dropped one kept as it is), and which of them are buffers."""
    dropped = set(layout.dropped)
    buffers = tuple(p for p in state.buffers if p in dropped)
    if state.weights is None:
        return None, buffers
    weights: dict[ParamPath, Any] = {}
    for path, array in state.weights.items():
        if path in dropped:
            weights[path] = array
        for move in layout.moves_of(path):
            weights[move.target] = _moved(array, move, mappings)
            if path in state.buffers:
                buffers += (move.target,)
    return weights, buffers


def _check_move(state: OptimizerState, move: Move) -> None:
    """Refuse a move that changes what the optimizer computes."""
    kind = state.spec.update_scope
    n = len(move.source_shape)
    keeps_last_two = not move.axes or sorted(move.axes[-2:]) == [n - 2, n - 1]
    ok = {
        "elementwise": True,
        "per_tensor": move.parts == 1,
        "factored": move.parts == 1 and not move.reshapes and (n < 2 or keeps_last_two),
        "matrix": move.parts == 1 and not move.axes and not move.reshapes,
    }[kind]
    if not ok:
        raise UnsupportedError(
            f"{path_to_name(move.source)}: {state.spec.torch_class} keeps state that depends on the tensor's shape "
            f"({kind.replace('_', ' ')}), so the move to {'/'.join(move.target)} ({move.describe}) has no exact "
            "counterpart"
        )


def _factored_name(state: OptimizerState, slot: str, move: Move) -> str:
    """Adafactor's row and column statistics trade places when the last two axes do."""
    n = len(move.source_shape)
    swapped = move.axes and move.axes[-2:] == (n - 1, n - 2)
    pair = {s.shape: s.name for s in state.spec.slots if s.shape in ("rows", "cols")}
    other = {"rows": "cols", "cols": "rows"}
    return pair[other[state.spec.slot(slot).shape]] if swapped else slot


def _lazy(shape: Shape, dtype: Any, compute: Callable[[], np.ndarray]) -> Deferred:
    return Deferred(tuple(shape), np.dtype(dtype), compute)


_Mappings = Callable[[], Sequence[FileMapping]]


def _moved(array: Any, move: Move, mappings: _Mappings) -> Deferred:
    """``array`` moved by ``move`` when it is read; the move is kept too (``Deferred.moved``), so that
    an array on an accelerator can be moved there, not on the host. An array mapped from a file that is
    transposed is read into memory first, with ``pread``: an input truncated meanwhile is an error, not a
    SIGBUS in the middle of the transpose."""

    def compute() -> Any:
        if not (move.axes and isinstance(array, np.ndarray)):
            return move.apply(array)  # a view of a mapped file stays one: the writer copies it file to file
        return move.apply(read_into_memory(array, mappings(), f"{path_to_name(move.source)} (moved)"))

    return Deferred(tuple(move.shape), np.dtype(array.dtype), compute, moved=(array, move))


def _moved_slot(state: OptimizerState, slot: str, array: Any, move: Move, mappings: _Mappings) -> tuple[str, Any]:
    """A slot's name and array at the move's target: shaped like the parameter, a scalar, or a factored
    statistic permuted as its parameter is (its size-1 axis included)."""
    kind = state.spec.slot(slot).shape
    if kind == "scalar":
        return slot, array
    if kind in ("rows", "cols"):
        if not move.axes:
            return slot, array
        shape = tuple(array.shape[a] for a in move.axes)
        return _factored_name(state, slot, move), _lazy(
            shape, array.dtype, lambda: permute(np.asarray(array), move.axes)
        )
    return slot, _moved(array, move, mappings)


# ----------------------------------------------------------------------------- moving it back


def revert_layout(state: OptimizerState, layout: Layout) -> OptimizerState:
    """Undo :func:`apply_layout`: every tensor back at its source path and shape, packed pieces
    joined (their steps, groups and scalar slots must agree).

    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("fc", "weight"), (3, 2), "float32", 0),), {})
    >>> layout = Layout((Move(("fc", "weight"), ("fc", "kernel"), (3, 2), (2, 3), axes=(1, 0)),))
    >>> revert_layout(apply_layout(s, layout), layout).params[0].path
    ('fc', 'weight')
    """
    _check_all_mapped(state, layout)
    tracked = {info.path: info for info in state.params}
    params: list[ParamInfo] = []
    slots: dict[tuple[str, ParamPath], Any] = {}
    weights: dict[ParamPath, Any] = {}
    buffers: list[ParamPath] = []
    for source, moves in layout._by_source.items():
        where = f"{path_to_name(source)} (from {', '.join('/'.join(m.target) for m in moves)})"
        info = _reverted_param(state, tracked, source, moves, where)
        if info is not None:
            params.append(info)
            slots.update(_reverted_slots(state, source, moves, where))
        weight = _reverted_weight(state, moves, where)
        if weight is not None:
            weights[source] = weight
            if any(m.target in state.buffers for m in moves):
                buffers.append(source)
    weights.update({p: state.weights[p] for p in layout.dropped if state.weights is not None and p in state.weights})
    buffers += [p for p in layout.dropped if p in state.buffers]
    return dataclasses.replace(
        state,
        params=tuple(params),
        slots=slots,
        weights=weights if state.weights is not None else None,
        buffers=tuple(buffers),
        metadata=dataclasses.replace(state.metadata, layout=None),
    )


def _check_all_mapped(state: OptimizerState, layout: Layout) -> None:
    """Refuse a state holding a tensor the layout did not put there (and so cannot move back)."""
    targets = {m.target for m in layout.moves}
    held = [*(info.path for info in state.params), *(state.weights or {})]
    stray = [p for p in held if p not in targets and p not in layout.dropped]
    if stray:
        raise MappingError(problem_list([f"{'/'.join(p)}: not in the mapping" for p in stray]))


def _reverted_param(
    state: OptimizerState, tracked: Mapping[ParamPath, ParamInfo], source: ParamPath, moves: Sequence[Move], where: str
) -> ParamInfo | None:
    """The parameter ``source`` from the ``tracked`` ones at its moves' targets; None when none is tracked."""
    infos = [tracked[m.target] for m in moves if m.target in tracked]
    if not infos:
        return None
    if len(infos) != len(moves):
        raise MappingError(f"{where}: the optimizer tracks some of its pieces, not all")
    for move in moves:
        _check_move(state, move)
    return ParamInfo(
        source,
        moves[0].source_shape,
        _same((i.dtype for i in infos), f"{where}: dtypes"),
        _same((i.group for i in infos), f"{where}: param groups"),
        _same((i.step for i in infos), f"{where}: steps"),
    )


def _reverted_slots(
    state: OptimizerState, source: ParamPath, moves: Sequence[Move], where: str
) -> dict[tuple[str, ParamPath], Any]:
    """Every slot of the parameter ``source``, from its pieces at the moves' targets."""
    slots: dict[tuple[str, ParamPath], Any] = {}
    for slot in state.spec.slots:
        names = [_factored_name(state, slot.name, m) if slot.shape in ("rows", "cols") else slot.name for m in moves]
        arrays: list[Any] = [state.slots.get((n, m.target)) for n, m in zip(names, moves, strict=True)]
        if all(a is None for a in arrays):
            continue
        if any(a is None for a in arrays):
            raise MappingError(f"{where}: {slot.name} is kept for some of its pieces, not all")
        if slot.shape == "scalar":
            _same((np.asarray(a).item() for a in arrays), f"{where}: {slot.name} values")
            slots[(slot.name, source)] = arrays[0]
        elif slot.shape in ("rows", "cols"):
            slots[(slot.name, source)] = _reverted_factored(slot, moves, arrays)
        else:
            slots[(slot.name, source)] = _joined(moves, arrays, arrays[0].dtype)
    return slots


def _reverted_factored(slot: Slot, moves: Sequence[Move], arrays: Sequence[Any]) -> Any:
    """A row or column statistic (never of a packed tensor) with its axes permuted back."""
    (move,), (array,) = moves, arrays
    if not move.axes:
        return array
    back = tuple(int(a) for a in np.argsort(move.axes))
    return _lazy(slot.torch_shape(move.source_shape), array.dtype, lambda: permute(np.asarray(array), back))


def _reverted_weight(state: OptimizerState, moves: Sequence[Move], where: str) -> Deferred | None:
    """The model tensor the moves came from, joined from its pieces; None when the weights hold none."""
    weights = state.weights or {}
    pieces: list[Any] = [weights.get(m.target) for m in moves]
    if all(p is None for p in pieces):
        return None
    if any(p is None for p in pieces):
        raise MappingError(f"{where}: the weights hold some of its pieces, not all")
    return _joined(moves, pieces, _same((p.dtype for p in pieces), f"{where}: dtypes"))


def _joined(moves: Sequence[Move], arrays: Sequence[Any], dtype: Any) -> Deferred:
    """The source tensor from its moved pieces."""

    def compute() -> np.ndarray:
        pieces = [m.revert(a) for m, a in zip(moves, arrays, strict=True)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return _lazy(moves[0].source_shape, dtype, compute)


def _same(values: Iterable[Any], what: str) -> Any:
    values = list(values)
    if any(v != values[0] for v in values[1:]):
        raise UnsupportedError(f"{what} differ ({values}); torch keeps one tensor for them")
    return values[0]
