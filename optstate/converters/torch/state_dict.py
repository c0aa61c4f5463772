"""torch ``state_dict``s and checkpoints whose tensors are NumPy arrays, to and from the canonical state; no torch.

:mod:`optstate.converters.torch.live` hands over what it read with torch (tensors as arrays) and turns
:func:`state_dict_arrays` into tensors; :func:`from_torch_file` and :func:`save_torch_file` read and
write a ``torch.save`` file themselves, through :mod:`.ptfile`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ...errors import FormatError, MappingError, UnsupportedError
from ...schema.families import OptimizerSpec, optimizer_spec
from ...schema.fileformat import refuse_special_file
from ...schema.state import (
    Deferred,
    Metadata,
    OptimizerState,
    ParamInfo,
    name_to_path,
    numpy_dtype,
    path_to_name,
    values_checked_beside,
)
from ..formats import ReadOptions, WriteOptions
from . import ptfile

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_state", "opt")
MODEL_KEYS = ("model", "model_state_dict", "state_dict", "model_state", "weights")
SCHEDULER_KEYS = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")
# Tensors of torch modules that are buffers, not parameters (BatchNorm / InstanceNorm statistics).
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

# Keys of a param group that identify the torch optimizer class, checked in order.
TORCH_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (cls, frozenset(keys))
    for cls, keys in (
        ("SGD", ("momentum", "dampening", "nesterov")),
        ("Adam", ("betas", "amsgrad")),
        ("NAdam", ("momentum_decay",)),
        ("Adafactor", ("beta2_decay",)),
        ("RAdam", ("betas", "decoupled_weight_decay")),
        ("Adamax", ("betas", "weight_decay")),
        ("SparseAdam", ("betas",)),
        ("RMSprop", ("alpha", "centered")),
        ("Adagrad", ("lr_decay", "initial_accumulator_value")),
        ("Adadelta", ("rho",)),
        ("ASGD", ("lambd", "t0")),
        ("Rprop", ("etas", "step_sizes")),
        ("LBFGS", ("history_size",)),
        ("Muon", ("ns_coefficients",)),
    )
)

# What torch's Tensor.is_floating_point() admits beyond NumPy's floating kinds.
_ML_FLOATS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})  # ml_dtypes' names (imported only for them)


def is_floating(dtype: np.dtype) -> bool:
    """Whether torch counts the dtype as floating point (bfloat16 and float8 included).

    >>> is_floating(numpy_dtype("bfloat16")), is_floating(np.dtype("int64"))
    (True, False)
    """
    return dtype.kind == "f" or (dtype.name in _ML_FLOATS and numpy_dtype(dtype.name) == dtype)


# ----------------------------------------------------------------------------- values


def plain_scheduler_state(value: Any) -> Any:
    """A scheduler state dict with 0-d arrays as Python numbers, tuples as lists (Counters kept).

    >>> plain_scheduler_state({"last_epoch": np.array(3), "base_lrs": (0.1,)})
    {'last_epoch': 3, 'base_lrs': [0.1]}
    """
    if isinstance(value, np.ndarray):
        return value.item()
    if isinstance(value, Counter):
        return value
    if isinstance(value, Mapping):
        return {k: plain_scheduler_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_scheduler_state(v) for v in value]
    return value


def hyperparam_value(value: Any) -> Any:
    """A param group's value as a Python number (tuples kept); a float tensor only when float64.

    >>> hyperparam_value(np.array(0.1)), hyperparam_value([0.9, 0.999])
    (0.1, (0.9, 0.999))
    """
    if isinstance(value, np.ndarray):
        # torch accepts a tensor lr and then computes in its dtype; only float64 survives as a Python float.
        if is_floating(value.dtype) and value.dtype != np.float64:
            raise UnsupportedError(
                f"a {value.dtype} tensor hyperparameter ({value.item()!r}): torch "
                "computes with it in that dtype, Optax and the canonical file in float64"
            )
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(hyperparam_value(v) for v in value)
    return value


# ----------------------------------------------------------------------------- checkpoints


def is_optimizer_state_dict(obj: Any) -> bool:
    """Whether ``obj`` looks like ``Optimizer.state_dict()``.

    >>> is_optimizer_state_dict({"state": {}, "param_groups": []}), is_optimizer_state_dict({"w": np.zeros(1)})
    (True, False)
    """
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def is_array(value: Any) -> bool:
    """Whether ``value`` is what a tensor became: a NumPy array, or a tensor left on its device.

    >>> is_array(np.zeros(1)), is_array([0.0])
    (True, False)
    """
    return isinstance(value, (np.ndarray, Deferred))


def is_tensor_dict(obj: Any) -> bool:
    """Whether ``obj`` looks like ``Module.state_dict()``: names to arrays.

    >>> is_tensor_dict({"w": np.zeros(1)}), is_tensor_dict({"epoch": 3})
    (True, False)
    """
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and is_array(v) for k, v in obj.items())


def split_checkpoint(obj: Any, source: str) -> tuple[Mapping | None, Mapping | None, Mapping | list | None]:
    """``(optimizer state_dict, model state_dict, scheduler state_dict)`` found in a checkpoint (a list of
    scheduler state_dicts where Lightning saved several).

    >>> sd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    >>> split_checkpoint({"optimizer": sd, "model": {"w": np.zeros(2)}}, "ckpt.pt")[1]
    {'w': array([0., 0.])}
    """
    if is_optimizer_state_dict(obj):
        return obj, None, None
    if is_tensor_dict(obj):
        return None, obj, None
    if not isinstance(obj, Mapping):
        held = "tensor" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise FormatError(f"{source}: holds a {held}, not a state_dict or a checkpoint dict")
    optimizer = next((obj[k] for k in OPTIMIZER_KEYS if is_optimizer_state_dict(obj.get(k))), None)
    if optimizer is None:
        optimizer = _only_one(obj, "optimizer_states", "optimizers", source)
        if optimizer is not None and not is_optimizer_state_dict(optimizer):
            raise FormatError(
                f"{source}: 'optimizer_states' holds a {type(optimizer).__name__} with keys "
                f"{sorted(map(str, optimizer))}, not an optimizer state_dict"
            )
    model = next((obj[k] for k in MODEL_KEYS if is_tensor_dict(obj.get(k))), None)
    scheduler = next((obj[k] for k in SCHEDULER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if scheduler is None:
        scheduler = _lightning_schedulers(obj)
    if optimizer is None and model is None:
        raise FormatError(
            f"{source}: no optimizer state_dict (keys {', '.join(OPTIMIZER_KEYS)}) and no model "
            f"weights (keys {', '.join(MODEL_KEYS)}); top-level keys: {sorted(map(str, obj))}"
        )
    return optimizer, model, scheduler


def _only_one(checkpoint: Mapping, key: str, what: str, source: str) -> Mapping | None:
    """The one state_dict in a list that PyTorch Lightning saves under ``key`` (``optimizer_states``: one
    entry per optimizer), ``None`` where there is none; two optimizers are two states, refused.

    >>> _only_one({"optimizer_states": [{"state": {}}]}, "optimizer_states", "optimizers", "run.ckpt")
    {'state': {}}
    """
    entries = checkpoint.get(key)
    if not isinstance(entries, (list, tuple)) or not entries:
        return None
    if len(entries) > 1 or not isinstance(entries[0], Mapping):
        raise UnsupportedError(f"{source}: {key!r} holds {len(entries)} {what}; optstate converts one")
    return entries[0]


def _lightning_schedulers(checkpoint: Mapping) -> Mapping | list | None:
    """The scheduler state PyTorch Lightning saves under ``lr_schedulers`` (one per scheduler): the one
    state_dict, or the list where there are several (refused where a conversion needs the schedule,
    :func:`state_from_checkpoint`, but still shown by ``inspect``).

    >>> _lightning_schedulers({"lr_schedulers": [{"last_epoch": 3}]}), _lightning_schedulers({})
    ({'last_epoch': 3}, None)
    """
    entries = checkpoint.get("lr_schedulers")
    if not isinstance(entries, (list, tuple)) or not entries:
        return None
    return entries[0] if len(entries) == 1 and isinstance(entries[0], Mapping) else list(entries)


def check_state_dict(sd: Any, source: str) -> None:
    """Refuse a malformed optimizer state_dict with a message, before anything indexes into it.

    >>> check_state_dict({"state": {5: {}}, "param_groups": [{"params": [0]}]}, "ckpt.pt")
    Traceback (most recent call last):
    optstate.errors.FormatError: ckpt.pt: state for parameter indices [5] that no param group holds
    """
    groups = sd.get("param_groups") if isinstance(sd, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not groups or not isinstance(sd.get("state"), Mapping):
        raise FormatError(f"{source}: not an optimizer state_dict (needs 'state' and a non-empty 'param_groups')")
    indices = []
    for gi, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise FormatError(f"{source}: param group {gi} has no 'params' list")
        indices.extend(group["params"])
    if len(set(indices)) != len(indices):
        raise FormatError(f"{source}: a parameter index occurs in two param groups")
    bad = [i for i, entry in sd["state"].items() if not isinstance(entry, Mapping)]
    if bad:
        raise FormatError(
            f"{source}: the state of parameter index {bad[0]} is a "
            f"{type(sd['state'][bad[0]]).__name__}, expected a dict"
        )
    orphans = sorted(set(sd["state"]) - set(indices), key=str)
    if orphans:
        raise FormatError(f"{source}: state for parameter indices {orphans[:5]} that no param group holds")


# ----------------------------------------------------------------------------- naming parameters


def torch_class_of(group: Mapping[str, Any], hint: str | None = None) -> str:
    """The torch optimizer class whose param groups carry these keys (``hint``: the class, when known).

    >>> torch_class_of({"lr": 0.1, "betas": (0.9, 0.999), "amsgrad": False, "decoupled_weight_decay": True})
    'AdamW'
    """
    for cls, keys in TORCH_SIGNATURES:
        if keys <= group.keys():
            if cls != "Adam":
                return cls
            if "decoupled_weight_decay" in group:
                return "AdamW" if group["decoupled_weight_decay"] else "Adam"
            # Before torch 2.6, Adam and AdamW groups had the same keys; only weight decay tells them apart.
            if hint in ("Adam", "AdamW") or not group.get("weight_decay"):
                return hint or "Adam"
            raise UnsupportedError(
                "Adam and AdamW param groups look alike in checkpoints of torch before 2.6, and "
                "they decay weights differently; name it (optimizer='adam'|'adamw', --optimizer)"
            )
    raise UnsupportedError(
        f"cannot tell which optimizer wrote a param group with keys {sorted(group)}; "
        "name it (optimizer=..., --optimizer)"
    )


def optimizer_family(sd: Mapping, optimizer: str | None, source: str, live_class: str | None = None) -> OptimizerSpec:
    """The spec of the optimizer that wrote ``sd``: the one named, checked against the param groups.

    >>> optimizer_family({"param_groups": [{"lr": 0.1, "rho": 0.9}]}, None, "ckpt.pt").name
    'adadelta'
    """
    hint = optimizer_spec(optimizer).torch_class if optimizer else live_class
    written_by = torch_class_of(sd["param_groups"][0], hint)
    spec = optimizer_spec(optimizer or written_by)
    if optimizer is not None and optimizer_spec(written_by).name != spec.name:
        raise UnsupportedError(f"{source}: optimizer={optimizer!r} but the param groups are {written_by}'s")
    return spec


def is_buffer(name: str, array: np.ndarray) -> bool:
    """Whether a model tensor is a buffer (BatchNorm statistics, integer counters), not a parameter.

    >>> is_buffer("bn.running_mean", np.zeros(2)), is_buffer("fc.weight", np.zeros(2))
    (True, False)
    """
    return name.rsplit(".", 1)[-1] in BUFFER_NAMES or not is_floating(array.dtype)


def _align_by_position(
    count: int, shapes: Sequence[tuple[int, ...] | None], candidates: Sequence[tuple[str, tuple[int, ...]]], origin: str
) -> list[str]:
    """Names for the optimizer's tensors from the trainable tensors of the model, in registration order.

    The rule: the optimizer tracks exactly the candidates, in the same order (as
    ``Optimizer(model.parameters())`` does), and every shape known from the state agrees.
    """
    if count != len(candidates):
        raise MappingError(
            f"the optimizer tracks {count} tensors and {origin} has {len(candidates)} trainable tensors, so "
            "parameter names cannot be inferred by position; save the optimizer with param_names "
            "(build it from model.named_parameters()) or pass the model (--model module:function, model= in Python) "
            "with requires_grad set as in training"
        )
    for index, (shape, (name, expected)) in enumerate(zip(shapes, candidates, strict=True)):
        if shape is not None and shape != expected:
            raise MappingError(
                f"optimizer tensor {index} has state of shape {list(shape)} but {origin}'s tensor {index} "
                f"({name}) has shape {list(expected)}: the optimizer was not built from the model's parameters "
                "in registration order; save it with param_names, or pass the model "
                "(--model module:function, model= in Python) with requires_grad set as in training"
            )
    return [name for name, _ in candidates]


def _shape_from_slots(spec: OptimizerSpec, arrays: Mapping[str, Any]) -> tuple[tuple[int, ...], Any] | None:
    """The parameter's shape and dtype, read off its slots (``arrays`` by torch key); None when they cannot tell."""
    by_shape = {s.shape: arrays[s.torch_key] for s in spec.slots if arrays.get(s.torch_key) is not None}
    if "param" in by_shape:
        return tuple(by_shape["param"].shape), by_shape["param"].dtype
    if "rows" in by_shape and "cols" in by_shape:
        return (*by_shape["rows"].shape[:-1], by_shape["cols"].shape[-1]), by_shape["rows"].dtype
    return None


