"""The torch model a trainer writer lays its checkpoint out for, and what every such writer checks alike.

The hf-trainer, lightning, accelerate and deepspeed writers write files that a trainer loads into a model
and an optimizer it builds itself: ``load_state_dict`` matches the optimizer's tensors by position, the
model's by name. :class:`TargetModel` is that model, loaded once (:func:`load_target`), as a record: its
parameters in ``named_parameters()`` order, its ``state_dict()`` tensors (buffers too) with shapes and
dtypes, and its tied names. The checks and pieces the writers share are here, written once: the parameter
order (:func:`require_torch_order`), the step (:func:`written_step`), the weights (:func:`model_weights`),
the optimizer's ``state_dict`` (:func:`optimizer_state_dict`) and the output directory (:func:`write_directory`),
read back before its rename (:func:`.readback.read_back_directory`).

NumPy only at module level: torch is imported by :func:`load_target` (through :mod:`.models`) alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import atomic_directory
from ...errors import MappingError, OptstateError, UnsupportedError
from ...schema.fileformat import write_safetensors
from ...schema.state import OptimizerState, name_to_path, path_to_name
from ..formats import WriteOptions
from ..readback import Written, read_back_directory, written_bytes, written_safetensors, written_torch
from ..schedules.identify import SCHEDULER_GROUP_KEYS
from ..schedules.torch_schedulers import last_epoch
from . import ptfile
from . import state_dict as torch_dict
from .state_dict import _FLOAT32_EXACT_STEPS

__all__ = [
    "TargetModel",
    "base_lr",
    "in_model_names",
    "load_target",
    "model_names",
    "model_weights",
    "optimizer_state_dict",
    "renamed_weights",
    "require_torch_order",
    "scheduled_group",
    "step_dtype",
    "write_directory",
    "written_step",
]


@dataclass(frozen=True)
class TargetModel:
    """The model a run resumes with, as a record: ``names`` its parameters in ``named_parameters()`` order (a
    tied one once), ``trainable`` those with ``requires_grad``, ``tensors`` every ``state_dict()`` key (buffers
    and tied aliases included) -> ``(shape, dtype)``, ``aliases`` each tied key -> the first key of its tensor.

    >>> t = TargetModel(("w", "b"), ("w",), {"w": ((2,), "float64"), "b": ((), "float64")})
    >>> t.frozen, t.stored
    (('b',), ('w', 'b'))
    """

    names: tuple[str, ...]
    trainable: tuple[str, ...]
    tensors: Mapping[str, tuple[tuple[int, ...], str]]
    aliases: Mapping[str, str] = field(default_factory=dict)
    source: str = "the model"

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parameters without ``requires_grad``: no optimizer built from the model holds them."""
        return tuple(n for n in self.names if n not in self.trainable)

    @property
    def stored(self) -> tuple[str, ...]:
        """The ``state_dict()`` keys, a tied tensor once (under its first name, as ``save_pretrained`` stores it)."""
        return tuple(n for n in self.tensors if n not in self.aliases)

    def in_dtype(self, dtype: str) -> TargetModel:
        """The record with every floating-point tensor in ``dtype`` (a model built on the meta device in the
        default dtype, which the run builds in ``dtype``).

        >>> TargetModel(("w",), ("w",), {"w": ((1,), "float32"), "n": ((), "int64")}).in_dtype("float64").tensors
        {'w': ((1,), 'float64'), 'n': ((), 'int64')}
        """
        floating = ("float", "bfloat", "half")
        tensors = {n: (s, dtype if d.startswith(floating) else d) for n, (s, d) in self.tensors.items()}
        return replace(self, tensors=tensors)


