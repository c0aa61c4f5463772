"""Model layouts: where each tensor of a torch model goes in a Flax model, and how it moves there.

A torch ``nn.Linear`` weight ``[out, in]`` is a Flax ``Dense`` kernel ``[in, out]``; a ``Conv2d``
weight ``[O, I, H, W]`` a ``Conv`` kernel ``[H, W, I, O]``; a LayerNorm ``weight`` a ``scale``;
``layers.0`` is ``layers_0`` (linen) or ``layers/0`` (NNX); BatchNorm's running statistics are
``batch_stats``, never optimizer state. Every optimizer slot moves exactly as its parameter does: a
reshape instead of a transpose is silently wrong, and a square layer passes every shape check, so
the rules below choose the move by the kind of layer (the leaf's name), and shapes only confirm it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ...errors import MappingError, UnsupportedError
from ...schema.state import Deferred, OptimizerState, ParamInfo, Path, path_to_name
from .transpose import permute

Shape = tuple[int, ...]

# Leaves of a torch module that have no Flax counterpart and hold nothing a Flax model reads.
DROPPED_LEAVES = ("num_batches_tracked",)
# torch nn.MultiheadAttention packs q, k, v along axis 0 of one tensor; Flax keeps three modules.
QKV = ("query", "key", "value")


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

    source: Path
    target: Path
    source_shape: Shape
    shape: Shape
    axes: tuple[int, ...] = ()
    part: int = 0
    parts: int = 1

    def __post_init__(self) -> None:
        where = f"{path_to_name(self.source)} -> {'/'.join(self.target)}"
        if self.source_shape and self.source_shape[0] % self.parts or not 0 <= self.part < self.parts:
            raise MappingError(f"{where}: part {self.part} of {self.parts} of a tensor of shape "
                               f"{list(self.source_shape)}")
        if self.axes and sorted(self.axes) != list(range(len(self.source_shape))):
            raise MappingError(f"{where}: axes {list(self.axes)} are not a permutation of a "
                               f"{len(self.source_shape)}-d tensor's")
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
            array = array[self.part * size:(self.part + 1) * size]
        return (transpose(array, self.axes) if self.axes else array).reshape(self.shape)

    def revert(self, array: Any) -> np.ndarray:
        """The target array moved back to the source's piece (shape ``part_shape``)."""
        array = np.asarray(array).reshape(self.moved_shape)
        return permute(array, tuple(np.argsort(self.axes))) if self.axes else array

    def to_json(self) -> dict[str, Any]:
        return {"source": list(self.source), "target": list(self.target), "source_shape": list(self.source_shape),
                "shape": list(self.shape), "axes": list(self.axes), "part": self.part, "parts": self.parts}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "Move":
        try:
            return cls(tuple(entry["source"]), tuple(entry["target"]), tuple(entry["source_shape"]),
                       tuple(entry["shape"]), tuple(entry.get("axes", ())), entry.get("part", 0),
                       entry.get("parts", 1))
        except (KeyError, TypeError) as exc:
            raise MappingError(f"malformed mapping entry {entry!r} ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Layout:
    """A whole model's moves, plus the source tensors that have no target (kept under their own path)."""

    moves: tuple[Move, ...]
    dropped: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        twice = sorted(t for t, n in Counter(m.target for m in self.moves).items() if n > 1)
        if twice:
            raise MappingError("mapping sends several tensors to " + ", ".join("/".join(t) for t in twice[:5]))

    def moves_of(self, source: Path) -> tuple[Move, ...]:
        return self._by_source.get(source, ())

    @functools.cached_property  # looked up once per tensor and slot: built once, not each time
    def _by_source(self) -> dict[Path, tuple[Move, ...]]:
        found: dict[Path, list[Move]] = {}
        for m in self.moves:
            found.setdefault(m.source, []).append(m)
        return {s: tuple(sorted(ms, key=lambda m: m.part)) for s, ms in found.items()}

    def to_json(self) -> dict[str, Any]:
        """The editable mapping file's content (``optstate map -o``, ``--mapping``)."""
        return {"moves": [m.to_json() for m in self.moves], "dropped": [list(p) for p in self.dropped]}

    @classmethod
    def from_json(cls, doc: Any) -> "Layout":
        if not isinstance(doc, Mapping) or not isinstance(doc.get("moves"), list):
            raise MappingError("a mapping is a JSON object with a 'moves' list (write one with optstate map -o)")
        return cls(tuple(Move.from_json(e) for e in doc["moves"]), tuple(tuple(p) for p in doc.get("dropped", ())))

    @classmethod
    def read(cls, path: str) -> "Layout":
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise MappingError(f"{path}: not a readable mapping file ({exc})") from None


# ----------------------------------------------------------------------------- matching by rules

def _module_key(module: Path) -> str:
    """``layers.0.attn`` (torch), ``layers_0/attn`` (linen) and ``layers/0/attn`` (NNX) meet here."""
    return "_".join(module).lower()


def _index(leaves: Mapping[Path, Shape]) -> dict[str, dict[str, list[tuple[Path, Shape]]]]:
    """Target leaves by module key and leaf name; two modules whose names meet are both kept (ambiguous)."""
    index: dict[str, dict[str, list[tuple[Path, Shape]]]] = {}
    for path, shape in leaves.items():
        module = path[1:-1] if path[0] == "batch_stats" else path[:-1]  # linen's collection is not a module
        index.setdefault(_module_key(module), {}).setdefault(path[-1], []).append((path, tuple(shape)))
    return index


def _kernel_axes(ndim: int) -> tuple[int, ...]:
    """torch ``[out, in]`` -> ``[in, out]``; ``[O, I, *spatial]`` -> ``[*spatial, I, O]`` (Conv, and
    ConvTranspose with ``transpose_kernel=True``, whose torch weight is ``[in, out, *spatial]``)."""
    return (1, 0) if ndim == 2 else (*range(2, ndim), 1, 0)


class _Matcher:
    """Applies the rules to one model; collects moves and every problem, so the user sees them all."""

    def __init__(self, params: Mapping[Path, Shape], stats: Mapping[Path, Shape]):
        self.params, self.stats = _index(params), _index(stats)
        self.targets = {**{p: tuple(s) for p, s in params.items()}, **{p: tuple(s) for p, s in stats.items()}}
        self.moves: list[Move] = []
        self.dropped: list[Path] = []
        self.problems: list[str] = []

    def leaf(self, index: Mapping[str, Mapping[str, list[tuple[Path, Shape]]]], module: Path,
             names: Sequence[str]) -> list[tuple[Path, Shape]]:
        leaves = index.get(_module_key(module))
        if leaves is None and module and module[-1] == "out_proj":  # nn.MultiheadAttention's output Linear
            leaves = index.get(_module_key((*module[:-1], "out")))
        return [found for n in names for found in (leaves or {}).get(n, ())]

    def add(self, source: Path, shape: Shape, found: list[tuple[Path, Shape]], axes: tuple[int, ...] = (),
            part: int = 0, parts: int = 1, reshape: bool = False) -> None:
        name = f"{path_to_name(source)} {list(shape)}"
        if not found:
            self.problems.append(f"{name}: no target leaf")
            return
        if len(found) > 1:
            self.problems.append(f"{name}: ambiguous, fits " + ", ".join("/".join(p) for p, _ in found))
            return
        (target, target_shape), = found
        piece = (shape[0] // parts, *shape[1:]) if parts > 1 else shape
        moved = tuple(piece[a] for a in axes) if axes else piece
        # A reshape splits one axis into heads (Flax's DenseGeneral): the other axis must stay in place.
        fits = moved == target_shape or (reshape and math.prod(moved) == math.prod(target_shape) and (
            len(moved) == 1 or moved[0] == target_shape[0] or moved[-1] == target_shape[-1]))
        if not fits:
            how = f" after transpose {axes}" if axes else ""
            self.problems.append(f"{name}: target {'/'.join(target)} has shape {list(target_shape)}, expected "
                                 f"{list(moved)}{how}")
            return
        self.moves.append(Move(source, target, shape, target_shape, axes, part, parts))

    def match(self, source: Path, shape: Shape) -> None:
        module, leaf = source[:-1], source[-1]
        if leaf in DROPPED_LEAVES:
            self.dropped.append(source)
        elif leaf in ("running_mean", "running_var"):
            self.add(source, shape, self.leaf(self.stats, module, (leaf.removeprefix("running_"),)))
        elif leaf == "weight":
            kernel = self.leaf(self.params, module, ("kernel",))
            if kernel and len(shape) >= 2:
                self.add(source, shape, kernel, _kernel_axes(len(shape)), reshape=len(shape) == 2)
            else:
                self.add(source, shape, self.leaf(self.params, module, ("scale", "embedding", "weight")))
        elif leaf == "bias":
            self.add(source, shape, self.leaf(self.params, module, ("bias",)), reshape=True)
        elif leaf in ("in_proj_weight", "in_proj_bias"):
            kind = leaf.removeprefix("in_proj_").replace("weight", "kernel")
            for part, name in enumerate(QKV):
                self.add(source, shape, self.leaf(self.params, (*module, name), (kind,)),
                         (1, 0) if kind == "kernel" else (), part, 3, reshape=True)
        elif leaf in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            name = QKV["qkv".index(leaf[0])]
            self.add(source, shape, self.leaf(self.params, (*module, name), ("kernel",)), (1, 0), reshape=True)
        elif leaf in ("bias_k", "bias_v"):
            self.problems.append(f"{path_to_name(source)}: nn.MultiheadAttention(add_bias_kv=True) has no Flax "
                                 "counterpart")
        else:
            self.add(source, shape, self.leaf(self.params, module, (leaf,)))

    def unmatched_targets(self) -> list[str]:
        hit = {m.target for m in self.moves}
        return [f"{'/'.join(p)} {list(s)}: no torch tensor" for p, s in self.targets.items() if p not in hit]


def plan_layout(sources: Mapping[Path, Shape], params: Mapping[Path, Shape],
                stats: Mapping[Path, Shape] | None = None) -> tuple[Layout, list[str]]:
    """The moves the rules choose from torch tensors (``sources``: path -> shape) to a Flax model's
    ``params`` (and ``stats``: BatchNorm's ``batch_stats``), and every problem found: a tensor with no
    target or several, a shape that does not fit, a target no tensor reaches.

    >>> layout, problems = plan_layout({("fc", "weight"): (3, 2), ("fc", "bias"): (3,)},
    ...                                {("fc", "kernel"): (2, 3), ("fc", "bias"): (3,)})
    >>> [(m.describe, m.target) for m in layout.moves], problems
    ([('transpose (1, 0)', ('fc', 'kernel')), ('as is', ('fc', 'bias'))], [])
    """
    matcher = _Matcher(params, stats or {})
    for source, shape in sources.items():
        matcher.match(source, tuple(shape))
    return Layout(tuple(matcher.moves), tuple(matcher.dropped)), matcher.problems + matcher.unmatched_targets()


def match_layout(sources: Mapping[Path, Shape], params: Mapping[Path, Shape],
                 stats: Mapping[Path, Shape] | None = None) -> Layout:
    """:func:`plan_layout`, refusing with the list of problems rather than guessing.

    >>> match_layout({("fc", "weight"): (2, 2)}, {("fc", "kernel"): (2, 2)}).moves[0].axes  # square: transposed
    (1, 0)
    """
    layout, problems = plan_layout(sources, params, stats)
    if problems:
        raise MappingError(problem_list(problems))
    return layout


def problem_list(problems: Sequence[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (f"no exact mapping to the target model ({len(problems)} problem{'s' * (len(problems) > 1)}; fix the "
            "names, or edit the file `optstate map -o mapping.json` writes and pass --mapping):\n  "
            + "\n  ".join(problems[:limit]) + more)


# ----------------------------------------------------------------------------- moving a state

def _check_move(state: OptimizerState, move: Move) -> None:
    """Refuse a move that changes what the optimizer computes."""
    kind = state.spec.layout
    n = len(move.source_shape)
    keeps_last_two = not move.axes or sorted(move.axes[-2:]) == [n - 2, n - 1]
    ok = {"elementwise": True,
          "per_tensor": move.parts == 1,
          "factored": move.parts == 1 and not move.reshapes and (n < 2 or keeps_last_two),
          "matrix": move.parts == 1 and not move.axes and not move.reshapes}[kind]
    if not ok:
        raise UnsupportedError(
            f"{path_to_name(move.source)}: {state.spec.torch_class} keeps state that depends on the tensor's shape "
            f"({kind.replace('_', ' ')}), so the move to {'/'.join(move.target)} ({move.describe}) has no exact "
            "counterpart")


def _factored_name(state: OptimizerState, slot: str, move: Move) -> str:
    """Adafactor's row and column statistics trade places when the last two axes do."""
    n = len(move.source_shape)
    swapped = move.axes and move.axes[-2:] == (n - 1, n - 2)
    pair = {s.shape: s.name for s in state.spec.slots if s.shape in ("rows", "cols")}
    other = {"rows": "cols", "cols": "rows"}
    return pair[other[state.spec.slot(slot).shape]] if swapped else slot


def _lazy(shape: Shape, dtype: Any, compute: Any) -> Deferred:
    return Deferred(tuple(shape), np.dtype(dtype), compute)


def _moved(array: Any, move: Move) -> Deferred:
    """``array`` moved by ``move`` when it is read; the move is kept too (``Deferred.moved``), so that
    an array on an accelerator can be moved there, not on the host."""
    return Deferred(tuple(move.shape), np.dtype(array.dtype), lambda: move.apply(array), moved=(array, move))


def _moved_slot(state: OptimizerState, slot: str, array: Any, move: Move) -> tuple[str, Any]:
    """A slot's name and array at the move's target: shaped like the parameter, a scalar, or a factored
    statistic permuted as its parameter is (its size-1 axis included)."""
    kind = state.spec.slot(slot).shape
    if kind == "scalar":
        return slot, array
    if kind in ("rows", "cols"):
        if not move.axes:
            return slot, array
        shape = tuple(array.shape[a] for a in move.axes)
        return _factored_name(state, slot, move), _lazy(shape, array.dtype,
                                                        lambda: permute(np.asarray(array), move.axes))
    return slot, _moved(array, move)


def apply_layout(state: OptimizerState, layout: Layout) -> OptimizerState:
    """``state`` with every tensor moved as ``layout`` says: parameters, optimizer slots and weights.

    Arrays move when they are read (:class:`Deferred`), one at a time. The layout is recorded in the
    metadata, so :func:`revert_layout` (and ``convert --to torch``) can undo it.

    >>> s = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("fc", "weight"), (3, 2), "float32", 0, 1),),
    ...     {("first_moment", ("fc", "weight")): np.arange(6, dtype=np.float32).reshape(3, 2),
    ...      ("second_moment", ("fc", "weight")): np.ones((3, 2), np.float32)})
    >>> moved = apply_layout(s, match_layout({("fc", "weight"): (3, 2)}, {("fc", "kernel"): (2, 3)}))
    >>> np.asarray(moved.slots[("first_moment", ("fc", "kernel"))]).tolist()
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    if state.metadata.layout is not None:
        raise MappingError("this state was already moved to another layout; convert it back first")
    tensors = [p.path for p in state.params] + [p for p in (state.weights or {}) if p not in state._by_path]
    dropped = set(layout.dropped)
    unplaced = [path_to_name(p) for p in tensors if not layout.moves_of(p) and p not in dropped]
    if unplaced:
        raise MappingError(problem_list([f"{n}: not in the mapping" for n in unplaced]))
    known = set(tensors)
    stray = [m for m in layout.moves if m.source not in known]
    if stray:
        raise MappingError(problem_list([f"{path_to_name(m.source)}: in the mapping, not in the checkpoint"
                                         for m in stray]))
    for p in tensors:
        for move in layout.moves_of(p):
            actual = tuple(state._by_path[p].shape if p in state._by_path else state.weights[p].shape)
            if actual != move.source_shape:
                raise MappingError(f"{path_to_name(p)}: the mapping expects shape {list(move.source_shape)}, the "
                                   f"checkpoint holds {list(actual)}")
    params = []
    for info in state.params:
        for move in layout.moves_of(info.path):
            _check_move(state, move)
            params.append(dataclasses.replace(info, path=move.target, shape=move.shape))
    slots = {}
    for (slot, path), array in state.slots.items():
        for move in layout.moves_of(path):
            name, moved = _moved_slot(state, slot, array, move)
            slots[(name, move.target)] = moved
    weights = None
    buffers = tuple(p for p in state.buffers if p in dropped)
    if state.weights is not None:
        weights = {}
        for path, array in state.weights.items():
            if path in dropped:
                weights[path] = array
            for move in layout.moves_of(path):
                weights[move.target] = _moved(array, move)
                if path in state.buffers:
                    buffers += (move.target,)
    return dataclasses.replace(state, params=tuple(params), slots=slots, weights=weights, buffers=buffers,
                               metadata=dataclasses.replace(state.metadata, layout=layout.to_json()))


def _joined(moves: Sequence[Move], arrays: Sequence[Any], dtype: Any) -> Deferred:
    """The source tensor from its moved pieces."""
    def compute() -> np.ndarray:
        pieces = [m.revert(a) for m, a in zip(moves, arrays)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return _lazy(moves[0].source_shape, dtype, compute)


def _same(values: Iterable[Any], what: str) -> Any:
    values = list(values)
    if any(v != values[0] for v in values[1:]):
        raise UnsupportedError(f"{what} differ ({values}); torch keeps one tensor for them")
    return values[0]


def revert_layout(state: OptimizerState, layout: Layout) -> OptimizerState:
    """Undo :func:`apply_layout`: every tensor back at its source path and shape, packed pieces
    joined (their steps, groups and scalar slots must agree).

    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("fc", "weight"), (3, 2), "float32", 0),), {})
    >>> layout = match_layout({("fc", "weight"): (3, 2)}, {("fc", "kernel"): (2, 3)})
    >>> revert_layout(apply_layout(s, layout), layout).params[0].path
    ('fc', 'weight')
    """
    by_target = {m.target: m for m in layout.moves}
    weights = state.weights or {}
    stray = [p for p in [*state._by_path, *weights] if p not in by_target and p not in layout.dropped]
    if stray:
        raise MappingError(problem_list([f"{'/'.join(p)}: not in the mapping" for p in stray]))
    params, slots, moved_weights, buffers = [], {}, {}, []
    for source, moves in layout._by_source.items():
        infos = [state._by_path.get(m.target) for m in moves]
        where = f"{path_to_name(source)} (from {', '.join('/'.join(m.target) for m in moves)})"
        if any(infos) and not all(infos):
            raise MappingError(f"{where}: the optimizer tracks some of its pieces, not all")
        if all(infos):
            for move in moves:
                _check_move(state, move)
            params.append(ParamInfo(source, moves[0].source_shape, _same((i.dtype for i in infos), f"{where}: dtypes"),
                                    _same((i.group for i in infos), f"{where}: param groups"),
                                    _same((i.step for i in infos), f"{where}: steps")))
            for slot in state.spec.slots:
                names = [_factored_name(state, slot.name, m) if slot.shape in ("rows", "cols") else slot.name
                         for m in moves]
                arrays = [state.slots.get((n, m.target)) for n, m in zip(names, moves)]
                if all(a is None for a in arrays):
                    continue
                if any(a is None for a in arrays):
                    raise MappingError(f"{where}: {slot.name} is kept for some of its pieces, not all")
                if slot.shape == "scalar":
                    _same((np.asarray(a).item() for a in arrays), f"{where}: {slot.name} values")
                    slots[(slot.name, source)] = arrays[0]
                elif slot.shape in ("rows", "cols"):
                    (move,), (array,) = moves, arrays
                    shape = slot.torch_shape(move.source_shape)
                    slots[(slot.name, source)] = array if not move.axes else _lazy(
                        shape, array.dtype, lambda a=array, m=move: permute(np.asarray(a), tuple(np.argsort(m.axes))))
                else:
                    slots[(slot.name, source)] = _joined(moves, arrays, arrays[0].dtype)
        pieces = [weights.get(m.target) for m in moves]
        if any(p is not None for p in pieces):
            if any(p is None for p in pieces):
                raise MappingError(f"{where}: the weights hold some of its pieces, not all")
            moved_weights[source] = _joined(moves, pieces, _same((p.dtype for p in pieces), f"{where}: dtypes"))
            if any(m.target in state.buffers for m in moves):
                buffers.append(source)
    moved_weights.update({p: weights[p] for p in layout.dropped if p in weights})
    buffers += [p for p in layout.dropped if p in state.buffers]
    metadata = dataclasses.replace(state.metadata, layout=None)
    return dataclasses.replace(state, params=tuple(params), slots=slots,
                               weights=moved_weights if state.weights is not None else None,
                               buffers=tuple(buffers), metadata=metadata)