def _state_shapes(sd: Mapping, spec: OptimizerSpec) -> list[tuple[int, ...] | None]:
    indices = (i for g in sd["param_groups"] for i in g["params"])
    return [(_shape_from_slots(spec, sd["state"].get(i, {})) or (None,))[0] for i in indices]


def param_names(
    sd: Mapping,
    spec: OptimizerSpec,
    *,
    model: Any = None,
    weights: Mapping[str, np.ndarray] | None = None,
    source: str = "state_dict",
) -> list[str]:
    """One name per tracked tensor, in the order of ``param_groups``.

    From ``param_names`` when saved; else aligned by position (single param group only) with
    ``model.named_parameters()`` (those with ``requires_grad``) or with the floating-point,
    non-buffer tensors of the checkpoint's weights; else ``"0"``, ``"1"``, ... with a warning.

    >>> sd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    >>> param_names(sd, optimizer_spec("sgd"), weights={"w": np.zeros(2), "b": np.zeros(1)})
    ['w', 'b']
    """
    groups = sd["param_groups"]
    count = sum(len(g["params"]) for g in groups)
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        if len(names) != count or len(set(names)) != count:
            raise FormatError(f"{source}: param_names do not name each tracked tensor once")
        return names
    if model is not None:
        candidates = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        origin = "the model"
    elif weights is not None:
        candidates = [(n, tuple(a.shape)) for n, a in weights.items() if not is_buffer(n, a)]
        origin = f"{source}'s model weights"
    else:
        warnings.warn(
            f"{source}: the optimizer has no param_names and no model weights are known; parameters "
            "are named by position ('0', '1', ...); pass the model (--model module:function, model= in Python) "
            "to name them",
            stacklevel=3,
        )
        return [str(i) for i in range(count)]
    if len(groups) > 1:
        raise MappingError(
            f"{source}: the optimizer has {len(groups)} param groups and no param_names; the order of the "
            "groups' tensors cannot be matched to the model by position; save the optimizer with param_names "
            "(build its groups from model.named_parameters()), or convert the live optimizer in Python: "
            "optstate.from_torch(optimizer, model=model)"
        )
    return _align_by_position(count, _state_shapes(sd, spec), candidates, origin)


