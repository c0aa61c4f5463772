"""accelerate's ``Accelerator.save_state(dir)`` directories, read without torch.

What ``save_state`` writes (accelerate 1.16, ``checkpointing.save_accelerator_state``), without FSDP,
DeepSpeed or Megatron-LM:

- ``model.safetensors`` (``model_1.safetensors``, ... one per prepared model; ``pytorch_model.bin``
  with ``safe_serialization=False``): the prepared model's ``state_dict()``, a tied tensor once.
  safetensors stores keys sorted, so this file does not give the order the optimizer was built in.
- ``optimizer.bin`` (``optimizer_1.bin``, ... one per optimizer): ``optimizer.state_dict()``, with
  ``param_names`` only where the optimizer was built from ``model.named_parameters()``.
- ``scheduler.bin`` (``scheduler_1.bin``, ...): the LR scheduler's ``state_dict()``.
- ``random_states_{process}.pkl`` (Python, NumPy and torch RNG states, one file per process),
  ``scaler.pt``, ``sampler.bin``, ``dl_state_dict.bin``, ``custom_checkpoint_{i}.pkl``: no optimizer
  state. They are never opened (the RNG file pickles NumPy objects); :func:`inspect` names them as
  not carried.

The parameters are named by ``param_names`` where saved, else by the model the user names
(``--model``, :mod:`optstate.converters.torch.models`): ``named_parameters()`` is the order the
optimizer was built from. Never by the weights' sorted keys, which would match shapes by accident.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import FormatError, UnsupportedError
from ...schema.fileformat import read_safetensors
from ...schema.state import OptimizerState, path_to_name
from ..formats import ReadOptions, WriteOptions
from ..schedules.identify import refuse_uncarried_schedule
from ..schedules.torch_schedulers import last_epoch
from . import ptfile
from . import state_dict as torch_dict
from .target import (
    TargetModel,
    check_params,
    load_target,
    model_names,
    model_weights,
    optimizer_state_dict,
    require_torch_order,
    scheduled_group,
    write_directory,
)

if TYPE_CHECKING:
    from ...report import Report

OPTIMIZER, SCHEDULER = "optimizer.bin", "scheduler.bin"
#: Why the resume call changes without a scheduler.bin: load_state opens scheduler.bin for every prepared scheduler.
NO_SCHEDULER = (
    "{where}: no scheduler.bin (the state's lr is constant): prepare no LR scheduler "
    "(accelerator.prepare(model, optimizer)), since load_state would look for scheduler.bin"
)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
RNG_STATES = re.compile(r"random_states_\d+\.pkl")

# The files save_state writes that hold no optimizer state: a pattern, and what the file holds.
NOT_CARRIED = (
    (RNG_STATES, "RNG states (Python, NumPy, torch)"),
    (re.compile(r"scaler\.pt"), "the GradScaler's loss scale"),
    (re.compile(r"(sampler|dl_state_dict)(_\d+)?\.bin"), "dataloader positions"),
    (re.compile(r"custom_checkpoint_\d+\.pkl"), "objects registered with register_for_checkpointing"),
)


@dataclass(frozen=True)
class SaveStateFiles:
    """The files of one ``save_state`` directory that optstate reads, and those it leaves (by name).

    >>> SaveStateFiles(Path("ckpt"), Path("ckpt/optimizer.bin")).not_carried
    ()
    """

    directory: Path
    optimizer: Path
    scheduler: Path | None = None
    weights: Path | None = None
    not_carried: tuple[str, ...] = ()

    @property
    def processes(self) -> int:
        """How many processes saved RNG states here (each writes its own ``random_states_{i}.pkl``)."""
        return sum(bool(RNG_STATES.fullmatch(name)) for name in self.not_carried)


def numbered(names: Sequence[str], first: str) -> list[str]:
    """The files of one kind, as save_state numbers them: ``first``, then ``stem_1.suffix``, ... in that order.

    >>> numbered(["optimizer_2.bin", "optimizer.bin", "optimizer_1.bin", "optimizer_x.bin"], "optimizer.bin")
    ['optimizer.bin', 'optimizer_1.bin', 'optimizer_2.bin']
    """
    stem, _, suffix = first.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}(?:_(\d+))?\.{re.escape(suffix)}")
    matches = [(int(m[1] or 0), name) for name in names if (m := pattern.fullmatch(name))]
    return [name for _, name in sorted(matches)]


def _at_most_one(directory: Path, names: Sequence[str], what: str) -> Path | None:
    """The one file of a kind, ``None`` without one; several (one per optimizer, model, scheduler) refused."""
    if len(names) > 1:
        raise UnsupportedError(
            f"{directory}: holds {len(names)} {what} ({', '.join(names)}); optstate converts a save_state "
            "of one model, one optimizer and at most one LR scheduler"
        )
    return directory / names[0] if names else None


def _refuse_other_layouts(directory: Path, names: Sequence[str]) -> None:
    """Refuse what accelerate writes under FSDP or DeepSpeed, whose optimizer files are laid out otherwise."""
    fsdp = [n for n in names if n.startswith("pytorch_model_fsdp") or re.fullmatch(r"optimizer_\d+", n)]
    if fsdp:
        raise UnsupportedError(
            f"{directory}: written under FSDP ({fsdp[0]}); optstate reads accelerate's save_state without "
            "FSDP (its optimizer.bin is indexed by position, FSDP's by parameter name)"
        )
    if OPTIMIZER not in names:
        deepspeed = "pytorch_model" in names and (directory / "pytorch_model").is_dir()
        steps = sorted(n for n in names if re.fullmatch(r"checkpoint_\d+", n))
        raise FormatError(
            f"{directory}: no {OPTIMIZER}, so not an accelerate save_state directory"
            + (
                "; written under DeepSpeed: pytorch_model/ is a DeepSpeed checkpoint (--from deepspeed)"
                if deepspeed
                else ""
            )
            + (f"; with automatic checkpoint naming, pass one of its checkpoints ({', '.join(steps)})" if steps else "")
        )


def save_state_files(path: str | os.PathLike) -> SaveStateFiles:
    """The files of the ``save_state`` directory ``path``, by name only: no file is opened.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("optimizer.bin", "scheduler.bin", "model.safetensors", "random_states_0.pkl"):
    ...     _ = (d / name).write_bytes(b"")
    >>> files = save_state_files(d)
    >>> files.scheduler.name, files.weights.name, files.not_carried, files.processes
    ('scheduler.bin', 'model.safetensors', ('random_states_0.pkl',), 1)
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory (accelerate's save_state writes one)")
    names = sorted(p.name for p in directory.iterdir())
    _refuse_other_layouts(directory, names)
    optimizer = _at_most_one(directory, numbered(names, OPTIMIZER), "optimizers' states")
    assert optimizer is not None  # _refuse_other_layouts made sure of optimizer.bin
    return SaveStateFiles(
        directory,
        optimizer,
        _at_most_one(directory, numbered(names, SCHEDULER), "LR schedulers' states"),
        _at_most_one(directory, [n for first in WEIGHTS for n in numbered(names, first)], "models' weights"),
        tuple(n for n in names if any(pattern.fullmatch(n) for pattern, _ in NOT_CARRIED)),
    )


# ----------------------------------------------------------------------------- reading the files


def read_optimizer(path: Path) -> Mapping[str, Any]:
    """``optimizer.bin``: the torch optimizer's ``state_dict``, tensors as arrays mapped from the file.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "optimizer.bin"
    >>> _ = ptfile.save({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, path)
    >>> read_optimizer(path)["param_groups"][0]["lr"]
    0.1
    """
    sd: Mapping[str, Any] = ptfile.load(path)
    torch_dict.check_state_dict(sd, os.fspath(path))
    return sd


def read_scheduler(path: Path) -> Mapping[str, Any]:
    """``scheduler.bin``: the LR scheduler's ``state_dict`` (whether optstate reproduces it is decided later).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "scheduler.bin"
    >>> _ = ptfile.save({"last_epoch": 3, "base_lrs": [0.1]}, path)
    >>> read_scheduler(path)["last_epoch"]
    3
    """
    sd = ptfile.load(path)
    if not isinstance(sd, Mapping):
        raise FormatError(f"{path}: holds a {type(sd).__name__}, expected an LR scheduler's state_dict")
    return sd


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` from ``model.safetensors`` (or ``pytorch_model.bin``), arrays mapped from the file.

    >>> import tempfile
    >>> from optstate.schema.fileformat import write_safetensors
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> write_safetensors(path, [("fc.weight", np.ones((2, 3)))], {"format": "pt"})
    >>> {k: v.shape for k, v in read_weights(path).items()}
    {'fc.weight': (2, 3)}
    """
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    weights = ptfile.load(path)
    if not torch_dict.is_tensor_dict(weights):
        raise FormatError(f"{path}: holds a {type(weights).__name__}, expected the model's state_dict")
    return dict(weights)


# ----------------------------------------------------------------------------- naming the parameters


def saved_param_names(sd: Mapping[str, Any]) -> list[str] | None:
    """The ``param_names`` the optimizer saved (built from ``model.named_parameters()``), else ``None``.

    >>> saved_param_names({"param_groups": [{"params": [0, 1], "param_names": ["w", "b"]}]})
    ['w', 'b']
    >>> saved_param_names({"param_groups": [{"params": [0, 1]}]}) is None
    True
    """
    groups = sd["param_groups"]
    if not all("param_names" in g for g in groups):
        return None
    return [name for g in groups for name in g["param_names"]]


def refuse_unnamed(files: SaveStateFiles) -> UnsupportedError:
    """The error for an optimizer without ``param_names`` and no model given: sorted weights cannot name it."""
    weights = (
        f"{files.weights.name} stores its keys sorted, not in the order the optimizer was built from, so it cannot "
        "name them; "
        if files.weights is not None
        else ""
    )
    return UnsupportedError(
        f"{files.optimizer}: the optimizer saved no param_names (one built from model.parameters() does not); "
        f"{weights}pass --model module:function returning the model it was built from, or a Hugging Face model "
        "directory (model= in Python)"
    )


# ----------------------------------------------------------------------------- the state


def refuse_scheduler_stepped_per_process(state: OptimizerState, files: SaveStateFiles) -> None:
    """Refuse an LR schedule whose steps per optimizer step cannot be told.

    Under ``N`` processes (``N`` RNG files), accelerate steps a prepared scheduler ``N`` times per optimizer
    step unless ``split_batches``. Where the optimizer counts its steps, the Optax writer compares the two
    counts; an optimizer that keeps no step count (SGD) cannot tell, so the schedule is refused here.
    """
    if state.metadata.lr_scheduler is None or state.spec.has_step or files.processes < 2:
        return
    raise UnsupportedError(
        f"{files.directory}: saved by {files.processes} processes, and accelerate steps the LR scheduler once per "
        f"process per optimizer step unless split_batches; {state.spec.torch_class} keeps no step count to tell "
        "which, so the schedule optstate would continue is unknown"
    )


def read_save_state(files: SaveStateFiles, options: ReadOptions) -> OptimizerState:
    """The canonical state of a ``save_state`` directory's files: optimizer, weights and LR scheduler.

    The model is built (torch imported) only where the optimizer saved no ``param_names``.
    """
    source = os.fspath(files.optimizer)
    sd = read_optimizer(files.optimizer)
    model = None
    if saved_param_names(sd) is None:
        if options.model is None:
            raise refuse_unnamed(files)
        model = torch_dict.torch_model(options.model)
    checkpoint: dict[str, Any] = {"optimizer": sd}
    if files.weights is not None:
        checkpoint["model"] = read_weights(files.weights)
    if files.scheduler is not None:
        checkpoint["lr_scheduler"] = read_scheduler(files.scheduler)
    state = torch_dict.state_from_checkpoint(
        checkpoint, source, origin="accelerate", optimizer=options.optimizer, model=model
    )
    refuse_scheduler_stepped_per_process(state, files)
    return state


def not_carried_notes(files: SaveStateFiles) -> tuple[str, ...]:
    """One note per kind of file that holds no optimizer state and is left behind, unopened.

    >>> not_carried_notes(SaveStateFiles(Path("d"), Path("d/optimizer.bin"), not_carried=("random_states_0.pkl",)))
    ('not carried (never opened): random_states_0.pkl: RNG states (Python, NumPy, torch)',)
    """
    notes = []
    for pattern, held in NOT_CARRIED:
        found = [n for n in files.not_carried if pattern.fullmatch(n)]
        if found:
            notes.append(f"not carried (never opened): {', '.join(found)}: {held}")
    return tuple(notes)


# ----------------------------------------------------------------------------- the "accelerate" format's entries


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``accelerate`` format (:mod:`optstate.converters.formats`): a ``save_state`` directory.

    >>> import tempfile
    >>> from optstate.schema.fileformat import write_safetensors
    >>> d = Path(tempfile.mkdtemp())
    >>> group = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0}
    >>> _ = ptfile.save({"state": {0: {"momentum_buffer": np.ones(2)}},
    ...              "param_groups": [{**group, "params": [0], "param_names": ["fc.w"]}]}, d / "optimizer.bin")
    >>> write_safetensors(d / "model.safetensors", [("fc.w", np.zeros(2))], {"format": "pt"})
    >>> state = read(d, ReadOptions())
    >>> state.optimizer, state.params[0].path, sorted(state.weights)
    ('sgd', ('fc', 'w'), [('fc', 'w')])
    """
    return read_save_state(save_state_files(path), options)


def inspect(path: str | os.PathLike, fmt: str = "accelerate", options: ReadOptions = ReadOptions()) -> Report:
    """The report of a ``save_state`` directory (the ``accelerate`` format's inspector): the state, where its
    parameter names come from, and the files it leaves behind (RNG states, loss scale, ...).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> group = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0}
    >>> _ = ptfile.save({"state": {0: {"momentum_buffer": np.ones(2)}},
    ...              "param_groups": [{**group, "params": [0], "param_names": ["w"]}]}, d / "optimizer.bin")
    >>> _ = (d / "random_states_0.pkl").write_bytes(b"never read")
    >>> report = inspect(d)
    >>> report.optimizer
    'SGD'
    >>> for note in report.notes: print(note)
    no model weights in this file
    not carried (never opened): random_states_0.pkl: RNG states (Python, NumPy, torch)
    """
    from ...report import inspect_state  # the report module imports the format registry, which names this one

    files = save_state_files(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = read_save_state(files, dataclasses.replace(options, allow_approximate=True))
    report = inspect_state(os.fspath(path), fmt, state)
    named = saved_param_names(read_optimizer(files.optimizer)) is not None
    names = "param_names" if named else "aligned by position with the model given (--model)"
    return dataclasses.replace(
        report,
        names=names,
        notes=report.notes + (() if named else (f"parameter names: {names}",)) + not_carried_notes(files),
    )


# ----------------------------------------------------------------------------- writing


def model_layout(state: OptimizerState, target: TargetModel) -> tuple[list[str], dict[str, str]]:
    """``(the state's names in the model's order, state name -> model name)``: the model's trainable
    ``named_parameters()`` give the order its optimizer numbers its tensors in (as one built from
    ``model.parameters()`` does); each tracked parameter's shape and dtype checked against the model's.

    >>> import torch
    >>> from optstate.schema import ParamInfo
    >>> from .target import target_of
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), tuple(ParamInfo((n,), (1,), "float32", 0) for n in "ba"), {})
    >>> model_layout(s, target_of(torch.nn.Linear(1, 1)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.MappingError: the model's optimizer updates ['weight', 'bias'] and the state tracks ['b', 'a']: ...
    """
    renamed = model_names([path_to_name(p.path) for p in state.params], target.trainable, target.source)
    check_params(state, target, renamed)
    back = {module: name for name, module in renamed.items()}
    return [back[name] for name in target.trainable if name in back], renamed


def scheduler_to_write(state: OptimizerState, where: str = "accelerate") -> dict[str, Any] | None:
    """The LR scheduler state ``scheduler.bin`` holds: the state's own (stepped once per optimizer step, as
    accelerate steps it in one process); ``None`` where none drove the state or the user said the lr stays
    (:func:`.identify.refuse_uncarried_schedule` refuses the rest).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "initial_lr": 0.2},), (ParamInfo(("w",), (1,), "float64", 0),), {})
    >>> scheduler_to_write(s.with_metadata(constant_lr=True)) is None
    True
    >>> scheduler_to_write(s)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: accelerate: the state followed an LR schedule that it does not carry (param ...
    """
    refuse_uncarried_schedule(state, where)
    sd = state.metadata.lr_scheduler
    if sd is None:
        return None
    steps = {p.step for p in state.params if p.step is not None}
    if steps and last_epoch(sd) != max(steps):
        raise UnsupportedError(
            f"{where}: the LR scheduler has stepped {last_epoch(sd)} times and the optimizer {max(steps)}; "
            "accelerate in one process steps a prepared scheduler once per optimizer step"
        )
    plain: dict[str, Any] = torch_dict.plain_scheduler_state(sd)
    if "_last_lr" in plain and len(plain["_last_lr"]) != len(state.param_groups):
        raise FormatError(
            f"{where}: the LR scheduler's state has {len(plain['_last_lr'])} lrs (_last_lr) for "
            f"{len(state.param_groups)} param groups"
        )
    return plain


def optimizer_to_write(
    state: OptimizerState,
    order: list[str],
    renamed: dict[str, str],
    scheduler: dict[str, Any] | None,
    where: str = "accelerate",
) -> dict[str, Any]:
    """``optimizer.bin``'s ``state_dict``: the state's param groups, their parameters in ``order``, named as the
    model names them (``renamed``); each group's ``lr`` checked against the scheduler's last and ``initial_lr``
    its base, or, without a scheduler, the keys one leaves dropped (:func:`.target.scheduled_group`).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), tuple(ParamInfo((n,), (1,), "float64", 0)
    ...     for n in "ab"), {("momentum", (n,)): np.full(1, float(i)) for i, n in enumerate("ab")})
    >>> sd = optimizer_to_write(s, ["b", "a"], {"a": "m.a", "b": "m.b"}, None)
    >>> sd["param_groups"][0]["param_names"], sd["state"][0]["momentum_buffer"].tolist()
    (['m.b', 'm.a'], [1.0])
    """
    group_of = {path_to_name(p.path): p.group for p in state.params}
    groups = [
        (scheduled_group(state.spec.with_defaults(hp), gi, scheduler, where), [n for n in order if group_of[n] == gi])
        for gi, hp in enumerate(state.param_groups)
    ]
    return optimizer_state_dict(state, groups, renamed)


def weights_to_write(state: OptimizerState, target: TargetModel | None, renamed: dict[str, str]) -> dict[str, Any]:
    """``model.safetensors``' tensors, named as the model names them; with the model, exactly its
    ``state_dict()``'s tensors, shapes and dtypes (accelerate loads them strictly, :func:`.target.model_weights`).

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (1,), "float64", 0),), {}, {("w",): np.ones(1)})
    >>> weights_to_write(s, None, {"w": "w"})
    {'w': array([1.])}
    """
    if target is not None:
        return model_weights(state, target, renamed, loader="accelerate's load_state")
    if state.weights is None:
        raise UnsupportedError(
            "the state holds no model weights, and accelerate's load_state loads model.safetensors into the "
            "model; convert from a checkpoint that holds them"
        )
    return {path_to_name(p): a for p, a in state.weights.items()}


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``accelerate`` format: a directory ``Accelerator.load_state(path)`` resumes, after
    ``accelerator.prepare(model, optimizer[, scheduler])`` in one process: ``model.safetensors``,
    ``optimizer.bin`` and, where a scheduler drove the state, ``scheduler.bin``, renamed into place whole.

    The optimizer's tensors are numbered in the order of the model's ``named_parameters()`` (``options.model``,
    ``--model``), group by group as the state's; without a model, in the state's order, which is refused
    where it is not known to be a torch optimizer's (:func:`.target.require_torch_order`). No
    ``random_states_0.pkl``: the RNG states of the run are not part of the state, and ``load_state`` goes on
    without them ("Could not load random states"), leaving the process's RNGs as they are.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float64", 0),),
    ...     {("momentum", ("w",)): np.ones(2)}, {("w",): np.zeros(2)}).with_metadata(source="torch")
    >>> out = Path(tempfile.mkdtemp()) / "ckpt"
    >>> write(s, out, WriteOptions())
    >>> sorted(p.name for p in out.iterdir()), read(out, ReadOptions()).slots[("momentum", ("w",))].tolist()
    (['model.safetensors', 'optimizer.bin'], [1.0, 1.0])
    """
    where = os.fspath(path)
    torch_dict.refuse_optax_native(state.spec)
    target = None if options.model is None else load_target(options.model)[0]
    require_torch_order(state, target, where)
    if target is not None:
        order, renamed = model_layout(state, target)
    else:
        order = [path_to_name(p.path) for p in state.params]
        renamed = {n: n for n in order}
    scheduler = scheduler_to_write(state, where)
    optimizer = optimizer_to_write(state, order, renamed, scheduler, where)
    weights = weights_to_write(state, target, renamed)
    with write_directory(path, options) as save:
        save(weights, WEIGHTS[0])
        save(optimizer, OPTIMIZER)
        if scheduler is not None:
            save(scheduler, SCHEDULER)
    if scheduler is None:
        warnings.warn(NO_SCHEDULER.format(where=where), stacklevel=2)
