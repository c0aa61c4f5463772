"""Flax's own checkpoint trees in Orbax directories: NNX's ``{'model': ..., 'optimizer': ...}`` and a
linen ``TrainState``, written so that the Flax docs' restore code reads them back.

The NNX tree is the one ``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`` saves, made by
NNX itself (an abstract ``nnx.Optimizer`` over a model of the state's parameters, filled by path), so that

    abstract = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}   # or of nnx.eval_shape(...)
    restored = ocp.StandardCheckpointer().restore(path, abstract)
    nnx.update(model, restored["model"]); nnx.update(optimizer, restored["optimizer"])

restores it, for an ``optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)`` whose ``tx`` is
``optstate.optax_transform(state)``: the stock Optax alias where stock Optax is torch's formula (``optax.adamw``
for AdamW, whose state has the same tree), optstate's torch-exact transform where it is not (NAdam, RAdam,
AMSGrad, ...), as for the ``optax`` format. The linen tree is a ``TrainState``'s (``step``, ``params``,
``opt_state``), restorable into an abstract ``TrainState.create(apply_fn=..., params=..., tx=tx)``.

Both keep ``optstate.json`` beside the tree, so that reading them back needs no ``--optimizer``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...errors import FormatError, UnsupportedError
from ...schema.state import Deferred, OptimizerState, ParamPath, path_to_name
from ..formats import WriteOptions
from ..schedules.torch_schedulers import last_epoch
from .optax import fill_state, key_path_to_path, nest, param_shapes, template
from .orbax import BATCH_STATS, save_tree

VALUE = "value"  # the field NNX saves each Variable's array under


def _leaf(array: Any) -> Any:
    """A leaf for Orbax: lazy arrays stay lazy (the writer makes them in turn), others are NumPy arrays."""
    return array if isinstance(array, Deferred) else np.asarray(array)


def recorded_step(state: OptimizerState, where: str = "the state") -> int | None:
    """The optimizer step ``state`` records: its stepped parameters' common step (0 where a family that
    counts steps has none stepped yet), else, for a family that keeps no count (SGD), its LR scheduler's, as
    the Optax schedule counts it (:mod:`.optax` takes it as one scheduler step per optimizer step, and says
    so); ``None`` where nothing records it. Parameters at different steps have no one count: refused.

    >>> from optstate.schema import ParamInfo
    >>> recorded_step(OptimizerState("adam", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0, 4),), {}))
    4
    >>> recorded_step(OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0),), {})) is None
    True
    """
    steps = {p.path: p.step for p in state.params if p.step is not None}
    distinct = sorted(set(steps.values()))
    if len(distinct) > 1:
        named = ", ".join(f"{path_to_name(next(p for p, s in steps.items() if s == v))} at step {v}" for v in distinct)
        raise UnsupportedError(
            f"{where}: parameters have taken different numbers of steps ({named}); an nnx.Optimizer or a "
            "TrainState counts one step for all"
        )
    if distinct:
        return distinct[0]
    if state.spec.has_step:  # no parameter has state: none has stepped
        return 0
    scheduler = state.metadata.lr_scheduler
    return None if scheduler is None else last_epoch(scheduler)


def optimizer_step(state: OptimizerState, step: int | None = None, where: str = "the output") -> int:
    """The step an ``nnx.Optimizer`` or a ``TrainState`` counts for ``state`` (:func:`recorded_step`), which
    ``step`` (``--step N``, the ``CheckpointManager`` step written) must equal; ``step`` itself where the state
    records none (SGD without an LR scheduler). Refused where they differ, or where neither says: a
    ``TrainState.step`` is the user's step count, and a wrong one would go unnoticed.

    >>> from optstate.schema import ParamInfo
    >>> sgd = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0),), {})
    >>> optimizer_step(sgd, 7)
    7
    >>> optimizer_step(sgd, None, "out/")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: out/: SGD keeps no step count ...; pass --step N ...
    """
    recorded = recorded_step(state, where)
    if recorded is None:
        if step is not None:
            return step
        raise UnsupportedError(
            f"{where}: {state.spec.torch_class} keeps no step count and the state has no LR scheduler, so the "
            "step an nnx.Optimizer or TrainState counts is unknown; pass --step N (the optimizer steps taken; it "
            "also writes DST/N/ as a CheckpointManager step)"
        )
    if step is not None and step != recorded:
        raise FormatError(
            f"{where}: --step {step}, and the state has taken {recorded} optimizer steps; an nnx.Optimizer's or "
            f"TrainState's step in a CheckpointManager step folder must be the folder's (pass --step {recorded})"
        )
    return recorded


class _Model(nnx.Module):
    """A module whose attributes are a tree of Variables: nested dicts become nested modules, so that NNX
    names each Variable by its path, as it names a user's model."""

    def __init__(self, tree: Mapping[str, Any]) -> None:
        for key, value in tree.items():
            setattr(self, key, _Model(value) if isinstance(value, Mapping) else value)


