"""Moving a state to another model's layout: the target model, read from wherever the user has it.

``optstate convert --target-params PARAMS`` takes a Flax model's parameter tree as a msgpack file
(``flax.serialization.to_bytes(model.init(...))``), an Orbax checkpoint directory of it, or
``module:function`` that returns it (or an ``nnx.Module``). The way back takes the torch model
instead: a ``torch.save`` file of its ``state_dict``, or ``module:function`` returning an ``nn.Module``.
A plain dict of arrays needs neither framework; each kind of model loads its own adapter.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ...errors import FormatError
from ...schema.state import OptimizerState, ParamPath
from .. import adapter, call_user_function
from .moves import Layout, Shape, apply_layout, revert_layout
from .rules import DROPPED_LEAVES, match_layout, plan_layout

# linen's variable collections; a tree whose top level is made of these is `model.init(...)`'s output.
COLLECTIONS = frozenset({"params", "batch_stats", "cache", "intermediates", "losses", "constants"})
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def tree_shapes(tree: Any, prefix: ParamPath = ()) -> dict[ParamPath, Shape]:
    """``{path: shape}`` of a nested dict (or list) of arrays; list positions become ``"0"``, ``"1"``, ...

    >>> import numpy as np
    >>> tree_shapes({"layers": [{"kernel": np.zeros((2, 3))}], "scale": np.zeros(3)})
    {('layers', '0', 'kernel'): (2, 3), ('scale',): (3,)}
    """
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tuple(np.shape(tree))}  # arrays, jax.ShapeDtypeStructs (np.shape reads .shape), scalars
    shapes: dict[ParamPath, Shape] = {}
    for key, value in items:
        shapes.update(tree_shapes(value, (*prefix, str(key))))
    return shapes


def _torch_shapes(obj: Any, source: str) -> dict[ParamPath, Shape]:
    """Shapes of a torch model: a module, its ``state_dict``, a checkpoint holding one, or a file of these."""
    from ..torch import state_dict as torch_dict

    if isinstance(obj, str):
        obj = torch_dict.read_torch_file(obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a live nn.Module
        obj = obj.state_dict()
    if _is_torch(obj):
        obj = adapter("torch").numpy_tree(obj, copy=False)
    if torch_dict.is_tensor_dict(obj):
        return {tuple(n.split(".")): tuple(a.shape) for n, a in obj.items()}
    weights = torch_dict.split_checkpoint(obj, source)[1]
    if weights is None:
        raise FormatError(f"{source}: holds no model weights (a model state_dict, or a checkpoint with one)")
    return {tuple(n.split(".")): tuple(a.shape) for n, a in weights.items()}


def _is_torch(obj: Any) -> bool:
    """A torch module, or a ``state_dict`` of torch tensors."""
    torch = sys.modules.get("torch")  # a torch object exists only where torch is imported
    if torch is None:
        return False
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return True
    return isinstance(obj, Mapping) and any(_is_torch(v) for v in list(obj.values())[:8])


def _flax_shapes(tree: Any) -> tuple[dict[ParamPath, Shape], dict[ParamPath, Shape]]:
    if isinstance(tree, Mapping) and "params" in tree and set(tree) <= COLLECTIONS:
        stats = {("batch_stats", *p): s for p, s in tree_shapes(tree.get("batch_stats", {})).items()}
        return tree_shapes(tree["params"]), stats
    return tree_shapes(tree), {}


def target_model(spec: Any) -> tuple[str, dict[ParamPath, Shape], dict[ParamPath, Shape]]:
    """``(framework, params, stats)`` of the model ``spec`` names (or is: a parameter tree, an
    ``nnx.Module``, a torch module or ``state_dict``): ``"flax"`` or ``"torch"``, parameter shapes by
    path, and the shapes of BatchNorm's statistics (linen: under ``batch_stats``).

    >>> import numpy as np
    >>> target_model({"params": {"fc": {"kernel": np.zeros((3, 2))}}})
    ('flax', {('fc', 'kernel'): (3, 2)}, {})
    """
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if ":" in name and not pathlib.Path(name).exists():
            return target_model(call_user_function(name))
        if pathlib.Path(name).suffix in TORCH_SUFFIXES:
            return "torch", _torch_shapes(name, name), {}
        return ("flax", *_flax_shapes(adapter("flax").read_tree(name)))
    if _is_torch(spec):
        return "torch", _torch_shapes(spec, "the torch model"), {}
    nnx = sys.modules.get("flax.nnx")  # an NNX object exists only where flax.nnx is imported
    if nnx is not None and isinstance(spec, (nnx.Module, nnx.State)):
        return ("flax", *adapter("flax").nnx_shapes(spec))
    if not isinstance(spec, Mapping):
        raise FormatError(
            f"expected a parameter tree (a dict), an nnx.Module or a torch model, found {type(spec).__name__}"
        )
    return ("flax", *_flax_shapes(spec))


def _tensors(state: OptimizerState) -> dict[ParamPath, Shape]:
    """The state's tensors and their shapes; in the model's order where the state holds its weights (a
    ``state_dict`` is in order of definition, which pairs numbered Flax modules), else the optimizer's."""
    shapes = {p: tuple(a.shape) for p, a in (state.weights or {}).items()}
    shapes.update({p.path: p.shape for p in state.params if p.path not in shapes})
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
    if state.metadata.layout is not None:
        return revert_layout(state, Layout.from_json(state.metadata.layout))
    return revert_layout(state, match_layout(*_back_to_torch(state, params)))