# ----------------------------------------------------------------------------- state_dict -> canonical


_FLOAT32_EXACT_STEPS = 2**24  # float32 holds every integer up to 2^24, not every one past it


def _read_step(entry: Mapping[str, Any], where: str) -> int | None:
    if "step" not in entry:
        return None
    step = entry["step"]
    if not (isinstance(step, (int, float)) or (isinstance(step, np.ndarray) and step.size == 1)):
        raise FormatError(f"{where}: step is {type(step).__name__}, expected a number")
    value = float(step.reshape(()) if isinstance(step, np.ndarray) else step)
    if not value.is_integer() or value < 0:
        raise FormatError(f"{where}: step {value} is not a non-negative integer")
    if isinstance(step, np.ndarray) and step.dtype == np.float32 and value > _FLOAT32_EXACT_STEPS:
        warnings.warn(
            f"{where}: step {int(value)} is a float32 above 2^24 = {_FLOAT32_EXACT_STEPS}, where float32 "
            "skips integers: torch's own count may have stopped advancing or been rounded; it is carried as stored",
            stacklevel=2,
        )
    return int(value)


def _step_or_assumed(
    step: int | None, slots: Mapping[str, Any], spec: OptimizerSpec, where: str, assume_step: int | None
) -> int | None:
    """A parameter's step; where the optimizer keeps one and the state has slots but no step, the user's
    ``assume_step``, else refused: with no step the bias correction would restart, silently."""
    if step is not None or not spec.has_step or not slots:
        return step
    if assume_step is None:
        raise FormatError(
            f"{where}: {spec.torch_class} state without 'step' (its slots: "
            f"{', '.join(spec.slot(name).torch_key for name in slots)}); the step count cannot be known from "
            "the file: pass the number of steps taken (--assume-step N, assume_step=N)"
        )
    if type(assume_step) is not int or assume_step < 0:
        raise FormatError(f"assume_step is {assume_step!r}, expected a non-negative integer")
    return assume_step