def _abstract_nnx(state: OptimizerState, tx: Any) -> tuple[nnx.State, nnx.State]:
    """``(nnx.state(model), nnx.state(optimizer))`` as shapes, for a model of the state's parameters (and
    buffers) and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``."""
    params = param_shapes(state)
    weights = state.weights or {}
    buffers = {p: jax.ShapeDtypeStruct(weights[p].shape, weights[p].dtype) for p in state.buffers}

    def build() -> tuple[_Model, nnx.Optimizer]:
        variables: dict[ParamPath, nnx.Variable] = {}
        variables.update({p: nnx.Param(jnp.zeros(s.shape, s.dtype)) for p, s in params.items()})
        variables.update({p: nnx.BatchStat(jnp.zeros(s.shape, s.dtype)) for p, s in buffers.items()})
        model = _Model(nest(variables))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.enable_x64(True):  # shapes only: float64 stays float64
        model, optimizer = nnx.eval_shape(build)
        return nnx.state(model), nnx.state(optimizer)


def _variable_path(key_path: Any) -> ParamPath:
    """The path of a Variable's array in an NNX state, without the trailing ``value``."""
    path = key_path_to_path(key_path)
    return path[:-1] if path and path[-1] == VALUE else path


def _filled(abstract: nnx.State, values: Mapping[ParamPath, Any], what: str) -> nnx.State:
    """``abstract`` with each Variable's array taken from ``values`` by path; refuses a leaf without a value."""

    def fill(key_path: Any, leaf: Any) -> Any:
        path = _variable_path(key_path)
        if path not in values:
            raise FormatError(f"{what}: NNX keeps {'/'.join(path)}, which the state has no value for")
        value = values[path]
        if tuple(value.shape) != tuple(leaf.shape) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise FormatError(
                f"{what}: {'/'.join(path)} is {list(leaf.shape)} {np.dtype(leaf.dtype)} in NNX, "
                f"{list(value.shape)} {np.dtype(value.dtype)} in the state"
            )
        return value

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _warn_torch_layout(state: OptimizerState, what: str) -> None:
    """Warn where the state keeps torch's names and layout (no ``--target-params``). Not refused: the Flax docs'
    restore reads the tree into a model whose Params have torch's names and shapes (an ``nnx.Param`` ``weight``
    of ``[out, in]``), and ``optstate.api.read`` reads it; only a model of Flax's own layers (a ``kernel``, the
    transpose) needs ``--target-params``, and the restore of one fails naming the difference, never silently."""
    torch_like = [p for p in state.params if len(p.shape) == 2 and p.path[-1] == "weight"]
    if state.metadata.layout is None and torch_like:
        first = torch_like[0]
        warnings.warn(
            f"writing {what} with torch's names and layout ({path_to_name(first.path)} {list(first.shape)}): the "
            "Flax docs' restore reads it into a model whose parameters keep these names and shapes; for Flax's "
            "Linear/Dense layers (kernel = weight.T) convert with --target-params naming that model",
            stacklevel=4,
        )


def _optax_state(state: OptimizerState) -> tuple[Any, Any]:
    """``(tx, opt_state)``: the transform a restore builds for ``state``, and its state filled from ``state``."""
    tx, _, opt_template = template(state)
    return tx, fill_state(state, opt_template, _leaf)


