"""PyTorch adapter: ``torch.optim`` optimizers, their ``state_dict``s and ``torch.save`` checkpoints."""

from __future__ import annotations

import os
import pickle
from collections import Counter
import warnings
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
import torch

from ..atomic import atomic_file
from ..errors import FormatError, MappingError, UnsupportedError
from ..schema.spec import BOOKKEEPING_KEYS, OptimizerSpec, optimizer_spec
from ..schema.state import OptimizerState, ParamInfo, name_to_path, path_to_name

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_state", "opt")
MODEL_KEYS = ("model", "model_state_dict", "state_dict", "model_state", "weights")
SCHEDULER_KEYS = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")
# Tensors of torch modules that are buffers, not parameters (BatchNorm / InstanceNorm statistics).
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

# Keys of a param group that identify the torch optimizer class, checked in order.
TORCH_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (cls, frozenset(keys)) for cls, keys in (
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

# dtypes NumPy lacks travel as same-width integers: (torch integer dtype, NumPy integer dtype, ml_dtypes dtype).
_VIA_INTEGER = {
    torch.bfloat16: (torch.int16, np.dtype("int16"), np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype("uint8"), np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype("uint8"), np.dtype(ml_dtypes.float8_e5m2)),
}
_FROM_NUMPY = {np_dtype: (np_int, torch_dtype) for torch_dtype, (_, np_int, np_dtype) in _VIA_INTEGER.items()}


# ----------------------------------------------------------------------------- tensors

def tensor_to_numpy(tensor: torch.Tensor, *, copy: bool = True) -> np.ndarray:
    """The tensor's bits as a NumPy array on the host (bfloat16 and float8 through ml_dtypes).

    A copy unless ``copy=False``, which views the tensor's memory: right for tensors memory-mapped
    from a file, wrong for a live optimizer's, which the next step overwrites.

    >>> tensor_to_numpy(torch.tensor([1.5], dtype=torch.bfloat16)).dtype
    dtype(bfloat16)
    """
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if tensor.dtype in _VIA_INTEGER:
        int_dtype, _, np_dtype = _VIA_INTEGER[tensor.dtype]
        array = tensor.contiguous().view(int_dtype).numpy().view(np_dtype)
    else:
        array = tensor.numpy()
    return array.copy() if copy else array


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor with the array's bits.

    >>> numpy_to_tensor(np.arange(3.0)).dtype
    torch.float64
    """
    array = np.array(array, copy=True, order="C")  # the tensor owns its memory: no aliasing, no stride games
    if array.dtype in _FROM_NUMPY:
        np_int, torch_dtype = _FROM_NUMPY[array.dtype]
        return torch.from_numpy(array.view(np_int)).view(torch_dtype)
    return torch.from_numpy(array)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(_VIA_INTEGER[dtype][2]) if dtype in _VIA_INTEGER else str(torch.empty(0, dtype=dtype).numpy().dtype)


def _plain(value: Any) -> Any:
    """A scheduler state dict with tensors as Python numbers, tuples as lists (Counters kept)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, Counter):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _hyperparam_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # torch accepts a tensor lr and then computes in its dtype; only float64 survives as a Python float.
        if value.is_floating_point() and value.dtype != torch.float64:
            raise UnsupportedError(f"a {_dtype_name(value.dtype)} tensor hyperparameter ({value.item()!r}): torch "
                                   "computes with it in that dtype, Optax and the canonical file in float64")
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_hyperparam_value(v) for v in value)
    return value


# ----------------------------------------------------------------------------- reading files

