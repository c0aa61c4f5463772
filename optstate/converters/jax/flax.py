"""Flax adapter: Flax models as layout targets (msgpack and Orbax files of parameter trees, NNX
modules) and NNX optimizers, loaded and read in place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from ...errors import FormatError, MappingError
from ...schema.state import OptimizerState, ParamPath
from ..layout.moves import Shape
from ..layout.targets import tree_shapes
from .optax import from_optax, key_path_to_path, to_optax


def read_tree(path: str) -> Any:
    """A Flax parameter tree from a msgpack file (``flax.serialization.to_bytes``) or an Orbax directory;
    Orbax arrays come back as zero-strided placeholders: only their shapes are read.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "params.msgpack")
    >>> _ = open(path, "wb").write(serialization.to_bytes({"dense": {"kernel": np.zeros((2, 3))}}))
    >>> read_tree(path)["dense"]["kernel"].shape
    (2, 3)
    """
    p = Path(path)
    if p.is_dir():
        import orbax.checkpoint as ocp

        found = ocp.StandardCheckpointer().metadata(os.path.abspath(p))
        tree = None if found is None else found.item_metadata.tree
        if tree is None:
            raise FormatError(f"{path}: not an Orbax checkpoint of one PyTree")
        return jax.tree.map(lambda m: np.broadcast_to(np.zeros((), m.dtype), m.shape), tree)
    if not p.is_file():
        raise FormatError(f"{path}: no such file or directory")
    try:
        return serialization.msgpack_restore(p.read_bytes())
    except Exception as exc:  # msgpack raises its own types
        raise FormatError(f"{path}: not a Flax msgpack file ({type(exc).__name__}: {exc})") from None


def nnx_shapes(obj: Any) -> tuple[dict[ParamPath, Shape], dict[ParamPath, Shape]]:
    """Parameter and BatchNorm-statistics shapes of an ``nnx.Module`` (or the parameters of an ``nnx.State``).

    >>> nnx_shapes(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    ({('bias',): (3,), ('scale',): (3,)}, {('mean',): (3,), ('var',): (3,)})
    """
    if isinstance(obj, nnx.Module):
        return (
            tree_shapes(nnx.to_pure_dict(nnx.state(obj, nnx.Param))),
            tree_shapes(nnx.to_pure_dict(nnx.state(obj, nnx.BatchStat))),
        )
    if isinstance(obj, nnx.State):
        return tree_shapes(nnx.to_pure_dict(obj)), {}
    raise FormatError(f"expected an nnx.Module or nnx.State, found {type(obj).__name__}")


# ----------------------------------------------------------------------------- NNX


def to_nnx(state: OptimizerState, model: nnx.Module, opt: nnx.Optimizer | None = None) -> None:
    """Load ``state`` (in the model's layout: see :func:`relayout`) into an NNX model and its
    ``nnx.Optimizer`` ``opt``, in place: the weights (when the state has them) and the optimizer state.
    ``opt`` must have been built with ``optstate.optax_transform(state)``.

    >>> import optax, optstate
    >>> trained = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(trained, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    >>> state = from_nnx(trained, opt, optimizer="sgd", hyperparams={"lr": 0.1, "momentum": 0.9,
    ...                                                            "params": ["bias", "kernel"]})
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
    >>> to_nnx(state, model, nnx.Optimizer(model, optstate.optax_transform(state), wrt=nnx.Param))
    >>> bool((model.kernel[...] == trained.kernel[...]).all())
    True
    """
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    ours = tree_shapes(pure)
    theirs = {p.path for p in state.params} | set(state.weights or {})
    missing = sorted(set(ours) - theirs)
    if missing:
        raise MappingError(
            "the NNX model has parameters the state does not: " + ", ".join("/".join(p) for p in missing[:10])
        )
    if state.weights is not None:
        values = {p: np.asarray(state.weights[p]) for p in theirs if p in state.weights}
        for kind in (nnx.Param, nnx.BatchStat):
            nnx.update(model, _nested(values, nnx.to_pure_dict(nnx.state(model, kind))))
    if opt is not None:
        filled = to_optax(state, opt.tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        _assign(opt.opt_state, filled)


def _nested(values: Mapping[ParamPath, Any], like: Any) -> Any:
    """``like`` (a pure dict, NNX's integer keys included) with the leaves ``values`` names replaced."""

    def leaf(kp, old):
        return values.get(key_path_to_path(kp), old)

    return jax.tree_util.tree_map_with_path(leaf, like)


def _assign(live: Any, filled: Any) -> None:
    """Set the NNX optimizer's state variables from a plain Optax state, matched by path, not position."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    variables = {_plain_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(live, is_leaf=is_var)[0]}
    values = {_plain_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(filled)[0]}
    if set(variables) != set(values):
        raise MappingError(
            "the nnx.Optimizer's state does not have the layout of optstate.optax_transform(state): "
            f"e.g. {sorted(set(variables) ^ set(values))[:3]}"
        )
    for path, var in variables.items():
        var[...] = values[path]


def _plain_path(key_path: Any) -> ParamPath:
    path = key_path_to_path(key_path)
    return path[:-1] if path and path[-1] == "value" else path


def from_nnx(model: nnx.Module, opt: nnx.Optimizer, **options: Any) -> OptimizerState:
    """The canonical state of an NNX model and its ``nnx.Optimizer`` ``opt`` (``options`` as
    :func:`optstate.from_optax`: ``optimizer=``, ``hyperparams=``).

    >>> import optax
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    >>> state = from_nnx(model, opt, optimizer="adam", hyperparams={"lr": 1e-3, "params": ["bias", "kernel"]})
    >>> sorted(state.slots)[0]
    ('first_moment', ('bias',))
    """
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    opt_state = jax.tree.map(lambda v: v[...] if is_var(v) else v, opt.opt_state, is_leaf=is_var)
    return from_optax(_unstate(opt_state), nnx.to_pure_dict(nnx.state(model, nnx.Param)), **options)


def _unstate(tree: Any) -> Any:
    """NNX's ``State`` nodes inside an Optax state as plain dicts (their paths stay the same)."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_unstate(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_unstate(v) for v in tree)
    if isinstance(tree, Mapping):
        return {k: _unstate(v) for k, v in tree.items()}
    return tree
