"""``optstate verify``: the converted checkpoint continues as the original does, shown by running both.

The source is loaded in its framework and the converted output in the other (torch: a ``torch.optim``
optimizer over float tensors, loaded by :func:`optstate.to_torch`; Optax: the transform and state of
:func:`optstate.optax_transform` and :func:`optstate.to_optax`). Both are fed the same gradients for a few
steps: seeded random ones, or a batch's, from a function the user gives. After each step every
parameter's value, every optimizer slot and the step count are compared, in torch's layout (a Flax
layout move is reverted first), against a tolerance that follows the dtype: :data:`RTOL` for float64; for
float32 and bf16, :data:`ULPS` ulps of a slot and of a parameter's update, and half an ulp of the parameter
for each time either side rounds it (each step, :func:`param_roundings`). JAX's 64-bit mode is on while an
Optax side runs, so that Optax computes its step scalars in float64 as torch does in Python floats; arrays
keep their own dtypes.

Parameters run a chunk at a time (every optimizer of the family table updates a parameter from its own
gradient and slots alone), so a large state is verified in bounded memory: ``max_chunk_bytes``. An LR
schedule is stepped on both sides: on the Optax side it is the converted schedule; on the torch side
each group's ``lr`` is set before each step as torch's scheduler sets it
(:func:`optstate.converters.schedules.torch_schedulers.group_lrs`: torch's own ``step()`` replayed from
the saved scheduler state).

This module imports NumPy only; a side's framework is imported when that side runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import api
from .converters import OPTAX, TORCH, Framework, adapter, call_user_function, formats
from .converters.layout.moves import Layout, problem_list, revert_layout
from .converters.schedules.torch_schedulers import group_lrs, last_epoch
from .errors import MappingError, OptstateError, UnsupportedError
from .schema.families import OptimizerSpec, is_decoupled
from .schema.state import OptimizerState, ParamInfo, ParamPath, allowing_nonfinite, numpy_dtype, path_to_name

# The framework a format's checkpoint is run in; the canonical file (not here) runs in the framework the
# other side does not, so that a conversion is checked across frameworks.
FRAMEWORK_OF_FORMAT = {
    "torch": "torch",
    "dcp": "torch",
    "hf-trainer": "torch",
    "accelerate": "torch",
    "deepspeed": "torch",
    "lightning": "torch",
    "optax": "optax",
    "nnx": "optax",
    "train-state": "optax",
}
_FRAMEWORKS: Mapping[str, Framework] = {"torch": TORCH, "optax": OPTAX}

# Relative tolerance by dtype: float64 to 1e-12 of the array's largest value (the exactness optstate
# promises); lower precisions a few ulps, of the update for a parameter (see _tolerance).
ULPS = 4
RTOL = {"float64": 1e-12}
DEFAULT_MAX_CHUNK_BYTES = 1 << 30

Gradients = Callable[[Mapping[str, np.ndarray], int], Mapping[str, Any]]


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ParamCheck:
    """One parameter's comparison over every step: the worst of its value, its slots and its step count.

    ``worst`` is what differed most against its tolerance (``"param"``, a slot's torch key such as
    ``"exp_avg"``, or ``"step"``), at step ``worst_step`` (1 is the first step taken), by ``difference``
    (the largest absolute difference of any element) against ``tolerance``. ``first_step_off`` is the
    first step at which anything of this parameter was beyond its tolerance; ``None`` when it agrees.

    >>> ParamCheck("fc.weight", "float64", "exp_avg", 2, 0.0, 1e-13, None).agrees
    True
    """

    name: str
    dtype: str
    worst: str
    worst_step: int
    difference: float
    tolerance: float
    first_step_off: int | None

    @property
    def agrees(self) -> bool:
        return self.first_step_off is None

    @property
    def ratio(self) -> float:
        """The difference in tolerances (above 1: disagrees); infinite for a difference where none is allowed."""
        if self.difference == 0:
            return 0.0
        return self.difference / self.tolerance if self.tolerance > 0 else math.inf

    def describe(self) -> str:
        """One line for people.

        >>> ParamCheck("w", "float32", "exp_avg", 1, 0.5, 1e-7, 1).describe()
        'w: exp_avg differs by 5e-01 at step 1 (tolerance 1e-07, float32)'
        """
        verb = "differs by" if not self.agrees else "within tolerance, largest difference"
        first = (
            f", off from step {self.first_step_off}"
            if self.first_step_off is not None and self.first_step_off < self.worst_step
            else ""
        )
        return (
            f"{self.name}: {self.worst} {verb} {self.difference:.0e} at step {self.worst_step} "
            f"(tolerance {self.tolerance:.0e}, {self.dtype}{first})"
        )


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found: one :class:`ParamCheck` per parameter, worst first. True when every
    parameter agrees (``bool(report)``, ``report.agrees``).

    >>> r = VerifyReport("a.pt", "torch", "b/", "optax", "AdamW", 3, 0, "random",
    ...                  (ParamCheck("w", "float64", "exp_avg", 1, 0.0, 1e-12, None),))
    >>> bool(r), r.summary()
    (True, 'agrees: 1 parameter(s) of AdamW, their values and every slot, after each of 3 steps')
    """

    src: str
    src_framework: str
    dst: str
    dst_framework: str
    optimizer: str
    steps: int
    seed: int
    gradients: str  # "random" or the module:function that gave them
    params: tuple[ParamCheck, ...]
    notes: tuple[str, ...] = ()  # why a tolerance is what it is, where a family needs saying (rounding_notes)

    @property
    def agrees(self) -> bool:
        return all(p.agrees for p in self.params)

    def __bool__(self) -> bool:
        return self.agrees

    @property
    def disagreeing(self) -> tuple[ParamCheck, ...]:
        """The parameters beyond tolerance, worst first."""
        return tuple(p for p in self.params if not p.agrees)

    def summary(self) -> str:
        """One line: agrees, or how many parameters do not and the worst of them."""
        if self.agrees:
            return (
                f"agrees: {len(self.params)} parameter(s) of {self.optimizer}, their values and every slot, "
                f"after each of {self.steps} steps"
            )
        off = self.disagreeing
        return f"DISAGREES: {len(off)} of {len(self.params)} parameter(s), worst {off[0].describe()}"

    def format(self, limit: int = 10) -> str:
        """The report as people read it: what ran against what, the verdict, the worst parameters.

        >>> print(VerifyReport("a.pt", "torch", "b/", "optax", "SGD", 2, 0, "random", ()).format())
        a.pt (torch) against b/ (optax): SGD, 2 steps of random gradients (seed 0)
        agrees: 0 parameter(s) of SGD, their values and every slot, after each of 2 steps
        """
        gradients = f"random gradients (seed {self.seed})" if self.gradients == "random" else self.gradients
        lines = [
            f"{self.src} ({self.src_framework}) against {self.dst} ({self.dst_framework}): "
            f"{self.optimizer}, {self.steps} steps of {gradients}",
            self.summary(),
        ]
        shown = self.disagreeing or self.params[:3]  # agreeing: the closest calls only
        lines += [f"  {p.describe()}" for p in shown[:limit]]
        if len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_json(self) -> str:
        """The report for programs: its fields, ``agrees``, and each parameter's with its own ``agrees``."""
        document = dataclasses.asdict(self)
        document["agrees"] = self.agrees
        for entry, check in zip(document["params"], self.params, strict=True):
            entry["agrees"] = check.agrees
        return json.dumps(document, indent=1)