def _unpickler_detail(message: str) -> str:
    """The one line of torch's weights-only error that says what was refused."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in message.splitlines()]
    detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else message)
    return detail.split(". Please")[0].rstrip(".")


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: a file whose unpickling would run code is refused."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FormatError(f"{source}: no such file")
    try:
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(source, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "global" not in detail.lower():
            raise FormatError(f"{source}: not a readable torch checkpoint (truncated or corrupted?): {detail}") from None
        raise FormatError(f"{source}: refused: loading it would run code from the file, which optstate never "
                          f"does ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{source}: not a readable torch checkpoint (truncated or corrupted?): {first}") from None


def is_optimizer_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def split_checkpoint(obj: Any, source: str) -> tuple[Mapping | None, Mapping | None, Mapping | None]:
    """``(optimizer state_dict, model state_dict, scheduler state_dict)`` found in a checkpoint."""
    if is_optimizer_state_dict(obj):
        return obj, None, None
    if is_tensor_dict(obj):
        return None, obj, None
    if not isinstance(obj, Mapping):
        raise FormatError(f"{source}: holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    optimizer = next((obj[k] for k in OPTIMIZER_KEYS if is_optimizer_state_dict(obj.get(k))), None)
    states = obj.get("optimizer_states")  # PyTorch Lightning: one state_dict per optimizer
    if optimizer is None and isinstance(states, (list, tuple)) and states:
        if len(states) > 1 or not is_optimizer_state_dict(states[0]):
            raise UnsupportedError(f"{source}: 'optimizer_states' holds {len(states)} optimizers; "
                                   "optstate converts one")
        optimizer = states[0]
    model = next((obj[k] for k in MODEL_KEYS if is_tensor_dict(obj.get(k))), None)
    scheduler = next((obj[k] for k in SCHEDULER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if optimizer is None and model is None:
        raise FormatError(f"{source}: no optimizer state_dict (keys {', '.join(OPTIMIZER_KEYS)}) and no model "
                          f"weights (keys {', '.join(MODEL_KEYS)}); top-level keys: {sorted(map(str, obj))}")
    return optimizer, model, scheduler


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
            raise UnsupportedError("Adam and AdamW param groups look alike in checkpoints of torch before 2.6, and "
                                   "they decay weights differently; name it (optimizer='adam'|'adamw', --optimizer)")
    raise UnsupportedError(f"cannot tell which optimizer wrote a param group with keys {sorted(group)}; "
                           "name it (optimizer=..., --optimizer)")


def is_buffer(name: str, tensor: torch.Tensor) -> bool:
    return name.rsplit(".", 1)[-1] in BUFFER_NAMES or not tensor.is_floating_point()


def _align_by_position(count: int, shapes: Sequence[tuple[int, ...] | None],
                       candidates: Sequence[tuple[str, tuple[int, ...]]], origin: str) -> list[str]:
    """Names for the optimizer's tensors from the trainable tensors of the model, in registration order.

    The rule: the optimizer tracks exactly the candidates, in the same order (as
    ``Optimizer(model.parameters())`` does), and every shape known from the state agrees.
    """
    if count != len(candidates):
        raise MappingError(
            f"the optimizer tracks {count} tensors and {origin} has {len(candidates)} trainable tensors, so "
            "parameter names cannot be inferred by position; save the optimizer with param_names "
            "(build it from model.named_parameters()) or pass model= with requires_grad set as in training")
    for index, (shape, (name, expected)) in enumerate(zip(shapes, candidates)):
        if shape is not None and shape != expected:
            raise MappingError(
                f"optimizer tensor {index} has state of shape {list(shape)} but {origin}'s tensor {index} "
                f"({name}) has shape {list(expected)}: the optimizer was not built from the model's parameters "
                "in registration order; save it with param_names or pass model=")
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


def param_names(sd: Mapping, spec: OptimizerSpec, *, model: Any = None,
                weights: Mapping[str, torch.Tensor] | None = None, source: str = "state_dict") -> list[str]:
    """One name per tracked tensor, in the order of ``param_groups``.

    From ``param_names`` when saved; else aligned by position (single param group only) with
    ``model.named_parameters()`` (those with ``requires_grad``) or with the floating-point,
    non-buffer tensors of the checkpoint's weights; else ``"0"``, ``"1"``, ... with a warning.
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
        candidates = [(n, tuple(t.shape)) for n, t in weights.items() if not is_buffer(n, t)]
        origin = f"{source}'s model weights"
    else:
        warnings.warn(f"{source}: the optimizer has no param_names and no model weights are known; parameters "
                      "are named by position ('0', '1', ...); pass model= to name them", stacklevel=3)
        return [str(i) for i in range(count)]
    if len(groups) > 1:
        raise MappingError(
            f"{source}: the optimizer has {len(groups)} param groups and no param_names; the order of the "
            "groups' tensors cannot be matched to the model by position; save the optimizer with param_names "
            "(build it from model.named_parameters()) or convert the live optimizer with model=")
    return _align_by_position(count, _state_shapes(sd, spec), candidates, origin)


# ----------------------------------------------------------------------------- torch -> canonical