def _read_param(spec: OptimizerSpec, entry: Any, where: str) -> tuple[int | None, dict[str, np.ndarray]]:
    if not isinstance(entry, Mapping):
        raise FormatError(f"{where}: state is a {type(entry).__name__}, expected a dict")
    known = {"step"} | {s.torch_key for s in spec.slots}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UnsupportedError(
            f"{where}: state key(s) {unknown} are not part of {spec.torch_class} as optstate supports it"
        )
    slots = {}
    for slot in spec.slots:
        value = entry.get(slot.torch_key)
        if value is not None and not is_array(value):
            raise FormatError(f"{where}: {slot.torch_key} is a {type(value).__name__}, expected a tensor")
        if value is not None:
            slots[slot.name] = value
    return _read_step(entry, where), slots


def _tied(weights: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Names that view another name's memory the same way (tied weights: GPT-2's ``lm_head.weight`` and its
    word embeddings), mapped to the first name: the one ``named_parameters()`` gives. Hugging Face's
    ``save_pretrained`` leaves the others out too, and ``tie_weights()`` ties them again on loading."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, a in weights.items():  # a tensor left on its device is one object however often it occurs
        key = (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype) if isinstance(a, np.ndarray) else id(a)
        if a.size and key in first:
            tied[name] = first[key]
        first.setdefault(key, name)
    return tied


