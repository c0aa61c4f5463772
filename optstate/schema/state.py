"""The canonical optimizer state: framework-neutral, NumPy arrays, parameters identified by path."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..atomic import check_soon, checks_deferred
from ..errors import FormatError, UnsupportedError
from .families import OptimizerSpec, optimizer_spec
from .mapped import shared_file_mappings, values_read

ParamPath = tuple[str, ...]


def name_to_path(name: str) -> ParamPath:
    """A torch parameter name as a path.

    >>> name_to_path("layers.0.weight")
    ('layers', '0', 'weight')
    """
    return tuple(name.split("."))


def path_to_name(path: ParamPath) -> str:
    """A path as a torch parameter name.

    >>> path_to_name(("layers", "0", "weight"))
    'layers.0.weight'
    """
    return ".".join(path)


def numpy_dtype(name: str) -> np.dtype:
    """A dtype from its name, ml_dtypes' included.

    ml_dtypes is imported only for one of its own names: ml_dtypes 0.7 takes 0.7 s to import here, a
    quarter of converting 3 GB of float32 state, which never needs it.

    >>> numpy_dtype("bfloat16"), numpy_dtype("float64")
    (dtype(bfloat16), dtype('float64'))
    """
    try:
        return np.dtype(name)
    except TypeError:  # not one of NumPy's names
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name, None) or name)


def all_finite(array: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether every value is finite, in bounded memory (a block at a time; one value of a broadcast).

    >>> all_finite(np.array([1.0, np.inf])), all_finite(np.broadcast_to(np.float32(0), (10**9,)))
    (False, True)
    """
    if array.size and array.ndim and not any(array.strides):
        array = array[(0,) * array.ndim]
    if array.ndim == 0 or not array.flags.c_contiguous:
        return bool(np.isfinite(array).all())
    flat = array.reshape(-1)
    return all(np.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.size, chunk))


# Slots that are sums or averages of squares (or of absolute values): never negative in a healthy run.
NON_NEGATIVE_SLOTS = frozenset(
    {
        "second_moment",
        "max_second_moment",
        "infinity_norm",
        "row_variance",
        "column_variance",
        "sum_of_squares",
        "update_second_moment",
    }
)

_allow_nonfinite: contextvars.ContextVar[bool] = contextvars.ContextVar("optstate_allow_nonfinite", default=False)


@contextlib.contextmanager
def allowing_nonfinite(allow: bool = True) -> Iterator[None]:
    """States built inside this block (by any reader) may hold NaN, inf and negative second moments: a
    diverged run converted on purpose (``allow_nonfinite``). The caller records it in the metadata.

    >>> bad = {("second_moment", ("w",)): np.array([-1.0])}
    >>> with allowing_nonfinite():
    ...     OptimizerState("adam", ({},), (ParamInfo(("w",), (1,), "float64", 0, 1),), bad).optimizer
    'adam'
    """
    token = _allow_nonfinite.set(allow)
    try:
        yield
    finally:
        _allow_nonfinite.reset(token)


def has_negative(array: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether any value is below zero (-0.0 is not), in bounded memory.

    >>> has_negative(np.array([0.0, -0.0, 2.0])), has_negative(np.broadcast_to(np.float32(-1), (10**9,)))
    (False, True)
    """
    if array.size and array.ndim and not any(array.strides):  # a broadcast: one value
        array = array[(0,) * array.ndim]
    if array.ndim == 0 or not array.flags.c_contiguous:
        return bool((np.asarray(array) < 0).any())
    flat = array.reshape(-1)
    return any((flat[i : i + chunk] < 0).any() for i in range(0, flat.size, chunk))


def finite_and_non_negative(array: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether every value is finite and not below zero: one pass of ``min`` and ``max`` a block at a time
    (NaN carries through both), cheaper than :func:`all_finite` and :func:`has_negative` one after the other.

    >>> [finite_and_non_negative(np.array(v)) for v in ([0.0, -0.0, 1.0], [1.0, np.nan], [np.inf], [-1.0])]
    [True, False, False, False]
    """
    if array.ndim == 0 or not array.flags.c_contiguous or array.dtype.kind not in "fV" or array.size == 0:
        return all_finite(array) and not has_negative(array)
    flat = array.reshape(-1)
    for i in range(0, flat.size, chunk):
        block = flat[i : i + chunk]
        if not (block.min() >= 0 and block.max() < np.inf):
            return False
    return True


def negative_slot(path: ParamPath, slot: str) -> FormatError:
    """The error for a second moment (a slot that is never negative) holding a negative value.

    >>> str(negative_slot(("fc", "weight"), "second_moment"))[:60]
    "fc.weight: slot 'second_moment' holds negative values; a sec"
    """
    return FormatError(
        f"{path_to_name(path)}: slot {slot!r} holds negative values; a second moment is never negative, so "
        "the run diverged or the file is corrupt (--allow-nonfinite converts it anyway, recorded in the output)"
    )


_values_checked_beside: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "optstate_values_checked_beside", default=None
)