def target_of(module: Any, source: str = "the model") -> TargetModel:
    """The :class:`TargetModel` of a torch module.

    >>> import torch
    >>> t = target_of(torch.nn.Linear(2, 1))
    >>> t.names, t.tensors["weight"]
    (('weight', 'bias'), ((1, 2), 'float32'))
    """
    tensors = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases = {name: first.setdefault(id(t), name) for name, t in tensors.items()}
    named = list(module.named_parameters())
    return TargetModel(
        tuple(n for n, _ in named),
        tuple(n for n, p in named if p.requires_grad),
        {n: (tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()},
        {n: a for n, a in aliases.items() if n != a},
        source,
    )


def load_target(spec: Any) -> tuple[TargetModel, Any]:
    """``(the record, the module)`` of the model ``spec`` names (a module, ``module:function`` or a Hugging
    Face model directory, :func:`.models.load_model`), built once; torch is imported here.

    >>> import torch
    >>> load_target(torch.nn.Identity())[0].names
    ()
    """
    module = torch_dict.torch_model(spec)
    source = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else type(module).__name__
    return target_of(module, source), module


# ----------------------------------------------------------------------------- the parameters' order and names


def require_torch_order(state: OptimizerState, model: TargetModel | Any | None, where: str) -> None:
    """Refuse writing ``state``'s parameters by position in the state's own order where that order is not
    known to be a torch optimizer's. Checks exactly this: ``model`` is ``None`` (no model gives the order)
    and ``state.metadata.source`` is ``None`` (unknown) or starts with ``"optax"`` (a state read from Optax
    is ordered by its tree's sorted keys). Any other source (a torch, accelerate, DeepSpeed or Lightning file)
    kept its optimizer's order, and a model given orders the parameters itself.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float32", 0),), {})
    >>> require_torch_order(s.with_metadata(source="torch 2.13"), None, "out")
    >>> require_torch_order(s.with_metadata(source="optax 0.2.8"), None, "out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: out: the state comes from optax 0.2.8, whose parameter order is not ...
    """
    source = state.metadata.source
    if model is None and (source is None or source.startswith("optax")):
        raise UnsupportedError(
            f"{where}: the state comes from {source or 'a source that does not say'}, whose parameter order is not "
            "the order the torch optimizer numbers its tensors in (load_state_dict matches them by position); "
            "pass --model module:function returning the model (model= in Python)"
        )


def _prefix_candidates(ours: Sequence[str], theirs: Sequence[str]) -> list[str]:
    """Prefixes ``p`` (ending in '.') with ``p + ours[0]`` among ``theirs``."""
    first = ours[0]
    return [t[: -len(first)] for t in theirs if t.endswith("." + first)]


def model_names(state_names: Sequence[str], model: Sequence[str], source: str = "the model") -> dict[str, str]:
    """The model's name of each of the state's parameters: the same, or with one attribute prefix added
    (``fc1.weight`` -> ``net.fc1.weight``) or removed, the same prefix for every name; anything else refused.

    >>> model_names(["fc.weight", "fc.bias"], ["net.fc.weight", "net.fc.bias"])
    {'fc.weight': 'net.fc.weight', 'fc.bias': 'net.fc.bias'}
    >>> model_names(["w"], ["net.v"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.MappingError: the model's optimizer updates ['net.v'] and the state tracks ['w']: no attribute ...
    """
    wanted = sorted(model)
    if sorted(state_names) == wanted:
        return {n: n for n in state_names}
    if state_names and model:
        for prefix in _prefix_candidates(state_names, model):
            if sorted(prefix + n for n in state_names) == wanted:
                return {n: prefix + n for n in state_names}
        for prefix in _prefix_candidates(model, state_names):
            if (
                all(n.startswith(prefix) for n in state_names)
                and sorted(n[len(prefix) :] for n in state_names) == wanted
            ):
                return {n: n[len(prefix) :] for n in state_names}
    only_model = [n for n in model if n not in state_names][:5]
    only_state = [n for n in state_names if n not in model][:5]
    raise MappingError(
        f"{source}'s optimizer updates {only_model} and the state tracks {only_state}: "
        "no attribute prefix makes them the same names"
    )


def renamed_weights(weights: Mapping[Any, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    """The weights (by path) under the names the parameters' renaming gives: the one prefix it adds to every
    parameter (or takes off) added to every tensor (taken off where a name has it), buffers too.

    >>> renamed_weights({("fc", "w"): 1, ("bn", "running_mean"): 2}, {"fc.w": "net.fc.w"})
    {'net.fc.w': 1, 'net.bn.running_mean': 2}
    """
    state_name, module_name = next(iter(renamed.items()), ("", ""))
    if module_name.endswith(state_name):
        removed, added = "", module_name[: len(module_name) - len(state_name)]
    else:
        removed, added = state_name[: len(state_name) - len(module_name)], ""
    return {added + path_to_name(p).removeprefix(removed): a for p, a in weights.items()}


def in_model_names(state: OptimizerState, target: TargetModel, source: str = "the model") -> OptimizerState:
    """``state`` under the model's names, where one attribute prefix added to (or taken off) every parameter's
    name makes them the model's trainable ones (:func:`model_names`): a LightningModule's ``net.fc1.weight`` is
    the bare model's ``fc1.weight``. Weights and buffers take the same prefix. Returned unchanged where the
    names already agree or no prefix makes them agree (the writer's own checks then name the difference).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("net", "w"), (1,), "float64", 0),),
    ...     {("momentum", ("net", "w")): np.ones(1)}, {("net", "w"): np.zeros(1)})
    >>> t = in_model_names(s, TargetModel(("w",), ("w",), {"w": ((1,), "float64")}))
    >>> t.params[0].path, list(t.slots), list(t.weights)
    (('w',), [('momentum', ('w',))], [('w',)])
    """
    try:
        renamed = model_names([path_to_name(p.path) for p in state.params], target.trainable, source)
    except MappingError:
        return state
    if all(old == new for old, new in renamed.items()):
        return state
    paths = {name_to_path(old): name_to_path(new) for old, new in renamed.items()}

    def moved(tensors: Mapping[Any, Any]) -> dict[Any, Any]:
        return {name_to_path(n): a for n, a in renamed_weights(tensors, renamed).items()}

    return replace(
        state,
        params=tuple(replace(p, path=paths[p.path]) for p in state.params),
        slots={(slot, paths[path]): a for (slot, path), a in state.slots.items()},
        weights=None if state.weights is None else moved(state.weights),
        buffers=tuple(moved(dict.fromkeys(state.buffers))),
    )


def check_params(state: OptimizerState, target: TargetModel, renamed: Mapping[str, str]) -> None:
    """Each parameter the state tracks is a tensor of the model with the state's shape and dtype (renamed:
    state name -> model name): ``load_state_dict`` would cast it, its slots too, or fail.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> check_params(s, TargetModel(("w",), ("w",), {"w": ((2,), "float32")}), {"w": "w"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.MappingError: the model: w is float32 [2] in the model, float64 [2] in the state; ...
    """
    for info in state.params:
        name = renamed[path_to_name(info.path)]
        shape, dtype = target.tensors.get(name, (None, None))
        if shape is None:
            raise MappingError(f"{target.source}: the state tracks {name!r}, which is not a tensor of the model")
        if (tuple(shape), dtype) != (tuple(info.shape), info.dtype):
            raise MappingError(
                f"{target.source}: {name} is {dtype} {list(shape)} in the model, {info.dtype} {list(info.shape)} "
                "in the state; load_state_dict would cast it or fail, so the run would not continue as it stopped"
            )


# ----------------------------------------------------------------------------- the model's weights


def model_weights(
    state: OptimizerState,
    target: TargetModel,
    renamed: Mapping[str, str] | None = None,
    *,
    tied_once: bool = False,
    loader: str = "the trainer",
) -> dict[str, Any]:
    """The model's ``state_dict`` from the state's weights, under the model's names (``renamed``: the
    parameters' renaming, :func:`renamed_weights`): every tensor of ``target`` (a tied one under its first
    name only where ``tied_once``; the state may hold it under any of its names), each with the model's
    shape and dtype. A tensor missing, one the model lacks, or one of another shape or dtype is refused:
    the loader would fail, keep its own values, or cast.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float64", 0),), {}, {("w",): np.ones(1)})
    >>> model_weights(s, TargetModel(("net.w",), ("net.w",), {"net.w": ((1,), "float64")}), {"w": "net.w"})
    {'net.w': array([1.])}
    """
    if state.weights is None:
        raise UnsupportedError(
            f"{target.source}: the state holds no model weights, and {loader} loads the model's from the checkpoint; "
            "convert from a checkpoint that holds them (an Orbax checkpoint with 'params', a torch file with 'model')"
        )
    weights = (
        renamed_weights(state.weights, renamed) if renamed else {path_to_name(p): a for p, a in state.weights.items()}
    )
    unknown = [n for n in weights if n not in target.tensors]
    if unknown:
        raise MappingError(
            f"{target.source}: the state's weight {unknown[0]!r} ({len(unknown)} such) is not a tensor of the "
            f"model (it has e.g. {', '.join(list(target.tensors)[:3])})"
        )
    held: dict[str, Any] = {}
    for name, array in weights.items():
        first = target.aliases.get(name, name)
        if first in held and not np.array_equal(np.asarray(held[first]), np.asarray(array)):
            raise MappingError(
                f"{target.source}: {name} is tied to {first} in the model, and the state holds other values for each"
            )
        held.setdefault(first, array)
    missing = [n for n in target.stored if n not in held]
    if missing:
        raise MappingError(
            f"{target.source}: the model's {missing[0]!r} ({len(missing)} such) is not among the state's weights; "
            f"{loader} would keep the model's own values for it"
        )
    for name in target.stored:
        (shape, dtype), array = target.tensors[name], held[name]
        if (tuple(array.shape), str(array.dtype)) != (tuple(shape), dtype):
            raise MappingError(
                f"{target.source}: weight {name} is {dtype} {list(shape)} in the model, {array.dtype} "
                f"{list(array.shape)} in the state; loading would cast it or fail"
            )
    names = target.stored if tied_once else tuple(target.tensors)
    return {n: held[target.aliases.get(n, n)] for n in names}


# ----------------------------------------------------------------------------- the optimizer's state_dict


def step_dtype(state: OptimizerState) -> Any:
    """The dtype of the ``step`` tensors written: float32, as torch keeps it, unless a step is past 2**24,
    where float32 no longer holds every integer (torch then loads the float64 tensor as it is).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float32", 0, 2**24 + 1),), {})
    >>> step_dtype(s).__name__
    'float64'
    """
    most = max((p.step or 0 for p in state.params), default=0)
    return np.float32 if most <= _FLOAT32_EXACT_STEPS else np.float64


def base_lr(scheduler: Mapping[str, Any], gi: int) -> float | None:
    """Group ``gi``'s base lr in a scheduler state dict (a container's in its first child's), which torch's
    scheduler set as the group's ``initial_lr``.

    >>> base_lr({"_schedulers": [{"base_lrs": [0.1, 0.2]}, {"base_lrs": [0.1, 0.2]}]}, 1)
    0.2
    """
    if "base_lrs" in scheduler:
        return float(scheduler["base_lrs"][gi])
    children = scheduler.get("_schedulers") or [{}]
    return base_lr(children[0], gi) if children[0] else None


def scheduled_group(hp: Mapping[str, Any], gi: int, scheduler: Mapping[str, Any] | None, where: str) -> dict:
    """A group's hyperparameters as torch holds them beside the scheduler written: ``initial_lr`` its base, the
    ``lr`` the state's, which must be the one the scheduler set last (``_last_lr``; chainable schedulers step
    from it); without a scheduler, the keys a scheduler leaves dropped (the user said the lr stays).

    >>> scheduled_group({"lr": 0.5}, 0, {"base_lrs": [1.0], "_last_lr": [0.5]}, "out")
    {'lr': 0.5, 'initial_lr': 1.0}
    >>> scheduled_group({"lr": 0.4}, 0, {"base_lrs": [1.0], "_last_lr": [0.5]}, "out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: out: param group 0 has lr 0.4, and the LR scheduler written set it last to ...
    """
    if scheduler is None:
        return {k: v for k, v in hp.items() if k not in SCHEDULER_GROUP_KEYS}
    last = scheduler.get("_last_lr")
    if last is not None and float(last[gi]) != float(hp["lr"]):
        raise UnsupportedError(
            f"{where}: param group {gi} has lr {hp['lr']!r}, and the LR scheduler written set it last to "
            f"{last[gi]!r}; the resumed run would step from the scheduler's, not the state's"
        )
    base = base_lr(scheduler, gi)
    return {**hp, **({"initial_lr": base} if base is not None else {})}


def optimizer_state_dict(
    state: OptimizerState,
    groups: Sequence[tuple[Mapping[str, Any], Sequence[str]]],
    renamed: Mapping[str, str] | None = None,
    *,
    param_names: bool = True,
) -> dict[str, Any]:
    """The ``Optimizer.state_dict()`` the target's optimizer loads: ``groups`` its param groups in order, each
    ``(hyperparameters, the state's names of its parameters in the optimizer's order)``, numbered one after the
    other; each parameter's entry the state's (:func:`.state_dict.param_entry`, ``step`` in :func:`step_dtype`),
    ``param_names`` the model's names (``renamed``) unless ``param_names`` is false. Every tracked parameter once.

    >>> from optstate.schema import ParamInfo
    >>> params = tuple(ParamInfo((n,), (1,), "float64", 0) for n in "ab")
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), params,
    ...     {("momentum", ("a",)): np.ones(1), ("momentum", ("b",)): np.zeros(1)})
    >>> sd = optimizer_state_dict(s, [({"lr": 0.1}, ["b", "a"])], {"a": "m.a", "b": "m.b"})
    >>> sd["param_groups"], sd["state"][1]["momentum_buffer"].tolist()
    ([{'lr': 0.1, 'params': [0, 1], 'param_names': ['m.b', 'm.a']}], [1.0])
    """
    listed = [name for _, names in groups for name in names]
    tracked = [path_to_name(p.path) for p in state.params]
    if sorted(listed) != sorted(tracked):
        raise MappingError(
            f"the optimizer's groups hold {sorted(set(listed) ^ set(tracked))[:5]} once too often or not at all; "
            "each tracked parameter is written once"
        )
    dtype = step_dtype(state)
    out_groups, entries, index = [], {}, 0
    for hp, names in groups:
        group = {**hp, "params": list(range(index, index + len(names)))}
        if param_names:
            group["param_names"] = [(renamed or {}).get(n, n) for n in names]
        out_groups.append(group)
        for name in names:
            entry = torch_dict.param_entry(state, state.param(name_to_path(name)), dtype)
            if entry:
                entries[index] = entry
            index += 1
    return {"state": entries, "param_groups": out_groups}


# ----------------------------------------------------------------------------- the step


def written_step(state: OptimizerState, requested: int | None, where: str) -> int:
    """The optimizer steps the state has taken, as a trainer's resume counts them: the one step every
    parameter with a count shares (an optimizer that counts them and holds no state yet: 0), else the carried
    LR scheduler's ``last_epoch`` (stepped once per optimizer step); ``requested`` (``--step``) must agree
    with what is known, and gives it where nothing is. Parameters at different steps, a scheduler at
    another count, or no count at all are refused.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float32", 0),), {})
    >>> written_step(s, 3, "out")
    3
    >>> written_step(s, None, "out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: out: SGD keeps no step count and the state carries no LR scheduler ...
    """
    steps = {path_to_name(p.path): p.step for p in state.params if p.step is not None}
    if len(set(steps.values())) > 1:
        (a, x), (b, y) = sorted(steps.items(), key=lambda kv: kv[1])[:: len(steps) - 1]
        raise UnsupportedError(
            f"{where}: {a} has taken {x} optimizer steps and {b} {y}; a trainer resumes at one global step"
        )
    known: dict[str, int] = {}
    if steps:
        known["the optimizer's step count"] = next(iter(steps.values()))
    elif state.spec.has_step:
        known["the optimizer's step count"] = 0  # no parameter stepped yet: torch creates the state on the first
    if state.metadata.lr_scheduler is not None:
        known["the LR scheduler's last_epoch"] = int(last_epoch(state.metadata.lr_scheduler))
    if requested is not None:
        known["--step"] = requested
    if len(set(known.values())) > 1:
        raise UnsupportedError(f"{where}: the steps disagree: {', '.join(f'{k} {v}' for k, v in known.items())}")
    if not known:
        raise OptstateError(
            f"{where}: {state.spec.torch_class} keeps no step count and the state carries no LR scheduler to count "
            "them; say how many optimizer steps were taken: --step N"
        )
    step = next(iter(known.values()))
    if step < 0:
        raise OptstateError(f"{where}: step {step}: a run resumes after 0 optimizer steps or more")
    return step


# ----------------------------------------------------------------------------- the output


@contextmanager
def write_directory(path: str | os.PathLike, options: WriteOptions) -> Iterator[Callable[[Any, str], None]]:
    """A checkpoint directory written whole: yields ``save(obj, relative_name)``, which writes a torch file
    (:func:`.ptfile.save`), a ``.safetensors`` file of a mapping of arrays (as torch saves a model), or a
    ``str``/``bytes`` as it is, inside a temporary directory that is fsynced once, read back
    (:func:`.readback.read_back_directory`) and renamed to ``path`` when the block ends
    (:func:`optstate.atomic.atomic_directory`); nothing is left behind on an error.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> with write_directory(out, WriteOptions(fsync=False)) as save:
    ...     save({"a": 1}, "sub/a.pt"); save("global_step1", "latest")
    >>> sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    ['latest', 'sub', 'sub/a.pt']
    """
    written: dict[str, Written] = {}
    with atomic_directory(
        path,
        force=options.force,
        fsync=options.fsync,
        read_back=lambda tmp: read_back_directory(tmp, written, Path(path)),
    ) as tmp:
        tmp.mkdir()

        def save(obj: Any, name: str) -> None:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(obj, (str, bytes)):
                data = obj.encode() if isinstance(obj, str) else obj
                target.write_bytes(data)
                written[name] = written_bytes(data)
            elif target.suffix == ".safetensors":
                write_safetensors(target, obj.items(), {"format": "pt"}, fsync=False, progress=options.progress)
                written[name] = written_safetensors(target)
            else:  # fsynced with the whole tree before the rename
                written[name] = written_torch(ptfile.save(obj, target, fsync=False, progress=options.progress))

        yield save