def _check_weights(names: Sequence[str], weights: Mapping[str, np.ndarray], source: str) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        example = next(iter(weights), "")
        raise MappingError(
            f"{source}: the optimizer's parameter {missing[0]!r} is not among the model weights "
            f"(e.g. {example!r}); a prefix such as 'module.' or '_orig_mod.' differs?"
        )
    tracked = set(names)
    for name, target in _tied(weights).items():
        if {name, target} & tracked:
            raise UnsupportedError(
                f"{source}: {name!r} is tied to {target!r} (the same tensor); an Optax "
                "parameter tree has no tied leaves, so training would untie them"
            )


def _state_from_state_dict(
    sd: Mapping,
    names: Sequence[str],
    spec: OptimizerSpec,
    weights: Mapping[str, np.ndarray] | None,
    buffers: Iterable[str],
    source: str,
    metadata: Metadata,
    shapes: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    assume_step: int | None = None,
) -> OptimizerState:
    """``shapes`` gives ``name -> (shape, dtype)`` for parameters that may have no state (a live optimizer);
    ``assume_step`` is the step of parameters whose state has none (see :func:`state_from_checkpoint`)."""
    if weights is not None:
        _check_weights(names, weights, source)
    weights_np = None if weights is None else {name_to_path(n): a for n, a in weights.items()}
    params, slots, hyperparams = [], {}, []
    name_iter = iter(names)
    for gi, group in enumerate(sd["param_groups"]):
        where = f"{source}: param group {gi}"
        try:
            hp = {k: hyperparam_value(v) for k, v in group.items() if k not in ("params", "param_names")}
        except UnsupportedError as exc:
            raise UnsupportedError(f"{where}: {exc}") from None
        spec.check_supported(hp, where)
        hyperparams.append(hp)
        for index in group["params"]:
            name = next(name_iter)
            path = name_to_path(name)
            where = f"{source}: {name}"
            step, param_slots = _read_param(spec, sd["state"].get(index, {}), where)
            step = _step_or_assumed(step, param_slots, spec, where, assume_step)
            from_slots = _shape_from_slots(spec, {spec.slot(k).torch_key: a for k, a in param_slots.items()})
            weight = None if weights_np is None else weights_np.get(path)
            if from_slots is not None and weight is not None and weight.shape != from_slots[0]:
                raise MappingError(
                    f"{where}: state has shape {list(from_slots[0])}, the model weight {list(weight.shape)}"
                )
            if from_slots is None and weight is not None:
                from_slots = weight.shape, weight.dtype
            if from_slots is not None:
                shape, dtype = tuple(from_slots[0]), str(from_slots[1])
            elif shapes is not None and name in shapes:
                shape, dtype = shapes[name]
            else:
                raise MappingError(
                    f"{where}: no state and no weight, so its shape is unknown; "
                    "pass the model (--model module:function, model= in Python) or a checkpoint holding the weights"
                )
            params.append(ParamInfo(path, shape, dtype, gi, step))
            slots.update({(slot, path): array for slot, array in param_slots.items()})
    try:
        with values_checked_beside(source):
            return OptimizerState(
                spec.name,
                tuple(hyperparams),
                tuple(params),
                slots,
                weights_np,
                tuple(name_to_path(b) for b in buffers),
                metadata,
            )
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None