# ----------------------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class _Side:
    """One checkpoint to run: its path, format, the framework it runs in, its state as read, and the layout
    moves applied to it (``None``: torch's layout)."""

    path: str
    format: str
    framework: str
    state: OptimizerState
    layout: Layout | None

    def in_torch_layout(self, state: OptimizerState | None = None) -> OptimizerState:
        """``state`` (default: this side's, as read) in torch's layout: the side's layout move reverted."""
        state = self.state if state is None else state
        return state if self.layout is None else revert_layout(state, self.layout)

    def native(self, arrays: Mapping[ParamPath, Any]) -> dict[ParamPath, Any]:
        """Arrays by torch path, moved to where this side keeps them (Flax's layout: split, transposed)."""
        if self.layout is None:
            return dict(arrays)
        moved: dict[ParamPath, Any] = {}
        for path, array in arrays.items():
            moves = self.layout.moves_of(path)
            moved.update({m.target: m.apply(array) for m in moves} if moves else {path: array})
        return moved

    def native_paths(self, paths: Sequence[ParamPath]) -> set[ParamPath]:
        """Where this side keeps the parameters at these torch paths (a packed one in several pieces)."""
        if self.layout is None:
            return set(paths)
        moves = {p: self.layout.moves_of(p) for p in paths}
        return {m.target for p in paths for m in moves[p]} | {p for p in paths if not moves[p]}


def _framework_of(fmt: str, other: str | None, state: OptimizerState) -> str:
    """The framework a checkpoint of format ``fmt`` runs in; the canonical file runs in the one the other
    side does not (Optax for a family torch lacks)."""
    if fmt in FRAMEWORK_OF_FORMAT:
        return FRAMEWORK_OF_FORMAT[fmt]
    if not state.spec.in_torch:
        return "optax"  # one of Optax's own (Lion, LAMB): torch.optim has no counterpart to run it
    return "torch" if other in (None, "optax") else "optax"


def _require(framework: str, path: str) -> None:
    """Import a side's framework, or one error naming the pip extra that installs it."""
    _FRAMEWORKS[framework].require(f"verifying {path} (run in {framework})")


