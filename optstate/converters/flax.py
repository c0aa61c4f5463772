"""Flax adapter: the target model of a layout move (linen variables, NNX modules) and NNX optimizers.

``optstate convert --target-params PARAMS`` takes a Flax model's parameter tree as a msgpack file
(``flax.serialization.to_bytes(model.init(...))``), an Orbax checkpoint directory of it, or
``module:function`` that returns it (or an ``nnx.Module``). The way back takes the torch model
instead: a ``torch.save`` file of its ``state_dict``, or ``module:function`` returning an ``nn.Module``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path as FsPath
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx, serialization

from ..errors import FormatError, MappingError
from ..schema.layout import DROPPED_LEAVES, Layout, apply_layout, match_layout, revert_layout
from ..schema.state import OptimizerState, Path
from .optax import from_optax, key_path_to_path, to_optax

Shape = tuple[int, ...]
# linen's variable collections; a tree whose top level is made of these is `model.init(...)`'s output.
COLLECTIONS = frozenset({"params", "batch_stats", "cache", "intermediates", "losses", "constants"})


def _shapes(tree: Any) -> dict[Path, Shape]:
    return {key_path_to_path(kp): tuple(np.shape(leaf)) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _call(spec: str) -> Any:
    module_name, _, function = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # the user's own model module, named on the command line
    try:
        return getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as exc:
        raise FormatError(f"{spec}: cannot call {function}() of module {module_name} ({exc})") from None
    finally:
        sys.path.remove(os.getcwd())


def _torch_shapes(obj: Any) -> dict[Path, Shape]:
    from .torch import split_checkpoint

    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a live nn.Module
        obj = obj.state_dict()
    weights = split_checkpoint(obj, "the torch model")[1] if "model" in obj or "state_dict" in obj else obj
    return {tuple(name.split(".")): tuple(t.shape) for name, t in weights.items()}


def _from_file(path: str) -> Any:
    p = FsPath(path)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        from .torch import load_checkpoint

        return load_checkpoint(path)
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


def _is_torch(obj: Any) -> bool:
    """A torch module, or a ``state_dict`` (or a checkpoint holding one) of torch tensors."""
    torch = sys.modules.get("torch")  # a torch object exists only where torch is imported
    if torch is None:
        return False
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return True
    return isinstance(obj, Mapping) and any(_is_torch(v) for v in list(obj.values())[:8])


def target_model(spec: Any) -> tuple[str, dict[Path, Shape], dict[Path, Shape]]:
    """``(framework, params, stats)`` of the model ``spec`` names (or is: a parameter tree, an
    ``nnx.Module``, a torch module or ``state_dict``): ``"flax"`` or ``"torch"``, parameter shapes by
    path, and the shapes of BatchNorm's statistics (linen: under ``batch_stats``).

    >>> target_model("model.msgpack")  # doctest: +SKIP
    ('flax', {('Dense_0', 'kernel'): (3, 4), ...}, {})
    """
    if not isinstance(spec, (str, os.PathLike)):
        obj = spec
    elif ":" in os.fspath(spec) and not FsPath(spec).exists():
        obj = _call(os.fspath(spec))
    else:
        obj = _from_file(os.fspath(spec))
    if _is_torch(obj):
        return "torch", _torch_shapes(obj), {}
    if isinstance(obj, nnx.Module):
        return ("flax", _shapes(nnx.state(obj, nnx.Param).to_pure_dict()),
                _shapes(nnx.state(obj, nnx.BatchStat).to_pure_dict()))
    if isinstance(obj, nnx.State):
        obj = obj.to_pure_dict()
    if isinstance(obj, Mapping) and "params" in obj and set(obj) <= COLLECTIONS:
        stats = {("batch_stats", *p): s for p, s in _shapes(obj.get("batch_stats", {})).items()}
        return "flax", _shapes(obj["params"]), stats
    if not isinstance(obj, Mapping):
        raise FormatError(f"{spec}: expected a parameter tree (a dict), an nnx.Module or a torch model, "
                          f"found {type(obj).__name__}")
    return "flax", _shapes(obj), {}


def _tensors(state: OptimizerState) -> dict[Path, Shape]:
    shapes = {p.path: p.shape for p in state.params}
    shapes.update({p: tuple(a.shape) for p, a in (state.weights or {}).items()})
    return shapes


def relayout(state: OptimizerState, *, target: Any = None, mapping: str | None = None) -> OptimizerState:
    """``state`` moved to the layout of the ``target`` model (see :func:`target_model`) or as the mapping
    file says; a state already in a Flax layout moves back to torch's when the target is a torch model.

    >>> flax_state = relayout(optstate.from_torch("ckpt.pt"), target="model.msgpack")  # doctest: +SKIP
    """
    if mapping is not None:
        layout = Layout.read(mapping)
        sources = {m.source for m in layout.moves} | set(layout.dropped)
        return apply_layout(state, layout) if set(_tensors(state)) <= sources else revert_layout(state, layout)
    framework, params, stats = target_model(target)
    if framework == "flax":
        return apply_layout(state, match_layout(_tensors(state), params, stats))
    if "layout" in state.metadata:
        return revert_layout(state, Layout.from_json(state.metadata["layout"]))
    buffers = set(state.buffers)
    ours = _tensors(state)
    if not buffers:  # an Optax state alone has no BatchNorm statistics: nothing to put back
        params = {p: s for p, s in params.items() if p[-1] not in ("running_mean", "running_var", *DROPPED_LEAVES)}
    layout = match_layout(params, {p: s for p, s in ours.items() if p not in buffers},
                          {p: s for p, s in ours.items() if p in buffers})
    return revert_layout(state, layout)


def plan(state: OptimizerState, target: Any) -> tuple[Layout, list[str]]:
    """The layout :func:`relayout` would use for ``target``, with every problem it would refuse over."""
    from ..schema.layout import plan_layout

    framework, params, stats = target_model(target)
    if framework != "flax":
        raise MappingError(f"{target}: a torch model; optstate map maps a torch checkpoint to a Flax model")
    return plan_layout(_tensors(state), params, stats)


# ----------------------------------------------------------------------------- NNX

def _pure(tree: Any) -> Any:
    return tree.to_pure_dict() if isinstance(tree, nnx.State) else tree


def to_nnx(state: OptimizerState, model: nnx.Module, opt: nnx.Optimizer | None = None) -> None:
    """Load ``state`` (in the model's layout: see :func:`relayout`) into an NNX model and its
    ``nnx.Optimizer`` ``opt``, in place: the weights (when the state has them) and the optimizer state.
    ``opt`` must have been built with ``optstate.optax_transform(state)``.

    >>> tx = optstate.optax_transform(state)  # doctest: +SKIP
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param); optstate.to_nnx(state, model, opt)  # doctest: +SKIP
    """
    params = nnx.state(model, nnx.Param)
    pure = params.to_pure_dict()
    ours = _shapes(pure)
    theirs = {p.path for p in state.params} | set(state.weights or {})
    missing = sorted(set(ours) - theirs)
    if missing:
        raise MappingError("the NNX model has parameters the state does not: "
                           + ", ".join("/".join(p) for p in missing[:10]))
    if state.weights is not None:
        values = {p: np.asarray(state.weights[p]) for p in theirs if p in state.weights}
        for kind in (nnx.Param, nnx.BatchStat):
            nnx.update(model, _nested(values, nnx.state(model, kind).to_pure_dict()))
    if opt is not None:
        filled = to_optax(state, opt.tx, nnx.state(model, nnx.Param).to_pure_dict())
        _assign(opt.opt_state, filled)


def _nested(values: Mapping[Path, Any], like: Any) -> Any:
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
        raise MappingError("the nnx.Optimizer's state does not have the layout of optstate.optax_transform(state): "
                           f"e.g. {sorted(set(variables) ^ set(values))[:3]}")
    for path, var in variables.items():
        var.value = values[path]


def _plain_path(key_path: Any) -> Path:
    path = key_path_to_path(key_path)
    return path[:-1] if path and path[-1] == "value" else path


def from_nnx(model: nnx.Module, opt: nnx.Optimizer, **options: Any) -> OptimizerState:
    """The canonical state of an NNX model and its ``nnx.Optimizer`` ``opt`` (``options`` as
    :func:`optstate.from_optax`: ``optimizer=``, ``hyperparams=``).

    >>> state = optstate.from_nnx(model, opt, optimizer="adamw", hyperparams={"lr": 1e-3})  # doctest: +SKIP
    """
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    opt_state = jax.tree.map(lambda v: v.value if is_var(v) else v, opt.opt_state, is_leaf=is_var)
    return from_optax(_unstate(opt_state), nnx.state(model, nnx.Param).to_pure_dict(), **options)


def _unstate(tree: Any) -> Any:
    """NNX's ``State`` nodes inside an Optax state as plain dicts (their paths stay the same)."""
    if isinstance(tree, nnx.State):
        return tree.to_pure_dict()
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_unstate(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_unstate(v) for v in tree)
    if isinstance(tree, Mapping):
        return {k: _unstate(v) for k, v in tree.items()}
    return tree