def state_from_checkpoint(
    checkpoint: Any,
    source: str,
    *,
    origin: str,
    optimizer: str | None = None,
    model: Any = None,
    weights: Mapping[str, np.ndarray] | None = None,
    buffers: Sequence[str] | None = None,
    scheduler_state: Mapping | None = None,
    live_class: str | None = None,
    shapes: Sequence[tuple[tuple[int, ...], str]] | None = None,
    assume_step: int | None = None,
) -> OptimizerState:
    """The canonical state of an optimizer ``state_dict`` or a training checkpoint holding one (arrays).

    What a live torch object knows overrides the checkpoint: ``weights`` and ``buffers`` (names) of
    a model, which also names parameters by ``model.named_parameters()``; a scheduler's state; the
    optimizer's class (``live_class``) and its parameters' ``(shape, dtype name)`` in the order of
    ``param_groups`` (``shapes``: for parameters that have no state yet). ``origin`` goes in the
    metadata as ``source``. A state whose optimizer keeps a step but whose entries have none is refused,
    naming the parameter, unless ``assume_step`` gives it (on the user's word).

    >>> sd = {"state": {0: {"momentum_buffer": np.ones(2)}},
    ...       "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False,
    ...                         "weight_decay": 0, "params": [0], "param_names": ["w"]}]}
    >>> state = state_from_checkpoint({"optimizer": sd}, "ckpt.pt", origin="torch")
    >>> state.optimizer, state.slots[("momentum", ("w",))].tolist()
    ('sgd', [1.0, 1.0])
    """
    sd, saved_weights, saved_scheduler = split_checkpoint(checkpoint, source)
    if sd is None:
        raise FormatError(f"{source}: holds model weights only, no optimizer state")
    check_state_dict(sd, source)
    if weights is None:
        weights = saved_weights
        buffers = [n for n, a in (weights or {}).items() if is_buffer(n, a)]
    if weights is not None:  # a tied tensor is one parameter: named once, as named_parameters() and the optimizer do
        aliases = _tied(weights)
        weights = {n: a for n, a in weights.items() if n not in aliases}
        buffers = [n for n in buffers or () if n not in aliases]
    if scheduler_state is None and isinstance(saved_scheduler, list):
        # Two schedulers on one optimizer both set its lr: no one schedule says what it does next.
        raise UnsupportedError(
            f"{source}: 'lr_schedulers' holds {len(saved_scheduler)} LR schedulers; "
            "optstate converts an optimizer driven by one"
        )
    if scheduler_state is None and isinstance(saved_scheduler, Mapping):
        scheduler_state = saved_scheduler
    metadata = Metadata(
        source=origin, lr_scheduler=None if scheduler_state is None else plain_scheduler_state(scheduler_state)
    )
    spec = optimizer_family(sd, optimizer, source, live_class)
    names = param_names(sd, spec, model=model, weights=weights, source=source)
    return _state_from_state_dict(
        sd,
        names,
        spec,
        weights,
        buffers or (),
        source,
        metadata,
        shapes=None if shapes is None else dict(zip(names, shapes, strict=True)),
        assume_step=assume_step,
    )


def from_torch_file(
    path: str | os.PathLike, *, optimizer: str | None = None, model: Any = None, assume_step: int | None = None
) -> OptimizerState:
    """Read a ``torch.save`` checkpoint into the canonical form without torch (:func:`read_torch_file`).

    The same as ``optstate.from_torch(path)``, through :func:`optstate.converters.torch.ptfile.load`:
    arrays are mapped from the file, not read into memory. ``model`` (a torch module, a ``module:function``
    or a Hugging Face model directory) names the parameters where the file does not; ``assume_step``:
    see :func:`state_from_checkpoint`.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp(); net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(net.named_parameters(), lr=1e-3)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> torch.save({"optimizer": opt.state_dict(), "model": net.state_dict()}, f"{d}/c.pt")
    >>> state = from_torch_file(f"{d}/c.pt")
    >>> state.optimizer, state.common_step(), state.params[0].dtype
    ('adam', 1, 'float32')
    """
    source = os.fspath(path)
    return state_from_checkpoint(
        read_torch_file(source),
        source,
        origin="torch",
        optimizer=optimizer,
        model=torch_model(model),
        assume_step=assume_step,
    )