def _side(path: str, fmt: str, state: OptimizerState, framework: str, given: Layout | None) -> _Side:
    """A side, in Flax's layout where its state records the move, or where its parameters are where the
    move ``given`` (the conversion's ``--target-params``/``--mapping``) puts them."""
    if state.metadata.layout is not None:
        return _Side(path, fmt, framework, state, Layout.from_json(state.metadata.layout))
    return _Side(path, fmt, framework, state, given if given is not None and _in_flax_layout(state, given) else None)


def _in_flax_layout(state: OptimizerState, layout: Layout) -> bool:
    """Whether ``state``'s parameters sit where ``layout``'s moves put torch's (a Flax checkpoint of its own)."""
    paths = {p.path for p in state.params}
    targets = {m.target for m in layout.moves}
    return bool(paths & targets) and not paths & ({m.source for m in layout.moves} - targets)


def _under_names_of(state: OptimizerState, reference: OptimizerState) -> OptimizerState:
    """``state`` under ``reference``'s parameter names where one attribute prefix added to (or taken off) every
    name makes them agree: a trainer's output names a LightningModule's ``net.fc1.weight``, the JAX run
    ``fc1.weight``. Unchanged otherwise (the names are then compared as they are)."""
    from .converters.torch.target import TargetModel, in_model_names

    names = tuple(path_to_name(p.path) for p in reference.params)
    return in_model_names(state, TargetModel(names, names, {}))


def _conversion_layout(state: OptimizerState, target_params: Any, mapping: str | None) -> Layout | None:
    """The layout move a conversion of ``state`` made with ``--target-params`` or ``--mapping``, as it made it."""
    if mapping is not None:
        return Layout.read(mapping)
    if target_params is None:
        return None
    from .converters.layout.targets import plan

    layout, problems = plan(state, target_params)
    if problems:
        raise MappingError(problem_list(problems))
    return layout


# ----------------------------------------------------------------------------- running a side


class TorchRun:
    """A side run in torch: its optimizer over the chunk's parameters, and the LR its scheduler sets."""

    def __init__(self, state: OptimizerState, params: Mapping[ParamPath, np.ndarray]) -> None:
        self.live = adapter("torch")
        self.optimizer, self.tensors = self.live.live_optimizer(state, params)
        self.groups = [gi for gi in range(len(state.param_groups)) if state.group_params(gi)]
        self.scheduler = state.metadata.lr_scheduler
        self.param_groups = state.param_groups
        self.count = 0 if self.scheduler is None else last_epoch(self.scheduler)
        self._set_lrs()

    def _set_lrs(self) -> None:
        """Each group's ``lr`` as torch's scheduler leaves it after ``count`` steps."""
        if self.scheduler is None:
            return
        lrs = group_lrs(self.scheduler, self.count, param_groups=self.param_groups)
        for group, gi in zip(self.optimizer.param_groups, self.groups, strict=True):
            group["lr"] = lrs[gi]

    def step(self, grads: Mapping[ParamPath, Any]) -> None:
        self.live.step_live(self.optimizer, self.tensors, grads)
        self.count += 1
        self._set_lrs()

    def snapshot(self) -> OptimizerState:
        """The optimizer's state now, with the parameters' values as the weights."""
        state = self.live.from_torch(self.optimizer)
        weights = {path: self.live.tensor_to_numpy(t) for path, t in self.tensors.items()}
        return dataclasses.replace(state, weights=weights, buffers=())


class OptaxRun:
    """A side run in Optax: ``tx`` and its state stepped with ``tx.update`` and ``optax.apply_updates``;
    read back into the canonical form with the family and param groups (torch's, with their ``params``)."""

    def __init__(
        self,
        tx: Any,
        opt_state: Any,
        params: Any,
        family: str,
        hyperparams: Sequence[Mapping[str, Any]],
        approximate: bool = False,
    ) -> None:
        import jax  # the side runs in Optax: _require checked it is there
        import optax

        def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self.adapter = adapter("optax")
        # Compiled once: op by op, JAX compiles each operation for each shape (seconds for a small GPT).
        self.update = jax.jit(update)
        self.tx, self.opt_state, self.params = tx, opt_state, params
        self.family, self.hyperparams, self.approximate = family, hyperparams, approximate
        # Under x64 a float64 scalar meeting a float32 array widens it: the side would then run in float64
        # and agree with torch's float32 for the wrong reason. Every array must keep the dtype it came in.
        self.dtypes = leaf_dtypes((params, opt_state))

    @classmethod
    def from_state(cls, state: OptimizerState, params: Mapping[ParamPath, np.ndarray]) -> OptaxRun:
        """:func:`optstate.optax_transform` of the chunk's state, its state filled by :func:`optstate.to_optax`."""
        optax_adapter = adapter("optax")
        tx = optax_adapter.optax_transform(state)
        tree = optax_adapter.nest({p.path: optax_adapter.to_jax(np.asarray(params[p.path])) for p in state.params})
        return cls(
            tx,
            optax_adapter.to_optax(state, tx, tree),
            tree,
            state.optimizer,
            torch_param_groups(state),
            approximate=state.metadata.approximate is not None,
        )

    def step(self, grads: Mapping[ParamPath, Any]) -> None:
        grad_tree = self.adapter.nest({path: self.adapter.to_jax(np.asarray(g)) for path, g in grads.items()})
        check_dtypes_kept("the gradient at", leaf_dtypes(self.params), grad_tree)
        self.params, self.opt_state = self.update(grad_tree, self.opt_state, self.params)
        check_dtypes_kept("after a step, the Optax state's", self.dtypes, (self.params, self.opt_state))

    def snapshot(self) -> OptimizerState:
        """The Optax state now, read back into the canonical form, the parameters' values as the weights."""
        state: OptimizerState = self.adapter.from_optax(
            self.opt_state,
            self.params,
            optimizer=self.family,
            hyperparams=self.hyperparams,
            allow_approximate=self.approximate,
        )
        return state