@contextlib.contextmanager
def values_checked_beside(source: str) -> Iterator[None]:
    """States built inside this block check their moments' values (finite; second moments not negative) in a
    thread beside the writing when a conversion is under way (:func:`optstate.atomic.check_soon`: the output
    is renamed into place only once they passed), their errors then naming ``source``; elsewhere at once. That
    pass over every moment was a tenth of converting 3 GB here, before the first byte was written.

    >>> import optstate.atomic as atomic
    >>> bad = {("first_moment", ("w",)): np.array([np.nan])}
    >>> try:
    ...     with atomic.checks_in_background(), values_checked_beside("c.pt"):
    ...         s = OptimizerState("adam", ({},), (ParamInfo(("w",), (1,), "float64", 0, 1),), bad)
    ...         print("built; checked beside what follows")
    ... except FormatError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    built; checked beside what follows
    c.pt: w: slot 'first_moment' holds non-finite values (NaN or inf); ...
    """
    token = _values_checked_beside.set(source)
    try:
        yield
    finally:
        _values_checked_beside.reset(token)


def _check_values(slots: Iterable[tuple[str, ParamPath, np.ndarray]], source: str | None = None) -> None:
    """Refuse the first slot with a NaN or an infinity, or a negative value where none can be (naming
    ``source``, where given). A slot mapped from a file is read with ``pread``, not through the mapping: an
    input truncated meanwhile is an error naming it, not a SIGBUS."""
    mappings = shared_file_mappings()

    def values(slot: str, path: ParamPath, array: np.ndarray) -> Iterator[np.ndarray]:
        return values_read(array, mappings, f"{path_to_name(path)}'s {slot}")

    def refused(error: FormatError) -> FormatError:  # a read that failed names its file itself
        return error if source is None else FormatError(f"{source}: {error}")

    for slot, path, array in slots:
        if slot in NON_NEGATIVE_SLOTS and all(map(finite_and_non_negative, values(slot, path, array))):
            continue
        if not all(map(all_finite, values(slot, path, array))):
            raise refused(non_finite_slot(path, slot))
        if slot in NON_NEGATIVE_SLOTS:
            raise refused(negative_slot(path, slot))


def non_finite_slot(path: ParamPath, slot: str) -> FormatError:
    """The error for a slot holding NaN or inf.

    >>> str(non_finite_slot(("fc", "weight"), "first_moment"))[:50]
    "fc.weight: slot 'first_moment' holds non-finite va"
    """
    return FormatError(
        f"{path_to_name(path)}: slot {slot!r} holds non-finite values (NaN or inf); "
        "the run diverged or the file is corrupt"
    )


@dataclass(frozen=True, eq=False)
class Deferred:
    """An array made when it is read (``np.asarray``): a layout move of a memory-mapped tensor, so that
    a conversion holds one tensor at a time, or the host copy of a tensor on an accelerator. Shape
    and dtype are known without making it.

    ``dlpack``, when set, is the array where it already is (an object with ``__dlpack__``: a CUDA
    tensor), for a consumer that takes it there without the copy to the host (``to_optax``).
    ``moved``, when set, is ``(source, move)``: this array is ``move.apply(source)`` (a layout
    move, ``optstate.converters.layout.moves.Move``), which such a consumer can do where the source is.

    >>> d = Deferred((2, 1), np.dtype("float32"), lambda: np.ones((1, 2), np.float32).T)
    >>> d.shape, np.asarray(d).tolist()
    ((2, 1), [[1.0], [1.0]])
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray]
    dlpack: Any = None
    moved: Any = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.compute()
        if array.shape != self.shape or array.dtype != self.dtype:
            raise FormatError(
                f"a deferred array computed as {list(array.shape)} {array.dtype}, "
                f"declared {list(self.shape)} {self.dtype}"
            )
        if dtype is not None:
            array = array.astype(dtype, copy=bool(copy))
        elif copy:  # NumPy trusts __array__ with copy=True: a view of the source would alias it
            array = array.copy()
        return array


@dataclass(frozen=True)
class ParamInfo:
    """One parameter the optimizer tracks.

    ``step`` is the number of optimizer steps this parameter has taken, or ``None`` where the
    optimizer keeps no step (SGD) or the parameter has no state yet.
    """

    path: ParamPath
    shape: tuple[int, ...]
    dtype: str
    group: int
    step: int | None = None


@dataclass(frozen=True)
class Metadata:
    """What a state carries beside its arrays, each field read by the adapters that need it.

    ``source`` says what wrote the state (``"torch 2.13.0"``, ``"optax 0.2.8"``). ``lr_scheduler``
    is a torch LR scheduler's state_dict as read (plain values; converted to an Optax schedule
    exactly or refused). ``schedule_count`` is an Optax LR schedule's count where it is not the
    optimizer's own. ``lr_horizon`` is the last step a schedule that never settles is asked for.
    ``constant_lr`` is the user's word that the learning rate stays at the param groups' values where a
    scheduler was attached but its state is not carried. ``layout`` is the layout moves applied
    (``Layout.to_json()``), so the way back can undo them.
    ``approximate`` says why this state's continuation is not bit-exact; ``None`` when it is.
    ``nonfinite`` says that NaN, inf or negative second moments were admitted on purpose (``allow_nonfinite``);
    a state carrying it may hold them.

    >>> m = Metadata(source="torch", lr_horizon=100)
    >>> m.to_json(), Metadata.from_json(m.to_json()) == m
    ({'source': 'torch', 'lr_horizon': 100}, True)
    """

    source: str | None = None
    lr_scheduler: Mapping[str, Any] | None = None
    schedule_count: int | None = None
    lr_horizon: int | None = None
    constant_lr: bool | None = None
    layout: Mapping[str, Any] | None = None
    approximate: str | None = None
    nonfinite: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, by name (JSON-ready but for the scheduler's own values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Metadata:
        """The record from :meth:`to_json`'s document; an unknown key is refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise FormatError(f"unknown metadata field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**document)


