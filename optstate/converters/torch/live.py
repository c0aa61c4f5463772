"""PyTorch adapter: ``torch.optim`` optimizers, their ``state_dict``s and ``torch.save`` checkpoints."""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from ...errors import FormatError, MappingError, UnsupportedError
from ...schema.families import BOOKKEEPING_KEYS, OptimizerSpec, optimizer_spec
from ...schema.state import Deferred, OptimizerState, ParamInfo, non_finite_slot, numpy_dtype, path_to_name
from . import state_dict as torch_dict

# The torch-free part of the adapter, kept importable from here.
from .state_dict import (
    BUFFER_NAMES,
    MODEL_KEYS,
    OPTIMIZER_KEYS,
    SCHEDULER_KEYS,
    TORCH_SIGNATURES,
    check_state_dict,
    from_torch_file,
    hyperparam_value,
    is_buffer,
    is_optimizer_state_dict,
    is_tensor_dict,
    param_names,
    refuse_optax_native,
    torch_class_of,
)

__all__ = [
    "BUFFER_NAMES",
    "MODEL_KEYS",
    "OPTIMIZER_KEYS",
    "SCHEDULER_KEYS",
    "TORCH_SIGNATURES",
    "check_state_dict",
    "from_torch",
    "from_torch_file",
    "is_buffer",
    "is_optimizer_state_dict",
    "is_tensor_dict",
    "live_optimizer",
    "load_checkpoint",
    "numpy_to_tensor",
    "numpy_tree",
    "param_names",
    "save_checkpoint",
    "split_checkpoint",
    "step_live",
    "tensor_to_numpy",
    "to_torch",
    "to_torch_state_dict",
    "torch_class_of",
    "unpickler_detail",
]

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
    copied = tensor.device.type != "cpu"  # .cpu() makes the host copy itself
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if tensor.dtype in _VIA_INTEGER:
        int_dtype, _, np_dtype = _VIA_INTEGER[tensor.dtype]
        array = tensor.contiguous().view(int_dtype).numpy().view(np_dtype)
    else:
        array = tensor.numpy()
    return array.copy() if copy and not copied else array


def numpy_to_tensor(array: np.ndarray, *, copy: bool = True) -> torch.Tensor:
    """A CPU tensor with the array's bits.

    A copy that the tensor owns unless ``copy=False``, which views the array's memory where it can
    (C-contiguous, native byte order), read-only memory maps included: for a tensor that is only
    read, as when it is saved.

    >>> numpy_to_tensor(np.arange(3.0)).dtype
    torch.float64
    """
    array = np.asarray(array)
    if copy or not (array.flags.c_contiguous and array.dtype.isnative):
        array = np.array(array, copy=True, order="C")  # the tensor owns its memory: no aliasing, no stride games
    with warnings.catch_warnings():  # a view of a read-only memory map: torch warns about writes, none come
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        if array.dtype in _FROM_NUMPY:
            np_int, torch_dtype = _FROM_NUMPY[array.dtype]
            return torch.from_numpy(array.view(np_int)).view(torch_dtype)
        return torch.from_numpy(array)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(_VIA_INTEGER[dtype][2]) if dtype in _VIA_INTEGER else str(torch.empty(0, dtype=dtype).numpy().dtype)


def _stays_on_device(tensor: torch.Tensor) -> bool:
    """Whether a tensor stays where it is rather than being copied to the host: an array on an
    accelerator (a scalar, such as a fused optimizer's ``step``, comes to the host: it is read)."""
    return tensor.device.type != "cpu" and tensor.ndim > 0


def device_array(tensor: torch.Tensor, *, copy: bool) -> Deferred | np.ndarray:
    """A tensor left on its device, as an array of the state: copied there (``copy=True``) or borrowed;
    ``to_optax`` hands it to JAX by DLPack where JAX has that device, anything else reads it through
    a copy to the host, one tensor at a time. Where the device has no room for the copy, the copy
    is made on the host instead (a plain NumPy array), as it always was.

    >>> a = device_array(torch.ones(2), copy=True)
    >>> a.shape, a.dtype, np.asarray(a).tolist()
    ((2,), dtype('float32'), [1.0, 1.0])
    """
    try:
        tensor = tensor.detach().clone() if copy else tensor.detach()
    except torch.OutOfMemoryError:
        return tensor_to_numpy(tensor, copy=True)
    return Deferred(
        tuple(tensor.shape),
        numpy_dtype(_dtype_name(tensor.dtype)),
        lambda: tensor_to_numpy(tensor, copy=False),
        dlpack=tensor,
    )


def _check_finite_on_device(state: OptimizerState) -> None:
    """Refuse non-finite moments left on the device, checked there (the state checks those on the host)."""
    for (slot, path), array in state.slots.items():
        tensor = array.dlpack if isinstance(array, Deferred) else None
        if (
            isinstance(tensor, torch.Tensor)
            and (tensor.is_floating_point() or tensor.is_complex())
            and not bool(torch.isfinite(tensor).all())
        ):
            raise non_finite_slot(path, slot)