def leaf_dtypes(tree: Any) -> dict[str, np.dtype]:
    """Each array leaf's dtype, by its path in the tree.

    >>> import jax  # the tree is JAX's
    >>> leaf_dtypes({"fc": {"w": np.zeros(2, np.float32)}, "n": None})
    {"['fc']['w']": dtype('float32')}
    """
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(kp): np.dtype(leaf.dtype) for kp, leaf in leaves if hasattr(leaf, "dtype")}


def check_dtypes_kept(what: str, expected: Mapping[str, np.dtype], tree: Any) -> None:
    """Refuse a tree whose arrays are not in the ``expected`` dtypes (by path): a float32 run widened to
    float64 would compare float64 arithmetic with torch's float32.

    >>> import jax  # the tree is JAX's
    >>> check_dtypes_kept("the gradient at", {"['w']": np.dtype("float32")}, {"w": np.zeros(2)})
    Traceback (most recent call last):
    optstate.errors.OptstateError: verify: the gradient at ['w'] is float64, expected float32: the Optax side ...
    """
    for path, dtype in leaf_dtypes(tree).items():
        if path in expected and dtype != expected[path]:
            raise OptstateError(
                f"verify: {what} {path} is {dtype}, expected {expected[path]}: the Optax side would not run in "
                "the checkpoint's precision"
            )


def torch_param_groups(state: OptimizerState) -> list[dict[str, Any]]:
    """The state's param groups as torch lists them, each with the names of its parameters (``params``).

    >>> from optstate.schema import ParamInfo
    >>> torch_param_groups(OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("fc", "w"), (2,), "float32", 0),), {}))
    [{'lr': 0.1, 'params': ['fc.w']}]
    """
    return [
        dict(hp, params=[path_to_name(p.path) for p in state.group_params(gi)])
        for gi, hp in enumerate(state.param_groups)
    ]


_RUNNERS: Mapping[str, Callable[[OptimizerState, Mapping[ParamPath, np.ndarray]], Any]] = {
    "torch": TorchRun,
    "optax": OptaxRun.from_state,
}


def _x64(sides: Sequence[_Side]) -> AbstractContextManager[Any]:
    """JAX's 64-bit mode while an Optax side runs, for this thread and this run only (the caller's setting,
    global or its own ``jax.enable_x64``, is as it was afterwards, even on an error).

    Always, not only for 64-bit arrays: torch computes the step's scalars (Adam's bias corrections, RAdam's
    rectification, NAdam's momentum schedule) as Python floats, and Optax computes them in the dtype JAX
    gives a Python float, float32 with x64 off, which differs from torch's by about an ulp of the update
    each step. Arrays keep their own dtype (a float32 state stays float32: :meth:`OptaxRun.step` checks it).

    >>> import jax
    >>> before = jax.numpy.zeros(1).dtype
    >>> with _x64([_Side("s", "optax", "optax", None, None)]):  # type: ignore[arg-type]
    ...     jax.numpy.zeros(1).dtype.name
    'float64'
    >>> jax.numpy.zeros(1).dtype == before  # as the caller had it
    True
    """
    if not any(side.framework == "optax" for side in sides):
        return nullcontext()
    import jax

    return jax.enable_x64(True)


# ----------------------------------------------------------------------------- comparing


def _tolerance(
    what: str,
    dtype: np.dtype,
    ref: np.ndarray,
    other: np.ndarray,
    initial: np.ndarray | None,
    roundings: float = 0.0,
) -> float:
    """How far ``other`` may be from ``ref``: float64, 1e-12 of the largest value; lower precisions,
    :data:`ULPS` ulps of the largest value of a slot, and of a parameter's update so far plus half an ulp of
    the parameter for each time either side has rounded it (``roundings``, at least one: see
    :func:`param_roundings`).

    >>> w0, w = np.ones(2, np.float32), np.full(2, 1.5, np.float32)
    >>> eps = float(np.finfo(np.float32).eps)
    >>> _tolerance("param", np.dtype("float32"), w, w, w0, roundings=6) == ULPS * eps * 0.5 + 3 * eps * 1.5
    True
    """
    scale = max(float(np.max(np.abs(ref), initial=0.0)), float(np.max(np.abs(other), initial=0.0)))
    name = np.dtype(dtype).name
    if name in RTOL:
        return RTOL[name] * scale
    eps = float(np.finfo(dtype).eps)
    if what != "param" or initial is None:
        return ULPS * eps * scale
    update = float(np.max(np.abs(ref - initial), initial=0.0))
    return ULPS * eps * update + 0.5 * eps * scale * max(roundings, 1.0)