def torch_model(spec: Any) -> Any:
    """The torch model ``spec`` names (:func:`optstate.converters.torch.models.load_model`), ``None`` for
    ``None``; torch is imported only when there is a model to build.

    >>> torch_model(None) is None
    True
    """
    if spec is None:
        return None
    from .models import load_model  # torch: only a caller that names a model needs it

    return load_model(spec)


def read_torch_file(path: str | os.PathLike) -> Any:
    """A ``torch.save`` file's objects with NumPy arrays for tensors: the zip format without torch
    (:func:`optstate.converters.torch.ptfile.load`); the legacy format (torch < 1.6) through
    ``torch.load(weights_only=True)`` where torch is installed, else refused with the way out.
    """
    source = os.fspath(path)
    refuse_special_file(source)  # zipfile.is_zipfile would block on a FIFO
    # Only a file that starts like torch's legacy format goes to torch.load: anything else (a text file
    # named x.pt) would end in an unpickler's KeyError there; ptfile names the file and what is wrong.
    if (
        zipfile.is_zipfile(source)
        or not _starts_like_legacy_format(source)
        or importlib.util.find_spec("torch") is None
    ):
        return ptfile.load(source)
    torch_adapter = _legacy_format_reader()
    return torch_adapter.numpy_tree(torch_adapter.load_checkpoint(source), copy=False)


def _starts_like_legacy_format(source: str) -> bool:
    """Whether the file at ``source`` begins with the bytes every torch < 1.6 ``torch.save`` file begins with.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".pt") as f:
    ...     _ = f.write(b"hello"); f.flush()
    ...     _starts_like_legacy_format(f.name)
    False
    """
    try:
        with open(source, "rb") as f:
            return f.read(len(ptfile._LEGACY_MAGIC)) == ptfile._LEGACY_MAGIC
    except OSError:
        return False  # missing or unreadable: ptfile.load says which, naming the file


def _legacy_format_reader() -> ModuleType:
    """The torch adapter (:mod:`optstate.converters.torch.live`), the one use of torch in this module.

    Imported here, lazily, not at the top: this module reads and writes torch files with NumPy alone,
    and only the legacy format (torch < 1.6), a bare pickle stream whose storages only ``torch.load``
    can lay out, needs torch itself.
    """
    from .. import adapter

    return adapter("torch")


# ----------------------------------------------------------------------------- canonical -> state_dict


def refuse_optax_native(spec: OptimizerSpec) -> None:
    """Refuse an optimizer that torch.optim does not have (one of Optax's own)."""
    if not spec.in_torch:
        raise UnsupportedError(
            f"{spec.torch_class} is an Optax optimizer with no torch.optim counterpart; "
            "it converts to the canonical file and back to Optax only"
        )


def param_entry(state: OptimizerState, info: ParamInfo, step_dtype: Any = np.float32) -> dict[str, Any]:
    """One parameter's entry of ``state_dict()["state"]``: ``step`` (a 0-d ``step_dtype`` array) and its
    slots under their torch keys, the state's arrays themselves (lazy ones left lazy); ``{}`` without state.

    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
    >>> param_entry(s, s.params[0])
    {'momentum_buffer': array([1., 1.])}
    """
    spec = state.spec
    present = {s.name: state.slots[(s.name, info.path)] for s in spec.slots if (s.name, info.path) in state.slots}
    if not present:
        if spec.has_step and info.step:
            raise FormatError(f"{path_to_name(info.path)}: step {info.step} but no slots")
        return {}
    missing = [
        s.name
        for s in spec.active_slots(state.param_groups[info.group])
        if s.applies(info.shape) and s.name not in present
    ]
    if missing:
        raise FormatError(f"{path_to_name(info.path)}: slot(s) {missing} missing")
    narrow = [name for name, a in present.items() if not spec.slot(name).scalar and str(a.dtype) != info.dtype]
    if narrow:
        raise UnsupportedError(
            f"{path_to_name(info.path)}: {narrow[0]} is {present[narrow[0]].dtype}, the parameter "
            f"{info.dtype}; torch keeps it in the parameter's dtype, so loading would cast it"
        )
    entry: dict[str, Any] = {}
    if spec.has_step:
        entry["step"] = np.array(float(info.step or 0), dtype=step_dtype)
    entry.update({spec.slot(name).torch_key: a for name, a in present.items()})
    return entry