def numpy_tree(obj: Any, *, copy: bool) -> Any:
    """``obj`` with every tensor a NumPy array (:func:`tensor_to_numpy`), dicts and lists rebuilt.

    Views of one tensor's memory alike (same storage, offset, shape, strides, dtype) become one
    array, so tied weights stay recognisably tied even when copied.

    >>> w = torch.ones(2)
    >>> tree = numpy_tree({"a": w, "b": [w, 3]}, copy=True)
    >>> tree["a"] is tree["b"][0], tree["b"][1]
    (True, 3)
    """
    arrays: dict[tuple, np.ndarray | Deferred] = {}

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = (
                value.device,
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            if key not in arrays:
                arrays[key] = (
                    device_array(value, copy=copy) if _stays_on_device(value) else tensor_to_numpy(value, copy=copy)
                )
            return arrays[key]
        if isinstance(value, Counter):  # holds numbers only; a scheduler's milestones stay a Counter
            return value
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, tuple):  # torch.Size included
            return tuple(convert(v) for v in value)
        return value

    return convert(obj)


# ----------------------------------------------------------------------------- reading files


def unpickler_detail(message: str) -> str:
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
        detail = unpickler_detail(str(exc))
        if "global" not in detail.lower():
            raise FormatError(
                f"{source}: not a readable torch checkpoint (truncated or corrupted?): {detail}"
            ) from None
        raise FormatError(
            f"{source}: refused: loading it would run code from the file, which optstate never does ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{source}: not a readable torch checkpoint (truncated or corrupted?): {first}") from None


def split_checkpoint(obj: Any, source: str) -> tuple[Mapping | None, Mapping | None, Mapping | list | None]:
    """``(optimizer state_dict, model state_dict, scheduler state_dict)`` found in a checkpoint, tensors as
    NumPy arrays viewing their memory (see :func:`optstate.converters.torch.state_dict.split_checkpoint`)."""
    return torch_dict.split_checkpoint(numpy_tree(obj, copy=False), source)


# ----------------------------------------------------------------------------- torch -> canonical