# Why torch rounds a parameter more than once in a step, where it does; Optax rounds it once
# (optax.apply_updates adds the whole update). A table of (applies to a group, reason).
_EXTRA_TORCH_ROUNDINGS: tuple[tuple[Callable[[OptimizerSpec, Mapping[str, Any]], bool], str], ...] = (
    (lambda spec, hp: spec.name == "nadam", "NAdam adds its gradient term and its momentum term one at a time"),
    (
        lambda spec, hp: is_decoupled(spec, hp) and bool(hp.get("weight_decay")),
        "decoupled weight decay multiplies the parameter by 1 - lr * weight_decay first",
    ),
)


def torch_extra_roundings(spec: OptimizerSpec, hyperparams: Mapping[str, Any]) -> tuple[str, ...]:
    """Why ``torch.optim`` rounds a parameter of a group with these hyperparameters more than once a step:
    one reason per extra rounding (each in-place operation on the parameter rounds it).

    >>> from optstate.schema.families import optimizer_spec
    >>> torch_extra_roundings(optimizer_spec("adamw"), {"weight_decay": 0.01})
    ('decoupled weight decay multiplies the parameter by 1 - lr * weight_decay first',)
    >>> torch_extra_roundings(optimizer_spec("adam"), {"weight_decay": 0.01})  # coupled: added to the gradient
    ()
    """
    return tuple(reason for applies, reason in _EXTRA_TORCH_ROUNDINGS if applies(spec, hyperparams))


def param_roundings(state: OptimizerState, frameworks: Sequence[str]) -> dict[ParamPath, int]:
    """How many times the two sides, run in ``frameworks``, round each parameter in one step together.

    Each rounding of a float32 (or bf16) parameter may land it on a neighbouring value of the other side's:
    where the updates differ by an ulp of themselves, the sums do by up to half an ulp of the parameter per
    rounding, and the difference is carried to the next step. Over a run, those half-ulps add up (the
    tolerance grows with the steps); and where torch rounds twice (:func:`torch_extra_roundings`), its
    first rounding is one Optax never makes.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("nadam", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0),), {})
    >>> param_roundings(s, ("torch", "optax")), param_roundings(s, ("optax", "optax"))
    ({('w',): 3}, {('w',): 2})
    """
    out = {}
    for info in state.params:
        hyperparams = state.spec.with_defaults(state.param_groups[info.group])
        extra = len(torch_extra_roundings(state.spec, hyperparams))
        out[info.path] = sum(1 + (extra if framework == "torch" else 0) for framework in frameworks)
    return out


def rounding_notes(state: OptimizerState, frameworks: Sequence[str]) -> tuple[str, ...]:
    """What the report says where torch rounds a parameter more than Optax does in a step, so that its
    parameters' tolerance grows faster (lower precisions only: float64's 1e-12 is far above a rounding).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("nadam", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0),), {})
    >>> print(rounding_notes(s, ("torch", "optax"))[0])  # doctest: +NORMALIZE_WHITESPACE
    NAdam, float32: torch rounds a parameter 2 times a step (NAdam adds its gradient term and its momentum
    term one at a time), Optax once; the parameters' tolerance allows half an ulp of the parameter for each
    rounding, on either side, at each step
    """
    if set(frameworks) != {"torch", "optax"}:
        return ()
    notes = {}
    for info in state.params:
        if numpy_dtype(info.dtype).name in RTOL:
            continue
        reasons = torch_extra_roundings(state.spec, state.spec.with_defaults(state.param_groups[info.group]))
        if reasons:
            notes[(info.dtype, reasons)] = (
                f"{state.spec.torch_class}, {info.dtype}: torch rounds a parameter {1 + len(reasons)} times a step "
                f"({'; '.join(reasons)}), Optax once; the parameters' tolerance allows half an ulp of the parameter "
                "for each rounding, on either side, at each step"
            )
    return tuple(notes.values())


@dataclass
class Tally:
    """One parameter's worst comparison so far, and the first step it was off."""

    name: str
    dtype: str
    worst: tuple[float, str, int, float, float] = (-1.0, "param", 0, 0.0, 0.0)  # ratio, what, step, diff, tol
    first_step_off: int | None = None

    def add(self, what: str, step: int, difference: float, tolerance: float) -> None:
        ratio = 0.0 if difference == 0 else (difference / tolerance if tolerance > 0 else math.inf)
        if ratio > 1 and self.first_step_off is None:
            self.first_step_off = step
        if ratio > self.worst[0]:
            self.worst = (ratio, what, step, difference, tolerance)

    def check(self) -> ParamCheck:
        _, what, step, difference, tolerance = self.worst
        return ParamCheck(self.name, self.dtype, what, step, difference, tolerance, self.first_step_off)