@dataclass(frozen=True)
class OptimizerState:
    """An optimizer's state, independent of any framework.

    ``param_groups`` hold each group's hyperparameters under torch's constructor names.
    ``slots`` maps ``(slot name, parameter path)`` to an array shaped as the optimizer table's
    slot says (the parameter's shape; a scalar; Adafactor's row and column statistics); a
    parameter without an entry has no state yet. ``weights`` optionally holds every tensor of
    the model (trainable, frozen and buffers); ``buffers`` names those that are not parameters.

    >>> import numpy as np
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.zeros(2)})
    >>> s.spec.torch_class, s.common_step() is None
    ('SGD', True)
    """

    optimizer: str
    param_groups: tuple[Mapping[str, Any], ...]
    params: tuple[ParamInfo, ...]
    slots: Mapping[tuple[str, ParamPath], np.ndarray]
    weights: Mapping[ParamPath, np.ndarray] | None = None
    buffers: tuple[ParamPath, ...] = ()
    metadata: Metadata = Metadata()

    def __post_init__(self) -> None:
        spec = optimizer_spec(self.optimizer)
        by_path = {p.path: p for p in self.params}
        if len(by_path) != len(self.params):
            raise FormatError("a parameter path occurs twice")
        slots = {s.name: s for s in spec.slots}
        checked = []  # the slots whose values must be finite (second moments: and not negative)
        for (slot, path), array in self.slots.items():
            if slot not in slots:
                raise FormatError(f"{path_to_name(path)}: slot {slot!r} is not a slot of {spec.torch_class}")
            info = by_path.get(path)
            if info is None:
                raise FormatError(f"{path_to_name(path)}: slot {slot!r} for a parameter the optimizer does not track")
            if not slots[slot].applies(info.shape):
                raise FormatError(
                    f"{path_to_name(path)}: slot {slot!r} is not kept for a parameter of shape {list(info.shape)}"
                )
            expected = slots[slot].torch_shape(info.shape)
            if tuple(array.shape) != expected:
                raise FormatError(
                    f"{path_to_name(path)}: slot {slot!r} has shape {list(array.shape)}, expected {list(expected)}"
                )
            if not (isinstance(array, Deferred) or self.metadata.nonfinite is not None or _allow_nonfinite.get()):
                checked.append((slot, path, array))  # a Deferred's source was checked; a diverged run admitted
        source = _values_checked_beside.get()
        if source is not None and checks_deferred():
            check_soon(functools.partial(_check_values, checked, source))
        else:
            _check_values(checked)
        for info in self.params:
            if not 0 <= info.group < len(self.param_groups):
                raise FormatError(f"{path_to_name(info.path)}: group {info.group} does not exist")
            if self.weights is not None and info.path in self.weights:
                w = self.weights[info.path]
                if tuple(w.shape) != info.shape:
                    raise FormatError(
                        f"{path_to_name(info.path)}: weight has shape {list(w.shape)}, "
                        f"the optimizer state {list(info.shape)}"
                    )

    @property
    def spec(self) -> OptimizerSpec:
        return optimizer_spec(self.optimizer)

    @functools.cached_property
    def _by_path(self) -> dict[ParamPath, ParamInfo]:
        return {p.path: p for p in self.params}

    def param(self, path: ParamPath) -> ParamInfo:
        return self._by_path[path]

    def has_state(self, path: ParamPath) -> bool:
        return any((s.name, path) in self.slots for s in self.spec.slots)

    def group_params(self, group: int) -> tuple[ParamInfo, ...]:
        return tuple(p for p in self.params if p.group == group)

    def frozen_paths(self) -> tuple[ParamPath, ...]:
        """Model parameters the optimizer does not track (buffers excluded)."""
        if self.weights is None:
            return ()
        tracked = {p.path for p in self.params}
        buffers = set(self.buffers)
        return tuple(p for p in self.weights if p not in tracked and p not in buffers)

    def common_step(self, params: tuple[ParamInfo, ...] | None = None) -> int | None:
        """The one step shared by ``params`` (default: all), or UnsupportedError naming them.

        A parameter without state counts as step 0: its first update starts the bias correction.
        """
        params = self.params if params is None else params
        if not self.spec.has_step:
            return None
        steps = {p.path: (p.step or 0) for p in params}
        distinct = sorted(set(steps.values()))
        if len(distinct) > 1:
            examples = ", ".join(
                f"{path_to_name(next(p for p, s in steps.items() if s == v))} at step {v}" for v in distinct[:4]
            )
            raise UnsupportedError(
                f"parameters have taken different numbers of steps ({examples}); torch skips a parameter "
                "whose gradient is None, Optax keeps one count per transform, so this state has no exact "
                "Optax counterpart yet"
            )
        return distinct[0] if distinct else 0

    def with_metadata(self, **fields: Any) -> OptimizerState:
        """This state with the named metadata fields replaced (``None`` clears one)."""
        return dataclasses.replace(self, metadata=dataclasses.replace(self.metadata, **fields))

    def reset(self, names: Iterable[str]) -> OptimizerState:
        """This state with the named slots back at their initial values (``"step"`` zeroes the steps).

        Slots are named canonically (``first_moment``) or by their torch key (``exp_avg``).

        >>> import numpy as np
        >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
        ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
        >>> s.reset(["momentum_buffer"]).slots[("momentum", ("w",))].tolist()
        [0.0, 0.0]
        """
        names = set(names)
        spec = self.spec
        by_name = {s.name: s.name for s in spec.slots} | {s.torch_key: s.name for s in spec.slots}
        unknown = [n for n in names if n not in by_name and n != "step"]
        if unknown:
            raise UnsupportedError(
                f"{spec.torch_class} has no slot {unknown[0]!r} (its slots: {', '.join(sorted(by_name))}, and step)"
            )
        zeroed = {by_name[n] for n in names if n != "step"}

        def initial(slot: str, path: ParamPath) -> float:
            s = spec.slot(slot)
            return (
                spec.with_defaults(self.param_groups[self.param(path).group])[s.initial_from]
                if s.initial_from
                else s.initial
            )

        slots = {
            (slot, path): np.full_like(a, initial(slot, path)) if slot in zeroed else a
            for (slot, path), a in self.slots.items()
        }
        params = (
            tuple(dataclasses.replace(p, step=0 if p.step is not None else None) for p in self.params)
            if "step" in names
            else self.params
        )
        return dataclasses.replace(self, slots=slots, params=params)

    def iter_tensors(self) -> Iterator[tuple[str, ParamPath, np.ndarray]]:
        """``(kind, path, array)`` for every array: slots by slot name, then weights as ``"model"``."""
        for (slot, path), array in self.slots.items():
            yield slot, path, array
        for path, array in (self.weights or {}).items():
            yield "model", path, array


def state_warnings(state: OptimizerState) -> Sequence[str]:
    """What a user should know about a state that converts: one that never stepped (the output is a fresh
    state), second moments in float16 (they overflow where bfloat16 or float32 would not).

    >>> s = OptimizerState("adam", ({},), (ParamInfo(("w",), (2,), "float16", 0),), {})
    >>> state_warnings(s)[0][:48]
    'no parameter has optimizer state: the optimizer '
    """
    found = []
    if state.params and not state.slots and not any(p.step for p in state.params):
        found.append(
            "no parameter has optimizer state: the optimizer never stepped, so there is nothing to carry "
            "over; the output is a fresh state"
        )
    half = sorted(
        path_to_name(path)
        for (slot, path), a in state.slots.items()
        if slot in NON_NEGATIVE_SLOTS and np.dtype(a.dtype) == np.float16
    )
    if half:
        found.append(
            f"{half[0]}{f' and {len(half) - 1} more' if len(half) > 1 else ''}: second moments are float16, "
            "whose largest value is 65504: squared gradients overflow to inf there where bfloat16 or float32 "
            "would not (the values are carried exactly as they are)"
        )
    return found