def _back_to_torch(
    state: OptimizerState, torch_params: Mapping[ParamPath, Shape]
) -> tuple[dict[ParamPath, Shape], dict[ParamPath, Shape], dict[ParamPath, Shape]]:
    """What the rules match to move a state in a Flax layout to the torch model's: the torch model's
    tensors (the sources), the state's parameters and its BatchNorm statistics (the targets)."""
    buffers = set(state.buffers)
    ours = _tensors(state)
    sources = dict(torch_params)
    if not buffers:  # an Optax state alone has no BatchNorm statistics: nothing to put back
        sources = {p: s for p, s in sources.items() if p[-1] not in ("running_mean", "running_var", *DROPPED_LEAVES)}
    return (
        sources,
        {p: s for p, s in ours.items() if p not in buffers},
        {p: s for p, s in ours.items() if p in buffers},
    )


def plan(state: OptimizerState, target: Any) -> tuple[Layout, list[str]]:
    """The layout :func:`relayout` would use for ``target``, with every problem it would refuse over.

    For a Flax model, the moves take the state's torch tensors to its leaves; for a torch model, they
    take the torch model's tensors to the state's Flax leaves, and the conversion runs them backwards
    (a mapping file says the same either way). Modules that linen numbered (``Dense_0``) are paired
    with the torch modules where exactly one order-preserving pairing, in order of definition, fits
    (see :mod:`.rules`); where two members of a family have the same shapes, so that only the order in
    which linen constructed them says which is which, a ``UserWarning`` names them (``optstate map``
    prints it; :func:`relayout` warns the same).

    >>> from optstate.schema.state import ParamInfo
    >>> state = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("fc", "weight"), (3, 2), "float32", 0),), {})
    >>> layout, problems = plan(state, {"params": {"fc": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}})
    >>> [m.describe for m in layout.moves], problems
    (['transpose (1, 0)'], ['fc/bias [3]: no torch tensor'])
    >>> import torch
    >>> info = ParamInfo(("Dense_0", "kernel"), (2, 3), "float32", 0)
    >>> flax_state = OptimizerState("sgd", ({"lr": 0.1},), (info,), {})
    >>> layout, problems = plan(flax_state, {"fc1.weight": torch.zeros(3, 2)})  # a torch model's state_dict
    >>> [(".".join(m.source), "/".join(m.target), m.describe) for m in layout.moves], problems
    ([('fc1.weight', 'Dense_0/kernel', 'transpose (1, 0)')], [])
    """
    framework, params, stats = target_model(target)
    if framework == "flax":
        return plan_layout(_tensors(state), params, stats)
    if state.metadata.layout is not None:
        return Layout.from_json(state.metadata.layout), []
    return plan_layout(*_back_to_torch(state, params))