def worst_first(tallies: Mapping[ParamPath, Tally]) -> tuple[ParamCheck, ...]:
    """Each parameter's check, those that disagree first, then by how close they came to their tolerance."""
    return tuple(sorted((t.check() for t in tallies.values()), key=lambda c: (c.agrees, -c.ratio, -c.difference)))


def _as_float(array: Any) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def compare_states(
    ref: OptimizerState,
    other: OptimizerState,
    step: int,
    tallies: Mapping[ParamPath, Tally],
    initial: Mapping[ParamPath, np.ndarray],
    roundings: Mapping[ParamPath, int] | None = None,
) -> None:
    """Add to each parameter's tally how ``other`` differs from ``ref`` after ``step``: its value (the
    states' weights), every slot either holds, and its step count where both keep one. ``roundings``: how
    many times the two sides round each parameter a step together (:func:`param_roundings`; two if not
    given, one each)."""
    spec = ref.spec
    for path, tally in tallies.items():
        dtype = numpy_dtype(ref.param(path).dtype)
        a, b = _as_float(ref.weights[path]), _as_float(other.weights[path])  # type: ignore[index]
        first = initial.get(path)
        rounded = step * (2 if roundings is None else roundings[path])
        tally.add("param", step, _max_difference(a, b), _tolerance("param", dtype, a, b, first, rounded))
        for slot in spec.slots:
            mine, theirs = ref.slots.get((slot.name, path)), other.slots.get((slot.name, path))
            if mine is None and theirs is None:
                continue
            if mine is None or theirs is None:
                tally.add(slot.torch_key, step, math.inf, 0.0)  # kept on one side only
                continue
            a, b = _as_float(mine), _as_float(theirs)
            slot_dtype = np.asarray(mine).dtype
            tally.add(slot.torch_key, step, _max_difference(a, b), _tolerance(slot.name, slot_dtype, a, b, None))
        steps = (ref.param(path).step, other.param(path).step)
        if None not in steps and spec.has_step:
            tally.add("step", step, float(abs(steps[0] - steps[1])), 0.0)  # type: ignore[operator]


def _max_difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if not a.size:
        return 0.0
    difference = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)  # a diverged run diverges alike on both sides
    return float(np.max(np.where(both_nan, 0.0, np.nan_to_num(difference, nan=np.inf))))


# ----------------------------------------------------------------------------- gradients


def random_gradients(seed: int, step: int, params: Sequence[ParamInfo]) -> dict[ParamPath, np.ndarray]:
    """Standard normal gradients for each parameter at ``step``, in its dtype, the same whatever else is run
    with it (seeded by the seed, the step and the parameter's name).

    >>> from optstate.schema import ParamInfo
    >>> w = [ParamInfo(("w",), (2,), "float32", 0)]
    >>> a, b = random_gradients(0, 1, w)[("w",)], random_gradients(0, 1, w)[("w",)]
    >>> a.dtype, np.array_equal(a, b), np.array_equal(a, random_gradients(0, 2, w)[("w",)])
    (dtype('float32'), True, False)
    """
    grads = {}
    for info in params:
        rng = np.random.default_rng([seed, step, zlib.crc32(path_to_name(info.path).encode())])
        grads[info.path] = rng.standard_normal(info.shape).astype(numpy_dtype(info.dtype))
    return grads


def _user_gradients(model_data: str | Gradients) -> Gradients:
    """The gradients function a ``module:function`` returns (the user's own code), or the function itself."""
    if callable(model_data):
        return model_data
    function = call_user_function(model_data)
    if not callable(function):
        raise OptstateError(
            f"{model_data} returned {type(function).__name__}; it must return a function "
            "gradients(params, step) giving each parameter's gradient by name"
        )
    gradients: Gradients = function
    return gradients


def _batch_gradients(
    gradients: Gradients, params: Mapping[ParamPath, np.ndarray], step: int, infos: Sequence[ParamInfo]
) -> dict[ParamPath, np.ndarray]:
    """The user's gradients at ``params`` (torch names and layout), each checked against its parameter."""
    given = gradients({path_to_name(p): np.asarray(a) for p, a in params.items()}, step)
    grads = {}
    for info in infos:
        name = path_to_name(info.path)
        if name not in given:
            raise MappingError(f"the gradients function gave no gradient for {name} at step {step}")
        grad = np.asarray(given[name])
        if tuple(grad.shape) != info.shape:
            raise MappingError(
                f"{name}: the gradients function gave shape {list(grad.shape)}, expected {list(info.shape)}"
            )
        grads[info.path] = grad.astype(numpy_dtype(info.dtype))
    return grads


# ----------------------------------------------------------------------------- verify