def _names_by_identity(optimizer: torch.optim.Optimizer, model: Any) -> list[list[str]]:
    """Each group's parameter names, found by tensor identity among ``model.named_parameters()``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(tensors) if id(p) not in by_id]
    if missing:
        raise MappingError(f"optimizer tensors {missing[:5]} are not parameters of the model passed")
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def from_torch(
    obj: Any, *, model: Any = None, scheduler: Any = None, optimizer: str | None = None, copy: bool = True
) -> OptimizerState:
    """Read torch optimizer state into the canonical form.

    ``obj`` is a ``torch.optim.Optimizer``, an optimizer ``state_dict``, a training-checkpoint
    dict holding one (and often the model weights), or a path to a ``torch.save`` file. A live
    ``scheduler`` (or one saved in the checkpoint) travels with the state.

    A live optimizer's tensors are copied, since its next step overwrites them. ``copy=False``
    borrows them instead (no copy at all, and :func:`optstate.to_optax` hands them on to JAX by
    DLPack, so a migration in one process copies nothing); then the torch optimizer must not step
    again while the state or the arrays made from it are in use. Tensors on an accelerator stay
    there (copied there by default, or to the host where the device has no room for the copy): JAX
    takes them on the same device, without a trip to the host.

    >>> import torch, optstate
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.AdamW(net.named_parameters(), lr=1e-3)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> state = optstate.from_torch(opt)
    >>> state.optimizer, state.common_step(), [p.path for p in state.params]
    ('adamw', 1, [('weight',), ('bias',)])
    """
    source, live_class, shapes = "optimizer", None, None
    if isinstance(obj, torch.optim.Optimizer):
        sd = obj.state_dict()
        if model is not None and not all("param_names" in g for g in sd["param_groups"]):
            sd = {
                "state": sd["state"],
                "param_groups": [
                    dict(g, param_names=names)
                    for g, names in zip(sd["param_groups"], _names_by_identity(obj, model), strict=True)
                ],
            }
        live_class = type(obj).__name__
        shapes = [(tuple(p.shape), _dtype_name(p.dtype)) for g in obj.param_groups for p in g["params"]]
        checkpoint = numpy_tree(sd, copy=copy)  # the next step overwrites a live optimizer's tensors
    elif isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        checkpoint = numpy_tree(load_checkpoint(obj), copy=False)  # memory-mapped from the file: nothing writes it
    else:
        checkpoint = numpy_tree(obj, copy=True)
    weights = buffers = None
    if model is not None:
        weights = numpy_tree(dict(model.state_dict()), copy=True)
        parameters = {n for n, _ in model.named_parameters()}
        buffers = [n for n in weights if n not in parameters]
    state = torch_dict.state_from_checkpoint(
        checkpoint,
        source,
        origin=f"torch {torch.__version__}",
        optimizer=optimizer,
        model=model,
        weights=weights,
        buffers=buffers,
        scheduler_state=None if scheduler is None else numpy_tree(scheduler.state_dict(), copy=True),
        live_class=live_class,
        shapes=shapes,
    )
    _check_finite_on_device(state)
    return state


# ----------------------------------------------------------------------------- canonical -> torch


def step_dtype() -> type:
    """The NumPy type torch keeps ``step`` in: float64 under a float64 default dtype, else float32.

    >>> step_dtype()
    <class 'numpy.float32'>
    """
    return np.float64 if torch.get_default_dtype() == torch.float64 else np.float32


def _param_entry(state: OptimizerState, info: ParamInfo) -> dict[str, torch.Tensor]:
    return {key: numpy_to_tensor(a) for key, a in torch_dict.param_entry(state, info, step_dtype()).items()}


def to_torch_state_dict(state: OptimizerState, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """An optimizer ``state_dict`` for ``state``, with ``param_names``, groups as saved.

    Parameters are in the state's order unless ``names`` gives another (every tracked name once);
    ``torch.optim.Optimizer.load_state_dict`` matches by that position. The tensors are
    :func:`optstate.converters.torch.state_dict.state_dict_arrays`' arrays, copied.

    >>> import torch, optstate
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> sd = optstate.to_torch_state_dict(optstate.from_torch(opt))
    >>> sd["param_groups"][0]["param_names"], sorted(sd["state"][0])
    (['weight', 'bias'], ['momentum_buffer'])
    """
    sd = torch_dict.state_dict_arrays(state, names=names, step_dtype=step_dtype())
    sd["state"] = {index: {key: numpy_to_tensor(a) for key, a in entry.items()} for index, entry in sd["state"].items()}
    return sd


def _live_names(optimizer: torch.optim.Optimizer, model: Any) -> list[list[str]]:
    if all("param_names" in g for g in optimizer.param_groups):
        return [list(g["param_names"]) for g in optimizer.param_groups]
    if model is None:
        raise MappingError("the optimizer has no param_names; pass model= so its parameters can be matched by name")
    return _names_by_identity(optimizer, model)


def _saved_group_of(infos: Sequence[ParamInfo], live_group: int) -> int:
    saved = {info.group for info in infos}
    if len(saved) > 1:
        raise MappingError(
            f"live param group {live_group} mixes parameters of saved groups {sorted(saved)}; "
            "group the parameters as they were saved"
        )
    return saved.pop() if saved else 0


def _warn_kept_hyperparams(spec: OptimizerSpec, live: Mapping[str, Any], saved: Mapping[str, Any], group: int) -> None:
    for key in saved:
        value = hyperparam_value(numpy_tree(live.get(key), copy=True))
        if key in live and key not in BOOKKEEPING_KEYS and value != saved[key]:
            meaning = (
                ": the stored state was accumulated under the saved value, so it means something else now"
                if key in spec.moment_hyperparams
                else ""
            )
            warnings.warn(
                f"param group {group} keeps the live {key}={value!r} (saved {saved[key]!r}){meaning}", stacklevel=3
            )


def to_torch(
    state: OptimizerState,
    optimizer: torch.optim.Optimizer,
    *,
    model: Any = None,
    scheduler: Any = None,
    keep_hyperparams: bool = False,
) -> None:
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
    refuse_optax_native(state.spec)
    live_family = optimizer_spec(torch_class_of(optimizer.param_groups[0], type(optimizer).__name__))
    if live_family.name != state.optimizer:
        raise UnsupportedError(
            f"the state is {state.spec.torch_class}'s, the optimizer is {type(optimizer).__name__} "
            f"({live_family.torch_class} semantics)"
        )
    live_names = _live_names(optimizer, model)
    by_name = {path_to_name(p.path): p for p in state.params}
    flat = [n for g in live_names for n in g]
    missing = [n for n in flat if n not in by_name]
    extra = sorted(set(by_name) - set(flat))
    if missing or extra:
        raise MappingError(
            f"parameters do not match: the optimizer has {len(flat)}, the state {len(by_name)}; "
            f"in the optimizer but not the state: {missing[:10]}; "
            f"in the state but not the optimizer: {extra[:10]}"
        )
    sd: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for gi, (group, names) in enumerate(zip(optimizer.param_groups, live_names, strict=True)):
        infos = [by_name[n] for n in names]
        saved_hp = state.param_groups[_saved_group_of(infos, gi)]
        live_hp = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if keep_hyperparams:
            _warn_kept_hyperparams(state.spec, live_hp, saved_hp, gi)
            hp = live_hp
        else:
            hp = {**live_hp, **state.spec.with_defaults(saved_hp)}
        sd["param_groups"].append(dict(hp, params=list(range(index, index + len(names))), param_names=names))
        for name, param, info in zip(names, group["params"], infos, strict=True):
            if tuple(param.shape) != info.shape or _dtype_name(param.dtype) != info.dtype:
                raise MappingError(
                    f"{name}: the optimizer's parameter is {list(param.shape)} "
                    f"{_dtype_name(param.dtype)}, the state's {list(info.shape)} {info.dtype}"
                )
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
    from ..schedules.torch_schedulers import restore_torch_scheduler_state

    saved = state.metadata.lr_scheduler
    if saved is None:
        known = state.spec.has_step and all(p.step is not None for p in state.params)
        count = state.metadata.schedule_count
        if count is None and known:
            count = max(p.step or 0 for p in state.params)
        if count is None:
            raise UnsupportedError("the state records no step count, so the scheduler's position is unknown")
        saved = restore_torch_scheduler_state(
            scheduler.state_dict(), count, param_groups=optimizer.state_dict()["param_groups"]
        )
    if len(saved["_last_lr"]) != len(optimizer.param_groups):
        raise UnsupportedError(
            f"the LR scheduler's state has {len(saved['_last_lr'])} param group(s), the optimizer "
            f"{len(optimizer.param_groups)}: build the optimizer with the groups it was saved with"
        )
    scheduler.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, saved["_last_lr"], strict=True):
        group["lr"] = lr  # chainable schedulers compute the next lr from it


def _restore_scalar_dtypes(optimizer: torch.optim.Optimizer, sd: Mapping, spec: OptimizerSpec) -> None:
    """Undo ``load_state_dict``'s cast of per-parameter scalars (NAdam's float32 ``mu_product``) to the
    parameter dtype: torch computes with the dtype it was saved in until then."""
    live = [p for g in optimizer.param_groups for p in g["params"]]
    for slot in (s for s in spec.slots if s.scalar):
        for index, entry in sd["state"].items():
            if slot.torch_key in entry:
                optimizer.state[live[index]][slot.torch_key] = entry[slot.torch_key].to(live[index].device)


def save_checkpoint(
    state: OptimizerState,
    path: str | os.PathLike,
    *,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> None:
    """Write ``{"optimizer": state_dict, "model": weights}`` as a ``torch.save`` file, atomically, one tensor
    at a time: :func:`optstate.converters.torch.state_dict.save_torch_file`, ``step`` in torch's current dtype.

    The file loads with ``torch.load(path, weights_only=True)``.
    """
    torch_dict.save_torch_file(state, path, force=force, fsync=fsync, progress=progress, step_dtype=step_dtype())


# ----------------------------------------------------------------------------- live runs (optstate.verify)


def live_optimizer(
    state: OptimizerState, params: Mapping[Any, np.ndarray]
) -> tuple[torch.optim.Optimizer, dict[Any, torch.Tensor]]:
    """A ``torch.optim`` optimizer of the state's family over float tensors holding ``params`` (by parameter
    path), built from the state's param groups (those with parameters; named, so that :func:`from_torch`
    names them) and loaded with its state by :func:`to_torch`; and the tensors, by path.

    >>> import optstate
    >>> from optstate.schema import ParamInfo
    >>> s = optstate.OptimizerState("sgd", ({"lr": 0.5, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float64", 0),),
    ...     {("momentum", ("w",)): np.ones(2)})
    >>> opt, tensors = live_optimizer(s, {("w",): np.zeros(2)})
    >>> step_live(opt, tensors, {("w",): np.ones(2)}); tensors[("w",)].tolist()
    [-0.95, -0.95]
    """
    refuse_optax_native(state.spec)
    optimizer_class = getattr(torch.optim, state.spec.torch_class)
    tensors = {p.path: numpy_to_tensor(np.asarray(params[p.path])).requires_grad_(True) for p in state.params}
    groups = [
        {
            "params": [(path_to_name(p.path), tensors[p.path]) for p in members],
            **{k: v for k, v in state.spec.with_defaults(hp).items() if k not in BOOKKEEPING_KEYS},
        }
        for gi, hp in enumerate(state.param_groups)
        if (members := state.group_params(gi))
    ]
    optimizer = optimizer_class(groups)
    to_torch(state, optimizer)
    return optimizer, tensors


def step_live(optimizer: torch.optim.Optimizer, tensors: Mapping[Any, torch.Tensor], grads: Mapping[Any, Any]) -> None:
    """One ``optimizer.step()`` with each tensor's gradient set to ``grads[path]`` (NumPy arrays)."""
    for path, tensor in tensors.items():
        tensor.grad = numpy_to_tensor(np.asarray(grads[path]))
    optimizer.step()