def _read_step(entry: Mapping[str, Any], where: str) -> int | None:
    if "step" not in entry:
        return None
    step = entry["step"]
    if not (isinstance(step, (int, float)) or isinstance(step, torch.Tensor) and step.numel() == 1):
        raise FormatError(f"{where}: step is {type(step).__name__}, expected a number")
    value = float(step)
    if not value.is_integer() or value < 0:
        raise FormatError(f"{where}: step {value} is not a non-negative integer")
    return int(value)


def _read_param(spec: OptimizerSpec, entry: Any, where: str, copy: bool):
    if not isinstance(entry, Mapping):
        raise FormatError(f"{where}: state is a {type(entry).__name__}, expected a dict")
    known = {"step"} | {s.torch_key for s in spec.slots}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UnsupportedError(f"{where}: state key(s) {unknown} are not part of {spec.torch_class} "
                               "as optstate supports it")
    slots = {}
    for slot in spec.slots:
        value = entry.get(slot.torch_key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise FormatError(f"{where}: {slot.torch_key} is a {type(value).__name__}, expected a tensor")
        if value is not None:
            slots[slot.name] = tensor_to_numpy(value, copy=copy)
    return _read_step(entry, where), slots


def check_state_dict(sd: Any, source: str) -> None:
    """Refuse a malformed optimizer state_dict with a message, before anything indexes into it."""
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
        raise FormatError(f"{source}: the state of parameter index {bad[0]} is a "
                          f"{type(sd['state'][bad[0]]).__name__}, expected a dict")
    orphans = sorted(set(sd["state"]) - set(indices), key=str)
    if orphans:
        raise FormatError(f"{source}: state for parameter indices {orphans[:5]} that no param group holds")


def _tied(weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names that share another name's tensor (tied weights), mapped to the first name."""
    first: dict[tuple, str] = {}
    tied = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in first:
            tied[name] = first[key]
        first.setdefault(key, name)
    return tied


def _check_weights(names: Sequence[str], weights: Mapping[str, torch.Tensor], source: str) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        example = next(iter(weights), "")
        raise MappingError(f"{source}: the optimizer's parameter {missing[0]!r} is not among the model weights "
                           f"(e.g. {example!r}); a prefix such as 'module.' or '_orig_mod.' differs?")
    tracked = set(names)
    for name, target in _tied(weights).items():
        if {name, target} & tracked:
            raise UnsupportedError(f"{source}: {name!r} is tied to {target!r} (the same tensor); an Optax "
                                   "parameter tree has no tied leaves, so training would untie them")


def _state_from_state_dict(sd: Mapping, names: Sequence[str], spec: OptimizerSpec,
                           weights: Mapping[str, torch.Tensor] | None, buffers: Iterable[str], source: str,
                           metadata: Mapping[str, Any], *, copy: bool,
                           shapes: Mapping[str, tuple[tuple[int, ...], str]] | None = None) -> OptimizerState:
    """``shapes`` gives ``name -> (shape, dtype)`` for parameters that may have no state (a live optimizer)."""
    if weights is not None:
        _check_weights(names, weights, source)
    weights_np = None if weights is None else {name_to_path(n): tensor_to_numpy(t, copy=copy)
                                               for n, t in weights.items()}
    params, slots, hyperparams = [], {}, []
    name_iter = iter(names)
    for gi, group in enumerate(sd["param_groups"]):
        where = f"{source}: param group {gi}"
        try:
            hp = {k: _hyperparam_value(v) for k, v in group.items() if k not in ("params", "param_names")}
        except UnsupportedError as exc:
            raise UnsupportedError(f"{where}: {exc}") from None
        spec.check_supported(hp, where)
        hyperparams.append(hp)
        for index in group["params"]:
            name = next(name_iter)
            path = name_to_path(name)
            where = f"{source}: {name}"
            step, param_slots = _read_param(spec, sd["state"].get(index, {}), where, copy)
            from_slots = _shape_from_slots(spec, {spec.slot(k).torch_key: a for k, a in param_slots.items()})
            weight = None if weights_np is None else weights_np.get(path)
            if from_slots is not None and weight is not None and weight.shape != from_slots[0]:
                raise MappingError(f"{where}: state has shape {list(from_slots[0])}, "
                                   f"the model weight {list(weight.shape)}")
            if from_slots is None and weight is not None:
                from_slots = weight.shape, weight.dtype
            if from_slots is not None:
                shape, dtype = tuple(from_slots[0]), str(from_slots[1])
            elif shapes is not None and name in shapes:
                shape, dtype = shapes[name]
            else:
                raise MappingError(f"{where}: no state and no weight, so its shape is unknown; "
                                   "pass the model (model=) or a checkpoint holding the weights")
            params.append(ParamInfo(path, shape, dtype, gi, step))
            slots.update({(slot, path): array for slot, array in param_slots.items()})
    try:
        return OptimizerState(spec.name, tuple(hyperparams), tuple(params), slots, weights_np,
                              tuple(name_to_path(b) for b in buffers), dict(metadata))
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None


def _names_by_identity(optimizer: torch.optim.Optimizer, model: Any) -> list[list[str]]:
    """Each group's parameter names, found by tensor identity among ``model.named_parameters()``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [[by_id.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    missing = [i for i, n in enumerate(n for g in names for n in g) if n is None]
    if missing:
        raise MappingError(f"optimizer tensors {missing[:5]} are not parameters of the model passed")
    return names


def _family(sd: Mapping, optimizer: str | None, source: str, live_class: str | None = None) -> OptimizerSpec:
    hint = optimizer_spec(optimizer).torch_class if optimizer else live_class
    written_by = torch_class_of(sd["param_groups"][0], hint)
    spec = optimizer_spec(optimizer or written_by)
    if optimizer is not None and optimizer_spec(written_by).name != spec.name:
        raise UnsupportedError(f"{source}: optimizer={optimizer!r} but the param groups are {written_by}'s")
    return spec


def from_torch(obj: Any, *, model: Any = None, scheduler: Any = None,
               optimizer: str | None = None) -> OptimizerState:
    """Read torch optimizer state into the canonical form.

    ``obj`` is a ``torch.optim.Optimizer``, an optimizer ``state_dict``, a training-checkpoint
    dict holding one (and often the model weights), or a path to a ``torch.save`` file. A live
    ``scheduler`` (or one saved in the checkpoint) travels with the state.

    >>> import torch, optstate
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.AdamW(net.named_parameters(), lr=1e-3)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> state = optstate.from_torch(opt)
    >>> state.optimizer, state.common_step(), [p.path for p in state.params]
    ('adamw', 1, [('weight',), ('bias',)])
    """
    source, weights, scheduler_sd, live = "optimizer", None, None, []
    copy = True  # a live optimizer or an in-memory dict: its tensors change under us
    if isinstance(obj, torch.optim.Optimizer):
        sd = obj.state_dict()
        if model is not None and not all("param_names" in g for g in sd["param_groups"]):
            sd = {"state": sd["state"], "param_groups": [
                dict(g, param_names=names) for g, names in zip(sd["param_groups"], _names_by_identity(obj, model))]}
        live = [p for g in obj.param_groups for p in g["params"]]
    else:
        if isinstance(obj, (str, os.PathLike)):
            source = os.fspath(obj)
            obj = load_checkpoint(obj)
            copy = False  # memory-mapped from the file: read-only, nothing else writes to it
        sd, weights, scheduler_sd = split_checkpoint(obj, source)
        if sd is None:
            raise FormatError(f"{source}: holds model weights only, no optimizer state")
    check_state_dict(sd, source)
    if scheduler is not None:
        scheduler_sd = scheduler.state_dict()
    if model is not None:
        weights = dict(model.state_dict())
        parameters = {n for n, _ in model.named_parameters()}
        buffers = [n for n in weights if n not in parameters]
    else:
        buffers = [n for n, t in (weights or {}).items() if is_buffer(n, t)]
    metadata: dict[str, Any] = {"source": f"torch {torch.__version__}"}
    if scheduler_sd is not None:
        metadata["lr_scheduler"] = _plain(scheduler_sd)
    spec = _family(sd, optimizer, source, type(obj).__name__ if live else None)
    names = param_names(sd, spec, model=model, weights=weights, source=source)
    shapes = {n: (tuple(p.shape), _dtype_name(p.dtype)) for n, p in zip(names, live)}
    return _state_from_state_dict(sd, names, spec, weights, buffers, source, metadata, copy=copy, shapes=shapes)


# ----------------------------------------------------------------------------- canonical -> torch

def _scalar_dtype() -> torch.dtype:
    # What torch itself uses for `step`: float64 under a float64 default dtype, float32 otherwise.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _refuse_optax_native(spec: OptimizerSpec) -> None:
    if not spec.in_torch:
        raise UnsupportedError(f"{spec.torch_class} is an Optax optimizer with no torch.optim counterpart; "
                               "it converts to the canonical file and back to Optax only")


def _param_entry(state: OptimizerState, info: ParamInfo) -> dict[str, torch.Tensor]:
    spec = state.spec
    present = {s.name: state.slots[(s.name, info.path)] for s in spec.slots if (s.name, info.path) in state.slots}
    if not present:
        if spec.has_step and info.step:
            raise FormatError(f"{path_to_name(info.path)}: step {info.step} but no slots")
        return {}
    missing = [s.name for s in spec.active_slots(state.param_groups[info.group])
               if s.applies(info.shape) and s.name not in present]
    if missing:
        raise FormatError(f"{path_to_name(info.path)}: slot(s) {missing} missing")
    narrow = [name for name, a in present.items() if not spec.slot(name).scalar and str(a.dtype) != info.dtype]
    if narrow:
        raise UnsupportedError(f"{path_to_name(info.path)}: {narrow[0]} is {present[narrow[0]].dtype}, the parameter "
                               f"{info.dtype}; torch keeps it in the parameter's dtype, so loading would cast it")
    entry = {}
    if spec.has_step:
        entry["step"] = torch.tensor(float(info.step or 0), dtype=_scalar_dtype())
    entry.update({spec.slot(name).torch_key: numpy_to_tensor(a) for name, a in present.items()})
    return entry


def to_torch_state_dict(state: OptimizerState, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """An optimizer ``state_dict`` for ``state``, with ``param_names``, groups as saved.

    Parameters are in the state's order unless ``names`` gives another (every tracked name once);
    ``torch.optim.Optimizer.load_state_dict`` matches by that position.

    >>> import torch, optstate
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> sd = optstate.to_torch_state_dict(optstate.from_torch(opt))
    >>> sd["param_groups"][0]["param_names"], sorted(sd["state"][0])
    (['weight', 'bias'], ['momentum_buffer'])
    """
    _refuse_optax_native(state.spec)
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
        entry = _param_entry(state, info)
        if entry:
            sd_state[index] = entry
    return {"state": sd_state, "param_groups": groups}


def _live_names(optimizer: torch.optim.Optimizer, model: Any) -> list[list[str]]:
    if all("param_names" in g for g in optimizer.param_groups):
        return [list(g["param_names"]) for g in optimizer.param_groups]
    if model is None:
        raise MappingError("the optimizer has no param_names; pass model= so its parameters can be matched by name")
    return _names_by_identity(optimizer, model)


def _saved_group_of(infos: Sequence[ParamInfo], live_group: int) -> int:
    saved = {info.group for info in infos}
    if len(saved) > 1:
        raise MappingError(f"live param group {live_group} mixes parameters of saved groups {sorted(saved)}; "
                           "group the parameters as they were saved")
    return saved.pop() if saved else 0


def _warn_kept_hyperparams(spec: OptimizerSpec, live: Mapping[str, Any], saved: Mapping[str, Any],
                           group: int) -> None:
    for key in saved:
        if key in live and key not in BOOKKEEPING_KEYS and _hyperparam_value(live[key]) != saved[key]:
            meaning = (": the stored state was accumulated under the saved value, so it means something else "
                       "now" if key in spec.moment_hyperparams else "")
            warnings.warn(f"param group {group} keeps the live {key}={_hyperparam_value(live[key])!r} "
                          f"(saved {saved[key]!r}){meaning}", stacklevel=3)


def to_torch(state: OptimizerState, optimizer: torch.optim.Optimizer, *, model: Any = None,
             scheduler: Any = None, keep_hyperparams: bool = False) -> None:
    """Load ``state`` into a live optimizer, matching parameters by name.

    Names come from the optimizer's ``param_names`` or from ``model.named_parameters()``. The
    saved hyperparameters replace the live ones, as ``load_state_dict`` does; with
    ``keep_hyperparams=True`` the live ones stay and each difference is warned about.

    >>> import torch, optstate
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> state = optstate.from_torch(opt, model=net)
    >>> fresh = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> optstate.to_torch(state, fresh, model=net)
    >>> float(fresh.state_dict()["state"][0]["step"])
    1.0
    """
    _refuse_optax_native(state.spec)
    live_family = optimizer_spec(torch_class_of(optimizer.param_groups[0], type(optimizer).__name__))
    if live_family.name != state.optimizer:
        raise UnsupportedError(f"the state is {state.spec.torch_class}'s, the optimizer is {type(optimizer).__name__} "
                               f"({live_family.torch_class} semantics)")
    live_names = _live_names(optimizer, model)
    by_name = {path_to_name(p.path): p for p in state.params}
    flat = [n for g in live_names for n in g]
    missing = [n for n in flat if n not in by_name]
    extra = sorted(set(by_name) - set(flat))
    if missing or extra:
        raise MappingError(f"parameters do not match: in the optimizer but not the state: {missing[:10]}; "
                           f"in the state but not the optimizer: {extra[:10]}")
    sd = {"state": {}, "param_groups": []}
    index = 0
    for gi, (group, names) in enumerate(zip(optimizer.param_groups, live_names)):
        infos = [by_name[n] for n in names]
        saved_hp = state.param_groups[_saved_group_of(infos, gi)]
        live_hp = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if keep_hyperparams:
            _warn_kept_hyperparams(state.spec, live_hp, saved_hp, gi)
            hp = live_hp
        else:
            hp = {**live_hp, **state.spec.with_defaults(saved_hp)}
        sd["param_groups"].append(dict(hp, params=list(range(index, index + len(names))), param_names=names))
        for name, param, info in zip(names, group["params"], infos):
            if tuple(param.shape) != info.shape or _dtype_name(param.dtype) != info.dtype:
                raise MappingError(f"{name}: the optimizer's parameter is {list(param.shape)} "
                                   f"{_dtype_name(param.dtype)}, the state's {list(info.shape)} {info.dtype}")
            entry = _param_entry(state, info)
            if entry:
                sd["state"][index] = entry
            index += 1
    optimizer.load_state_dict(sd)
    _restore_scalar_dtypes(optimizer, sd, state.spec)
    if scheduler is not None:
        _restore_scheduler(state, optimizer, scheduler)


def _restore_scheduler(state: OptimizerState, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Put a live LR scheduler where the state's training stopped, and each group's lr with it."""
    from .schedules import restore_torch_scheduler_state

    saved = state.metadata.get("lr_scheduler")
    if saved is None:
        known = state.spec.has_step and all(p.step is not None for p in state.params)
        count = state.metadata.get("schedule_count", max(p.step for p in state.params) if known else None)
        if count is None:
            raise UnsupportedError("the state records no step count, so the scheduler's position is unknown")
        saved = restore_torch_scheduler_state(scheduler.state_dict(), count,
                                              param_groups=optimizer.state_dict()["param_groups"])
    scheduler.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, saved["_last_lr"]):
        group["lr"] = lr  # chainable schedulers compute the next lr from it


def _restore_scalar_dtypes(optimizer: torch.optim.Optimizer, sd: Mapping, spec: OptimizerSpec) -> None:
    """Undo ``load_state_dict``'s cast of per-parameter scalars (NAdam's float32 ``mu_product``) to the
    parameter dtype: torch computes with the dtype it was saved in until then."""
    live = [p for g in optimizer.param_groups for p in g["params"]]
    for slot in (s for s in spec.slots if s.scalar):
        for index, entry in sd["state"].items():
            if slot.torch_key in entry:
                optimizer.state[live[index]][slot.torch_key] = entry[slot.torch_key].to(live[index].device)


def save_checkpoint(state: OptimizerState, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write ``{"optimizer": state_dict, "model": weights}`` with ``torch.save``, atomically.

    The file loads with ``torch.load(path, weights_only=True)``.
    """
    ckpt: dict[str, Any] = {"optimizer": to_torch_state_dict(state)}
    if state.weights is not None:
        ckpt["model"] = {path_to_name(p): numpy_to_tensor(a) for p, a in state.weights.items()}
    if "lr_scheduler" in state.metadata:
        ckpt["lr_scheduler"] = dict(state.metadata["lr_scheduler"])
    elif "schedule_count" in state.metadata:
        warnings.warn(f"the Optax state follows a schedule (count {state.metadata['schedule_count']}) that is not "
                      "saved; restore your torch scheduler with optstate.to_torch(state, optimizer, "
                      "scheduler=...)", stacklevel=2)
    with atomic_file(path, force=force) as tmp:
        torch.save(ckpt, tmp)