def nnx_tree(state: OptimizerState, step: int | None = None) -> tuple[Any, Any]:
    """``(tree, opt_state)``: what the Flax docs save for ``state`` (``{"model": nnx.state(model), "optimizer":
    nnx.state(optimizer)}``, or ``nnx.state(optimizer)`` alone for a state without model weights), and the
    Optax state inside it, for its recorded types; the optimizer's ``step`` as :func:`optimizer_step` says.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("adam", ({"lr": 0.1},), (ParamInfo(("fc", "kernel"), (2, 3), "float32", 0, 5),),
    ...     {("first_moment", ("fc", "kernel")): np.ones((2, 3), np.float32),
    ...      ("second_moment", ("fc", "kernel")): np.ones((2, 3), np.float32)})
    >>> tree, _ = nnx_tree(s)
    >>> int(tree["step"][...]), tree["opt_state"][0]["mu"]["fc"]["kernel"][...].shape
    (5, (2, 3))
    """
    tx, opt_state = _optax_state(state)
    model, optimizer = _abstract_nnx(state, tx)
    values = {key_path_to_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    found = {("opt_state", *path): leaf for path, leaf in values.items()}
    found[("step",)] = np.asarray(optimizer_step(state, step), np.uint32)
    filled_optimizer = _filled(optimizer, found, "the nnx.Optimizer")
    if state.weights is None:
        return filled_optimizer, opt_state
    weights = {path: _leaf(array) for path, array in state.weights.items()}
    return {"model": _filled(model, weights, "the model"), "optimizer": filled_optimizer}, opt_state


def train_state_tree(state: OptimizerState, step: int | None = None) -> tuple[dict[str, Any], Any]:
    """``(tree, opt_state)``: a linen ``TrainState``'s fields for ``state`` (``step`` as :func:`optimizer_step`
    says, ``params``, ``opt_state``; ``batch_stats`` too, for a model with BatchNorm, as the Flax docs'
    ``TrainState`` subclass keeps them), and its Optax state.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float32", 0),),
    ...     {("momentum", ("w",)): np.ones(2, np.float32)}, {("w",): np.zeros(2, np.float32)})
    >>> tree, _ = train_state_tree(s, step=4)
    >>> tree["step"], tree["opt_state"][0].trace["w"].tolist()
    (4, [1.0, 1.0])
    """
    if state.weights is None:
        raise UnsupportedError(
            "a TrainState holds the parameters, and this state has no model weights; convert a checkpoint that "
            "holds them (a torch checkpoint with the model's state_dict)"
        )
    others = [p for p in state.buffers if p[0] != BATCH_STATS]
    if others:
        raise UnsupportedError(
            f"{path_to_name(others[0])}: a buffer a TrainState has no place for (only BatchNorm statistics, as "
            f"batch_stats); move them to a Flax layout with --target-params"
        )
    _, opt_state = _optax_state(state)
    weights = state.weights
    tree: dict[str, Any] = {
        "step": optimizer_step(state, step),  # a Python int, as TrainState.apply_gradients counts it
        "params": nest({p: _leaf(weights[p]) for p in param_shapes(state)}),
        "opt_state": opt_state,
    }
    stats = {p[1:]: _leaf(weights[p]) for p in state.buffers}
    if stats:
        tree[BATCH_STATS] = nest(stats)
    return tree, opt_state


# ----------------------------------------------------------------------------- the formats' entries

TreeBuilder = Callable[[OptimizerState, int | None], tuple[Any, Any]]  # nnx_tree, train_state_tree


def _write(
    state: OptimizerState, path: str | os.PathLike, options: WriteOptions, build: TreeBuilder, what: str
) -> None:
    """``build``'s tree as an Orbax checkpoint at ``path`` (``options.step``: as that step of a
    ``CheckpointManager`` directory, and the tree's step where the state records none), with ``optstate.json``."""
    step = optimizer_step(state, options.step, os.fspath(path))  # refused before any warning about the rest
    _warn_torch_layout(state, what)
    tree, opt_state = build(state, step)
    save_tree(
        tree,
        path,
        state,
        opt_state,
        force=options.force,
        fsync=options.fsync,
        progress=options.progress,
        step=options.step,
    )


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``nnx`` format: :func:`nnx_tree` as an Orbax checkpoint at ``path`` (with
    ``options.step``, as that step of a ``CheckpointManager`` directory), with ``optstate.json``.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo
    >>> from optstate.converters.jax.orbax import read_optax_dir
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float32", 0),),
    ...     {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/out"
    >>> write(s, d, WriteOptions(step=2))
    >>> read_optax_dir(d).slots[("momentum", ("w",))].tolist()
    [1.0, 1.0]
    """
    _write(state, path, options, nnx_tree, "an NNX checkpoint")


def write_train_state(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``train-state`` format: :func:`train_state_tree` as an Orbax checkpoint at ``path``
    (with ``options.step``, as that step of a ``CheckpointManager`` directory), with ``optstate.json``.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo
    >>> from optstate.converters.jax.orbax import read_optax_dir
    >>> s = OptimizerState("adam", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0, 3),),
    ...     {("first_moment", ("w",)): np.ones(2, np.float32), ("second_moment", ("w",)): np.ones(2, np.float32)},
    ...     {("w",): np.zeros(2, np.float32)})
    >>> d = tempfile.mkdtemp() + "/out"
    >>> write_train_state(s, d, WriteOptions())
    >>> [p.step for p in read_optax_dir(d).params]
    [3]
    """
    _write(state, path, options, train_state_tree, "a TrainState")