def state_dict_arrays(
    state: OptimizerState, *, names: Sequence[str] | None = None, step_dtype: Any = np.float32
) -> dict[str, Any]:
    """The optimizer ``state_dict`` for ``state`` (see ``optstate.to_torch_state_dict``), arrays for tensors.

    Parameters are in the state's order unless ``names`` gives another (every tracked name once);
    each group holds its hyperparameters (torch's defaults filled in), ``params`` and ``param_names``.
    ``step`` is ``float32``, as torch keeps it, unless ``step_dtype`` says otherwise (torch uses
    float64 under ``torch.set_default_dtype(torch.float64)``).

    >>> s = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("w",), (2,), "float32", 0, 3),),
    ...     {("first_moment", ("w",)): np.ones(2, np.float32), ("second_moment", ("w",)): np.ones(2, np.float32)})
    >>> sd = state_dict_arrays(s)
    >>> sd["param_groups"][0]["param_names"], sd["state"][0]["step"], sorted(sd["state"][0])
    (['w'], array(3., dtype=float32), ['exp_avg', 'exp_avg_sq', 'step'])
    """
    refuse_optax_native(state.spec)
    order = [p.path for p in state.params] if names is None else [name_to_path(n) for n in names]
    if sorted(order) != sorted(p.path for p in state.params):
        raise MappingError("names must list every tracked parameter exactly once")
    by_path = {p.path: p for p in state.params}
    groups = [dict(state.spec.with_defaults(hp), params=[], param_names=[]) for hp in state.param_groups]
    sd_state = {}
    for index, path in enumerate(sorted(order, key=lambda p: by_path[p].group)):
        info = by_path[path]
        groups[info.group]["params"].append(index)
        groups[info.group]["param_names"].append(path_to_name(path))
        entry = param_entry(state, info, step_dtype)
        if entry:
            sd_state[index] = entry
    return {"state": sd_state, "param_groups": groups}


def save_torch_file(
    state: OptimizerState,
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
    step_dtype: Any = np.float32,
) -> None:
    """Write ``{"optimizer": state_dict, "model": weights, "lr_scheduler": ...}`` as a ``torch.save`` file,
    atomically, one tensor at a time, without torch (:func:`optstate.converters.torch.ptfile.save`).

    ``"model"`` when the state holds weights, ``"lr_scheduler"`` when it carries a torch scheduler's
    state. The file loads with ``torch.load(path, weights_only=True)``. ``progress(nbytes)`` is
    called after each tensor; ``step_dtype``: see :func:`state_dict_arrays`.

    >>> import tempfile
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
    >>> path = tempfile.mkdtemp() + "/c.pt"
    >>> save_torch_file(s, path)
    >>> ptfile.load(path)["optimizer"]["state"][0]["momentum_buffer"].tolist()
    [1.0, 1.0]
    """
    checkpoint: dict[str, Any] = {"optimizer": state_dict_arrays(state, step_dtype=step_dtype)}
    if state.weights is not None:
        checkpoint["model"] = {path_to_name(p): a for p, a in state.weights.items()}
    if state.metadata.lr_scheduler is not None:
        checkpoint["lr_scheduler"] = dict(state.metadata.lr_scheduler)
    elif state.metadata.schedule_count is not None:
        warnings.warn(
            f"the Optax state follows a schedule (count {state.metadata.schedule_count}) that is not "
            "saved; restore your torch scheduler with optstate.to_torch(state, optimizer, "
            "scheduler=...)",
            stacklevel=2,
        )
    ptfile.save(checkpoint, path, force=force, fsync=fsync, progress=progress)


# ----------------------------------------------------------------------------- the "torch" format's entries


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``torch`` format (:mod:`optstate.converters.formats`): :func:`from_torch_file`;
    ``options.optimizer`` names the optimizer where the param groups cannot tell; ``options.assume_step``
    is the step of a state that records none.

    >>> import tempfile
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
    >>> path = tempfile.mkdtemp() + "/c.pt"
    >>> save_torch_file(s, path)
    >>> read(path, ReadOptions()).slots[("momentum", ("w",))].tolist()
    [1.0, 1.0]
    """
    return from_torch_file(path, optimizer=options.optimizer, model=options.model, assume_step=options.assume_step)


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``torch`` format: :func:`save_torch_file` (a torch file is never sharded).

    >>> import tempfile
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
    >>> path = tempfile.mkdtemp() + "/c.pt"
    >>> write(s, path, WriteOptions())
    >>> sorted(ptfile.load(path))
    ['optimizer']
    """
    save_torch_file(state, path, force=options.force, fsync=options.fsync, progress=options.progress)