def _check_same_parameters(src: OptimizerState, dst: OptimizerState, names: tuple[str, str]) -> None:
    """Refuse two states that are not of one optimizer over the same parameters (in torch's layout)."""
    if src.optimizer != dst.optimizer:
        raise UnsupportedError(f"{names[0]} holds {src.spec.torch_class}'s state, {names[1]} {dst.spec.torch_class}'s")
    mine, theirs = {p.path: p for p in src.params}, {p.path: p for p in dst.params}
    only = sorted(set(mine) ^ set(theirs))
    if only:
        here, there = (names, (mine, theirs)) if only[0] in mine else (names[::-1], (theirs, mine))
        others = sorted(path_to_name(p) for p in set(there[1]) - set(there[0]))
        raise MappingError(
            f"{path_to_name(only[0])} is tracked in {here[0]} only"
            + (f" (and {len(only) - 1} more parameters differ)" if len(only) > 1 else "")
            + (f"; {here[1]} has {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" if others else "")
            + ": where the conversion moved them to another model's names, pass the --target-params or "
            "--mapping it was made with"
        )
    for path, info in mine.items():
        if (info.shape, info.dtype) != (theirs[path].shape, theirs[path].dtype):
            raise MappingError(
                f"{path_to_name(path)}: {names[0]} has {list(info.shape)} {info.dtype}, "
                f"{names[1]} {list(theirs[path].shape)} {theirs[path].dtype}"
            )


def _nbytes(info: ParamInfo) -> int:
    return math.prod(info.shape) * numpy_dtype(info.dtype).itemsize


def _chunks(state: OptimizerState, max_bytes: int) -> Iterator[tuple[ParamInfo, ...]]:
    """The parameters in runs of at most ``max_bytes`` (each parameter's value and slots, on both sides,
    live and compared); a parameter larger than that alone."""
    chunk: list[ParamInfo] = []
    size = 0
    for info in state.params:
        slots = len(state.spec.active_slots(state.param_groups[info.group])) + 1
        nbytes = 4 * slots * _nbytes(info)
        if chunk and size + nbytes > max_bytes:
            yield tuple(chunk)
            chunk, size = [], 0
        chunk.append(info)
        size += nbytes
    if chunk:
        yield tuple(chunk)


def _restricted(state: OptimizerState, paths: set[ParamPath]) -> OptimizerState:
    """The state of these parameters only, without model weights (every param group kept, for the schedule)."""
    return dataclasses.replace(
        state,
        params=tuple(p for p in state.params if p.path in paths),
        slots={key: a for key, a in state.slots.items() if key[1] in paths},
        weights=None,
        buffers=(),
    )


def _initial_params(
    sides: Sequence[_Side], views: Sequence[OptimizerState], seed: int, infos: Sequence[ParamInfo]
) -> list[dict[ParamPath, np.ndarray]]:
    """Each side's starting parameters in torch's layout: its own weights; the other side's where it holds
    none; seeded random ones where neither does."""
    shared = random_gradients(seed, 0, infos)  # step 0 is no step: these are parameters
    out = []
    for i, view in enumerate(views):
        other = views[1 - i]
        start = {}
        for info in infos:
            for weights in (view.weights, other.weights):
                if weights is not None and info.path in weights:
                    start[info.path] = np.array(weights[info.path])
                    break
            else:
                start[info.path] = shared[info.path]
        out.append(start)
    return out


def verify(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    steps: int = 3,
    seed: int = 0,
    model_data: str | Gradients | None = None,
    target_params: Any = None,
    mapping: str | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    **read_options: Any,
) -> VerifyReport:
    """Run ``src`` in its framework and its conversion ``dst`` in the other for ``steps`` steps of the same
    gradients, and compare them after each step: every parameter's value, every optimizer slot and the step
    count. Returns a :class:`VerifyReport`, true when everything agrees.

    Gradients are seeded random ones (``seed``), or a batch's: ``model_data`` is a ``module:function``
    (or the function it returns) giving ``gradients(params, step)``: each parameter's gradient by torch
    name, at those parameters (``{name: array}``, torch's layout). ``read_options`` are the reading
    options of both checkpoints (``optimizer=``, ``hyperparams=``, ``model=``, ...: see
    :class:`optstate.converters.formats.ReadOptions`). ``target_params`` and ``mapping`` are those the
    conversion was made with, for a Flax checkpoint in names and a layout of its own (``Dense_0/kernel``)
    converted to a torch model's. Parameters run ``max_chunk_bytes`` at a time.
    ``progress(total_bytes, total_count)``, once both are read, returns a callback called with each
    parameter's byte count as it finishes a step (``steps`` calls per parameter). Torch to torch and Optax to Optax run
    both in the one framework.

    >>> import tempfile, torch, optstate
    >>> d = tempfile.mkdtemp(); net = torch.nn.Linear(2, 1).double()
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 2, dtype=torch.float64)).sum().backward(); opt.step()
    >>> torch.save({"optimizer": opt.state_dict(), "model": net.state_dict()}, f"{d}/c.pt")
    >>> _ = optstate.convert(f"{d}/c.pt", f"{d}/s.safetensors")
    >>> report = optstate.verify(f"{d}/c.pt", f"{d}/s.safetensors")
    >>> bool(report), report.dst_framework, [p.name for p in report.params]
    (True, 'optax', ['weight', 'bias'])
    """
    if steps < 1:
        raise OptstateError(f"verify needs at least one step, got {steps}")
    src, dst = os.fspath(src), os.fspath(dst)
    src_format = src_format or formats.detect(src)
    dst_format = dst_format or formats.detect(dst)
    gradients = None if model_data is None else _user_gradients(model_data)
    src_state = api.read(src, src_format, **read_options)
    src_framework = _framework_of(src_format, FRAMEWORK_OF_FORMAT.get(dst_format), src_state)
    _require(src_framework, src)
    dst_state = api.read(dst, dst_format, **read_options)
    dst_framework = _framework_of(dst_format, src_framework, dst_state)
    _require(dst_framework, dst)
    src_state, dst_state = (_schedule_horizon(state, steps) for state in (src_state, dst_state))
    given = _conversion_layout(src_state, target_params, mapping)
    if given is None:
        dst_state = _under_names_of(dst_state, src_state)
    sides = (
        _side(src, src_format, src_state, src_framework, given),
        _side(dst, dst_format, dst_state, dst_framework, given),
    )
    views = [side.in_torch_layout() for side in sides]
    _check_same_parameters(views[0], views[1], (src, dst))
    tallies = {p.path: Tally(path_to_name(p.path), p.dtype) for p in views[0].params}
    frameworks = [side.framework for side in sides]
    roundings = param_roundings(views[0], frameworks)
    chunks = [views[0].params] if gradients is not None else list(_chunks(views[0], max_chunk_bytes))
    tick = None
    if progress is not None:
        tick = progress(steps * sum(_nbytes(p) for p in views[0].params), steps * len(views[0].params))
    # A diverged run converted on purpose keeps its NaN (or negative moments) while it runs, too.
    with _x64(sides), allowing_nonfinite(read_options.get("allow_nonfinite", False)):
        for infos in chunks:
            _verify_chunk(sides, views, infos, steps, seed, gradients, tallies, roundings, tick)
    return VerifyReport(
        src,
        src_framework,
        dst,
        dst_framework,
        views[0].spec.torch_class,
        steps,
        seed,
        "random" if model_data is None else (model_data if isinstance(model_data, str) else "gradients function"),
        worst_first(tallies),
        rounding_notes(views[0], frameworks),
    )


def _schedule_horizon(state: OptimizerState, steps: int) -> OptimizerState:
    """``state`` with an LR schedule's horizon where it records none: the ``steps`` steps verify runs.

    A schedule that never settles is a table in Optax that needs an end (``convert --horizon``); a canonical
    file may keep the torch scheduler without one, and verify runs only a few steps past it.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("adam", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float64", 0, 5),), {})
    >>> _schedule_horizon(s.with_metadata(lr_scheduler={"last_epoch": 5}), 3).metadata.lr_horizon
    8
    >>> _schedule_horizon(s, 3).metadata.lr_horizon is None  # no scheduler: nothing to end
    True
    """
    scheduler = state.metadata.lr_scheduler
    if scheduler is None or state.metadata.lr_horizon is not None:
        return state
    return state.with_metadata(lr_horizon=last_epoch(scheduler) + steps)


def _verify_chunk(
    sides: Sequence[_Side],
    views: Sequence[OptimizerState],
    infos: Sequence[ParamInfo],
    steps: int,
    seed: int,
    gradients: Gradients | None,
    tallies: Mapping[ParamPath, Tally],
    roundings: Mapping[ParamPath, int],
    progress: Callable[[int], None] | None,
) -> None:
    """Run one chunk of parameters on both sides for ``steps`` steps, comparing after each."""
    paths = [info.path for info in infos]
    starts = _initial_params(sides, views, seed, infos)
    runs = [
        _RUNNERS[side.framework](_restricted(side.state, side.native_paths(paths)), side.native(start))
        for side, start in zip(sides, starts, strict=True)
    ]
    chunk_tallies = {path: tallies[path] for path in paths}
    current = starts[0]
    for step in range(1, steps + 1):
        if gradients is None:
            grads = random_gradients(seed, step, infos)
        else:
            grads = _batch_gradients(gradients, current, step, infos)
        for side, run in zip(sides, runs, strict=True):
            run.step(side.native(grads))
        ref, other = (side.in_torch_layout(run.snapshot()) for side, run in zip(sides, runs, strict=True))
        compare_states(ref, other, step, chunk_tallies, starts[0], roundings)
        current = {path: np.asarray(ref.weights[path]) for path in paths}  # type: ignore[index]
        if progress is not None:
            for info in infos:
                progress(_nbytes(info))
