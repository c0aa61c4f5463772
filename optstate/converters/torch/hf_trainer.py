"""Hugging Face Trainer ``checkpoint-N/`` directories, read as the Trainer itself would resume from them.

A checkpoint holds ``optimizer.pt`` (the torch optimizer's ``state_dict``: two param groups, weight
decay and none, and no ``param_names``), ``scheduler.pt`` (a ``LambdaLR`` whose function torch did not
save), ``model.safetensors`` (keys sorted, a tied ``lm_head`` stored once), ``config.json``,
``trainer_state.json`` (``global_step``, ``max_steps``) and ``training_args.bin`` (a pickle of
``TrainingArguments``). Each missing piece is rebuilt from what the Trainer rebuilds it from:

- **names**: ``Trainer.create_optimizer`` puts ``model.named_parameters()`` (trainable ones) into group 0
  when ``Trainer.get_decay_parameter_names`` lists them, else into group 1. The model is built from
  ``config.json`` on the meta device (:func:`optstate.converters.torch.models.load_model`; ``--model``
  overrides it) and split by transformers' own function; every count and shape is checked against
  ``optimizer.pt`` and the weights.
- **the schedule**: ``lr_scheduler_type``, the warm-up, ``lr_scheduler_kwargs`` (training_args.bin, read
  as inert records, never unpickled into objects) and ``max_steps`` (trainer_state.json) name the
  transformers function the LambdaLR ran (:mod:`optstate.converters.schedules.transformers`), checked
  against the lr the scheduler saved. The Optax schedule is exact up to ``max_steps`` (the horizon).

Nothing from the checkpoint is run; the files are read by :mod:`.ptfile` and optstate's safetensors
reader. torch and transformers are imported only to build the model on the meta device.

The way back (:func:`write_checkpoint`, the format's writer) writes what ``Trainer.train(resume_from_checkpoint=)``
loads, with NumPy (:func:`.ptfile.save`, optstate's safetensors writer): model.safetensors, optimizer.pt in
the two groups ``Trainer.create_optimizer`` builds for the model given (``--model``), scheduler.pt (the
LambdaLR's state at the step), trainer_state.json and config.json (from a model directory). The Trainer
rebuilds its optimizer class and its schedule's function from its TrainingArguments, so the writer names
the ones that continue the state (returned, warned, and kept in :data:`RESUME_ARGUMENTS`, from which this
reader takes the schedule where there is no training_args.bin); a state whose groups or schedule no
TrainingArguments rebuild is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import FormatError, MappingError, MissingDependencyError, OptstateError, UnsupportedError
from ...schema.fileformat import read_safetensors, read_sharded_safetensors
from ...schema.state import OptimizerState, path_to_name
from ..formats import ReadOptions, WriteOptions
from ..schedules.identify import LAMBDA, refuse_uncarried_schedule, scheduler_class
from ..schedules.transformers import (
    KEY,
    REFUSED_TYPES,
    TransformersSchedule,
    attach,
    lambda_lr_state,
    num_warmup_steps,
    schedule_from_arguments,
    trainer_arguments,
)
from . import ptfile
from .state_dict import state_from_checkpoint
from .target import (
    TargetModel,
    check_params,
    in_model_names,
    load_target,
    model_weights,
    optimizer_state_dict,
    require_torch_order,
    write_directory,
    written_step,
)

if TYPE_CHECKING:
    import torch

    from ...report import Report

__all__ = [
    "RESUME_ARGUMENTS",
    "TrainerArguments",
    "TrainerBookkeeping",
    "TrainerCheckpoint",
    "decay_split",
    "inspect",
    "name_param_groups",
    "read",
    "trainer_state_document",
    "write",
    "write_checkpoint",
]

#: The Trainer's ``optim`` values whose optimizer is torch's own class (``torch.optim.AdamW``, ``SGD``, ...):
#: the others are transformers', bitsandbytes' or another library's, whose state optstate does not read.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")

# The files the Trainer writes that a conversion does not carry, and what is lost with them.
_NOT_CARRIED = {
    "rng_state": "the run's RNG states (dropout masks and the data order continue differently)",
    "scaler.pt": "the fp16 GradScaler's loss scale",
}

_GROUPS = ("weight decay", "no weight decay")

#: Written beside the Trainer's files: the TrainingArguments the checkpoint continues exactly under. The Trainer
#: ignores it; optstate reads the schedule from it where there is no training_args.bin.
RESUME_ARGUMENTS = "optstate_training_args.json"


@dataclass(frozen=True)
class TrainerArguments:
    """The ``TrainingArguments`` fields a conversion reads, from ``training_args.bin``'s inert record.

    >>> record = ptfile.Record("transformers.training_args", "TrainingArguments", state={
    ...     "lr_scheduler_type": ptfile.Record("transformers.trainer_utils", "SchedulerType", ("cosine",)),
    ...     "learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 0.1, "lr_scheduler_kwargs": None,
    ...     "optim": ptfile.Record("transformers.training_args", "OptimizerNames", ("adamw_torch",)),
    ...     "max_grad_norm": 1.0})
    >>> args = TrainerArguments.from_record(record, "training_args.bin")
    >>> args.lr_scheduler_type, args.optim, args.warmup_ratio
    ('cosine', 'adamw_torch', None)
    """

    lr_scheduler_type: str
    learning_rate: float
    weight_decay: float
    warmup_steps: float
    warmup_ratio: float | None  # transformers 4.x; 5 folds a ratio into warmup_steps < 1
    lr_scheduler_kwargs: Mapping[str, Any]
    optim: str
    max_grad_norm: float | None

    @classmethod
    def from_record(cls, record: Any, source: str) -> TrainerArguments:
        """The fields of a ``TrainingArguments`` record (:class:`.ptfile.Record`); a missing one is named."""
        if not isinstance(record, ptfile.Record) or not isinstance(record.state, dict):
            raise FormatError(f"{source}: holds a {type(record).__name__}, not a pickled TrainingArguments")

        def field(name: str) -> Any:
            if name not in record.state:
                raise FormatError(f"{source}: {record.module}.{record.name} has no field {name!r}")
            return _enum_value(record.state[name])

        return cls(
            lr_scheduler_type=str(field("lr_scheduler_type")),
            learning_rate=float(field("learning_rate")),
            weight_decay=float(field("weight_decay")),
            warmup_steps=float(field("warmup_steps")),
            warmup_ratio=record.get("warmup_ratio"),
            lr_scheduler_kwargs=_kwargs(field("lr_scheduler_kwargs"), source),
            optim=str(field("optim")),
            max_grad_norm=record.get("max_grad_norm"),
        )

    @classmethod
    def from_json(cls, path: Path) -> TrainerArguments:
        """The arguments optstate's writer recorded in :data:`RESUME_ARGUMENTS` (where no training_args.bin is).

        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / RESUME_ARGUMENTS
        >>> _ = f.write_text('{"TrainingArguments": {"optim": "sgd", "learning_rate": 0.1, "weight_decay": 0.0, '
        ...     '"lr_scheduler_type": "constant", "warmup_steps": 0, "lr_scheduler_kwargs": {}}}')
        >>> TrainerArguments.from_json(f).lr_scheduler_type
        'constant'
        """
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))["TrainingArguments"]
            return cls(
                lr_scheduler_type=str(fields["lr_scheduler_type"]),
                learning_rate=float(fields["learning_rate"]),
                weight_decay=float(fields["weight_decay"]),
                warmup_steps=float(fields["warmup_steps"]),
                warmup_ratio=None,
                lr_scheduler_kwargs=_kwargs(fields["lr_scheduler_kwargs"], str(path)),
                optim=str(fields["optim"]),
                max_grad_norm=None,
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(
                f"{path}: not the TrainingArguments optstate records ({type(exc).__name__}: {exc})"
            ) from None


def _enum_value(value: Any) -> Any:
    """An enum member (``SchedulerType.COSINE``, pickled as a record) as its value; anything else as it is."""
    return value.value if isinstance(value, ptfile.Record) else value


def _kwargs(value: Any, source: str) -> dict[str, Any]:
    """``lr_scheduler_kwargs``: a dict, None, or the JSON string the command line gave."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise FormatError(f"{source}: lr_scheduler_kwargs {value!r} is not JSON ({exc})") from None
    if not isinstance(value, Mapping):
        raise FormatError(f"{source}: lr_scheduler_kwargs is a {type(value).__name__}, not a dict")
    return dict(value)


@dataclass(frozen=True)
class TrainerCheckpoint:
    """What a ``checkpoint-N/`` directory holds, read without running any of it: the files, the step counts
    (trainer_state.json), the arguments (None without training_args.bin), the optimizer's and the
    scheduler's state dicts and the model weights (memory-mapped)."""

    directory: Path
    files: tuple[str, ...]
    global_step: int
    max_steps: int
    transformers_version: str | None
    arguments: TrainerArguments | None
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any] | None
    weights: Mapping[str, np.ndarray]

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainerCheckpoint:
        """Read the directory ``path``; a file the conversion needs and does not find is named.

        >>> TrainerCheckpoint.read("no/such/checkpoint-5")
        Traceback (most recent call last):
        optstate.errors.FormatError: no/such/checkpoint-5: not a directory
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FormatError(f"{directory}: not a directory")
        global_step, max_steps = _trainer_state(directory / "trainer_state.json")
        optimizer = ptfile.load(_needed(directory, "optimizer.pt", "the optimizer state (save_only_model=True?)"))
        scheduler = ptfile.load(directory / "scheduler.pt") if (directory / "scheduler.pt").is_file() else None
        arguments_file, resume_file = directory / "training_args.bin", directory / RESUME_ARGUMENTS
        arguments = (
            TrainerArguments.from_record(ptfile.load(arguments_file, records=True), str(arguments_file))
            if arguments_file.is_file()
            else TrainerArguments.from_json(resume_file)
            if resume_file.is_file()
            else None
        )
        return cls(
            directory,
            tuple(sorted(p.name for p in directory.iterdir())),
            global_step,
            max_steps,
            _transformers_version(directory / "config.json"),
            arguments,
            optimizer,
            scheduler,
            _weights(directory),
        )


def _needed(directory: Path, name: str, what: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FormatError(f"{directory}: no {name}, so no {what}; a Hugging Face Trainer checkpoint holds it")
    return path


def _trainer_state(path: Path) -> tuple[int, int]:
    """``(global_step, max_steps)`` from trainer_state.json."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable as JSON ({exc})") from None
    steps = []
    for key in ("global_step", "max_steps"):
        value = document.get(key) if isinstance(document, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{path}: {key} must be a non-negative integer, got {value!r}")
        steps.append(value)
    return steps[0], steps[1]


def _transformers_version(path: Path) -> str | None:
    try:
        version = json.loads(path.read_text(encoding="utf-8")).get("transformers_version")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _weights(directory: Path) -> dict[str, np.ndarray]:
    """The model's tensors by name: model.safetensors, or the shards its index names."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)[0]
    if index.is_file():
        return read_sharded_safetensors(index)[0]
    if (directory / "adapter_config.json").is_file():
        raise UnsupportedError(
            f"{directory}: a PEFT adapter checkpoint (adapter_config.json): its optimizer tracks the adapter's "
            "parameters, which config.json does not describe; not read yet"
        )
    raise FormatError(
        f"{directory}: no model.safetensors (or its index); the Trainer writes one unless save_safetensors=False "
        "(pytorch_model.bin, not read: it stores a tied weight twice)"
    )


# ----------------------------------------------------------------------------- names


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The trainable parameters' names as ``Trainer.create_optimizer`` groups them: those
    ``Trainer.get_decay_parameter_names`` lists (weight decay), then the rest, each in
    ``model.named_parameters()`` order (a tied weight once).

    transformers' own function decides: it is called unbound, since it reads nothing of the Trainer
    (transformers 4.x to 5.x), so the split follows the installed transformers' rule (biases, LayerNorm and
    names like ``norm`` undecayed) without a copy of it here.

    >>> import torch, transformers
    >>> decay_split(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    (['0.weight'], ['0.bias', '1.weight', '1.bias'])
    """
    try:
        from transformers import Trainer
    except ImportError as exc:
        raise MissingDependencyError(
            "a Hugging Face Trainer checkpoint is split into its param groups by transformers' "
            "Trainer.get_decay_parameter_names: pip install transformers"
        ) from exc
    try:
        decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    except AttributeError as exc:  # a transformers whose rule reads the Trainer's own settings
        raise UnsupportedError(
            f"this transformers' Trainer.get_decay_parameter_names needs a Trainer ({exc}); its param groups "
            "cannot be rebuilt from the model alone"
        ) from None
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n in decay], [n for n in trainable if n not in decay]


def name_param_groups(
    sd: Mapping[str, Any],
    groups: Sequence[Sequence[str]],
    shapes: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, np.ndarray],
    source: str,
) -> dict[str, Any]:
    """The optimizer state dict ``sd`` with each group's ``param_names``: ``groups`` (the names, in the
    groups' order), checked: as many groups and tensors as ``sd`` holds, and every tensor of the state and
    every weight shaped as the model says (``shapes``). A mismatch is refused naming the parameter.

    >>> sd = {"state": {0: {"step": np.array(1.0), "exp_avg": np.zeros((2, 3))}},
    ...       "param_groups": [{"weight_decay": 0.1, "params": [0]}, {"weight_decay": 0.0, "params": [1]}]}
    >>> w = {"fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(2)}
    >>> named = name_param_groups(sd, [["fc.weight"], ["fc.bias"]], {n: a.shape for n, a in w.items()}, w, "opt.pt")
    >>> [g["param_names"] for g in named["param_groups"]]
    [['fc.weight'], ['fc.bias']]
    >>> name_param_groups(sd, [["fc.bias"], ["fc.weight"]], {n: a.shape for n, a in w.items()}, w, "opt.pt")
    Traceback (most recent call last):
    optstate.errors.MappingError: opt.pt: 'fc.bias' (param group 0, weight decay) has shape [2] in the model, ...
    """
    saved = sd["param_groups"]
    if len(saved) != len(groups):
        raise MappingError(
            f"{source}: {len(saved)} param groups, where Trainer.create_optimizer makes {len(groups)} "
            f"({', '.join(_GROUPS)}): built by a subclass's create_optimizer or passed as optimizers=(...)?"
        )
    named = []
    for gi, (group, names) in enumerate(zip(saved, groups, strict=True)):
        label = f"param group {gi}, {_GROUPS[gi] if gi < len(_GROUPS) else 'another group'}"
        if len(group["params"]) != len(names):
            raise MappingError(
                f"{source}: {label} holds {len(group['params'])} tensors, the model's parameters for it are "
                f"{len(names)} (e.g. {', '.join(names[:3]) or 'none'}): not the model these groups were built from"
            )
        for name, index in zip(names, group["params"], strict=True):
            _check_shapes(name, shapes[name], sd["state"].get(index, {}), weights, f"{source}: {name!r} ({label})")
        named.append({**group, "param_names": list(names)})
    return {**sd, "param_groups": named}


def _check_shapes(
    name: str, shape: tuple[int, ...], entry: Mapping[str, Any], weights: Mapping[str, np.ndarray], where: str
) -> None:
    for key, value in entry.items():
        if isinstance(value, np.ndarray) and value.ndim and tuple(value.shape) != tuple(shape):
            raise MappingError(f"{where} has shape {list(shape)} in the model, its {key} {list(value.shape)}")
    if name not in weights:
        raise MappingError(f"{where} is not among the model weights (model.safetensors)")
    if tuple(weights[name].shape) != tuple(shape):
        raise MappingError(f"{where} has shape {list(shape)} in the model, {list(weights[name].shape)} in the weights")


def _named_optimizer(checkpoint: TrainerCheckpoint, model: torch.nn.Module, source: str) -> dict[str, Any]:
    """optimizer.pt with its param_names: saved ones kept (a custom optimizer built from named parameters),
    else the Trainer's split rebuilt, its weight decay checked against the arguments."""
    sd = checkpoint.optimizer
    if all("param_names" in g for g in sd.get("param_groups") or [{}]):
        return dict(sd)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    named = name_param_groups(sd, decay_split(model), shapes, checkpoint.weights, source)
    args = checkpoint.arguments
    if args is not None:
        for gi, want in enumerate((args.weight_decay, 0.0)):
            got = float(named["param_groups"][gi].get("weight_decay", 0.0))
            if got != want:
                raise MappingError(
                    f"{source}: param group {gi} ({_GROUPS[gi]}) has weight_decay {got}, where the Trainer with "
                    f"training_args.bin's weight_decay={args.weight_decay} sets {want}: not the Trainer's groups"
                )
    return named


# ----------------------------------------------------------------------------- the schedule


def _trainer_schedule(checkpoint: TrainerCheckpoint) -> TransformersSchedule:
    """The transformers schedule ``Trainer.create_scheduler`` built: ``get_scheduler(lr_scheduler_type,
    num_warmup_steps=args.get_warmup_steps(max_steps), num_training_steps=max_steps, lr_scheduler_kwargs)``."""
    args = checkpoint.arguments
    if args is None:
        raise FormatError(
            f"{checkpoint.directory}: scheduler.pt is a LambdaLR, whose function torch does not save, and there "
            "is no training_args.bin to name it (lr_scheduler_type, warmup_steps)"
        )
    total = checkpoint.max_steps
    return schedule_from_arguments(
        args.lr_scheduler_type,
        num_warmup_steps=num_warmup_steps(args.warmup_steps, total, args.warmup_ratio),
        num_training_steps=total,
        learning_rate=args.learning_rate,
        lr_scheduler_kwargs=args.lr_scheduler_kwargs,
    )


def _scheduler_state(checkpoint: TrainerCheckpoint) -> Mapping[str, Any] | None:
    """scheduler.pt, a LambdaLR carrying the transformers schedule the arguments name (checked against its
    saved lr); another scheduler (passed to the Trainer as optimizers=(..., scheduler)) as it is."""
    sd, args = checkpoint.scheduler, checkpoint.arguments
    if sd is not None and args is not None and args.lr_scheduler_type in REFUSED_TYPES:
        raise UnsupportedError(
            f"{checkpoint.directory / 'training_args.bin'}: lr_scheduler_type {args.lr_scheduler_type!r}: "
            f"{REFUSED_TYPES[args.lr_scheduler_type]}; no schedule of the step count reproduces it"
        )
    if sd is None or scheduler_class(sd) != LAMBDA:
        return sd
    source = str(checkpoint.directory / "scheduler.pt")
    try:
        return attach(sd, _trainer_schedule(checkpoint), source)
    except (FormatError, UnsupportedError) as exc:
        raise type(exc)(f"{checkpoint.directory / 'training_args.bin'}: {exc}") from None


# ----------------------------------------------------------------------------- the format's entries


def _model(checkpoint: TrainerCheckpoint, spec: Any) -> torch.nn.Module:
    from .models import load_model  # torch, on the meta device

    if spec is None and not (checkpoint.directory / "config.json").is_file():
        # optstate's own output over a module:function model has no config.json (the Trainer does not need one)
        raise FormatError(
            f"{checkpoint.directory}: no config.json to build the model from, and optimizer.pt does not name its "
            "parameters: pass --model module:function (the model the Trainer trains, as given to convert --to "
            "hf-trainer) or a Hugging Face model directory"
        )
    return load_model(checkpoint.directory if spec is None else spec)


def _check_optimizer(checkpoint: TrainerCheckpoint) -> None:
    args = checkpoint.arguments
    if args is not None and args.optim not in TORCH_OPTIMIZERS:
        raise UnsupportedError(
            f"{checkpoint.directory / 'training_args.bin'}: optim={args.optim!r} is not one of torch's own "
            f"optimizers ({', '.join(TORCH_OPTIMIZERS)}); its state is not read"
        )


def _state(checkpoint: TrainerCheckpoint, options: ReadOptions, *, schedule: bool = True) -> OptimizerState:
    """The canonical state; ``schedule=False`` carries scheduler.pt as saved (for a report that names the refusal)."""
    _check_optimizer(checkpoint)
    source = str(checkpoint.directory / "optimizer.pt")
    model = _model(checkpoint, options.model)
    sd = _named_optimizer(checkpoint, model, source)
    scheduler = _scheduler_state(checkpoint) if schedule else checkpoint.scheduler
    model_buffers = {name for name, _ in model.named_buffers()}
    version = checkpoint.transformers_version
    state = state_from_checkpoint(
        {"optimizer": sd, **({"lr_scheduler": scheduler} if scheduler is not None else {})},
        source,
        origin="Hugging Face Trainer" + (f" (transformers {version})" if version else ""),
        optimizer=options.optimizer,
        weights=checkpoint.weights,
        buffers=[name for name in checkpoint.weights if name in model_buffers],
    )
    # The Trainer never steps past max_steps: the schedule is exact up to it (all steps where it settles earlier).
    return state.with_metadata(lr_horizon=checkpoint.max_steps) if scheduler is not None else state


def read(path: str | os.PathLike, options: ReadOptions) -> OptimizerState:
    """The reader of the ``hf-trainer`` format: a Trainer's ``checkpoint-N/`` as the canonical state, its
    weights, param names and LR schedule included. ``options.model`` (a torch module, ``module:function``
    or model directory) replaces the model config.json describes; ``options.optimizer`` names the family
    where the param groups cannot.

    >>> state = read("out/checkpoint-500", ReadOptions())  # doctest: +SKIP
    >>> state.param_groups[0]["weight_decay"], state.metadata.lr_horizon  # doctest: +SKIP
    (0.01, 1000)
    """
    return _state(TrainerCheckpoint.read(path), options)


def inspect(path: str, fmt: str = "hf-trainer", options: ReadOptions = ReadOptions()) -> Report:
    """The ``hf-trainer`` format's inspector: the state's report, with what the Trainer's files say beside
    it (the steps, the groups, the schedule) and what a conversion does not carry (rng_state.pth). A
    schedule that does not convert is reported as the refusal, the rest as read.

    >>> print(format_report(inspect("out/checkpoint-500")))  # doctest: +SKIP
    """
    from ...report import inspect_state

    checkpoint = TrainerCheckpoint.read(path)
    options = dataclasses.replace(options, allow_approximate=True)
    try:
        report = inspect_state(path, fmt, _state(checkpoint, options))
    except (FormatError, UnsupportedError) as exc:
        if checkpoint.scheduler is None:
            raise
        # The rest as read (a refusal that is not the schedule's raises again here), the schedule's as the verdict.
        report = dataclasses.replace(
            inspect_state(path, fmt, _state(checkpoint, options, schedule=False)), optax=f"refused: {exc}"
        )
    return dataclasses.replace(report, notes=tuple(_notes(checkpoint, report.param_groups)) + report.notes)


def _notes(checkpoint: TrainerCheckpoint, groups: Sequence[Mapping[str, Any]]) -> list[str]:
    version = f" (transformers {checkpoint.transformers_version})" if checkpoint.transformers_version else ""
    notes = [
        f"Hugging Face Trainer checkpoint{version}: global_step {checkpoint.global_step} of max_steps "
        f"{checkpoint.max_steps}; files: {', '.join(checkpoint.files)}"
    ]
    if len(groups) == len(_GROUPS):
        notes.append(
            "param groups as Trainer.create_optimizer makes them: "
            + ", ".join(f"group {gi} {label} ({groups[gi].get('params')} params)" for gi, label in enumerate(_GROUPS))
        )
    notes.append(_schedule_note(checkpoint))
    args = checkpoint.arguments
    if args is not None and args.max_grad_norm:
        notes.append(
            f"the Trainer clipped gradients to max_grad_norm={args.max_grad_norm} (a training-loop setting, not "
            "optimizer state): chain optax.clip_by_global_norm before the optimizer to train alike "
            "(torch divides by norm + 1e-6, Optax by norm)"
        )
    lost = [
        f"{name}, {what}"
        for name in checkpoint.files
        for prefix, what in _NOT_CARRIED.items()
        if name.startswith(prefix)
    ]
    if lost:
        notes.append(f"not carried: {'; '.join(lost)}")
    return notes


def _arguments_file(checkpoint: TrainerCheckpoint) -> str:
    return "training_args.bin" if "training_args.bin" in checkpoint.files else RESUME_ARGUMENTS


def _schedule_note(checkpoint: TrainerCheckpoint) -> str:
    sd = checkpoint.scheduler
    if sd is None:
        return "no scheduler.pt: the LR schedule is not in this checkpoint"
    try:
        if scheduler_class(sd) != LAMBDA:
            return f"LR scheduler: scheduler.pt's {scheduler_class(sd)}, as saved"
        schedule = _trainer_schedule(checkpoint)
    except OptstateError as exc:
        return f"LR schedule: not reproduced ({exc})"
    settles = schedule.settles_at()
    span = (
        "every step" if settles is not None and settles <= checkpoint.max_steps else f"steps 0..{checkpoint.max_steps}"
    )
    return (
        f"LR schedule: {schedule.describe()}, rebuilt from the TrainingArguments ({_arguments_file(checkpoint)}) and "
        f"max_steps (torch does not save the LambdaLR's function); exact in Optax for {span}"
    )


# ----------------------------------------------------------------------------- writing a checkpoint-N/
# The Trainer resumes by building its optimizer and LambdaLR from its TrainingArguments, then loading optimizer.pt
# (whose param groups replace the built ones, hyperparameters included) and scheduler.pt (base_lrs, last_epoch)
# into them; the LambdaLR's function stays the one the arguments name. So the written groups must be the
# Trainer's (count, order, membership) and the schedule one the arguments can name.

#: The ``optim`` under which the Trainer builds each family's torch class, the one optimizer.pt loads into.
TRAINER_OPTIM = types.MappingProxyType(
    {"adamw": "adamw_torch", "sgd": "sgd", "adagrad": "adagrad", "rmsprop": "rmsprop"}
)

_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

# TrainerControl.state()'s arguments, all off between steps.
_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


@dataclass(frozen=True)
class TrainerBookkeeping:
    """trainer_state.json fields that no optimizer state holds; by default ``TrainingArguments``' own defaults.

    The Trainer keeps the file's values when it resumes (transformers logs a warning where they differ from
    the arguments): a resumed run logs, evaluates and saves every ``logging_steps``, ``eval_steps``,
    ``save_steps`` written here, and with ``auto_find_batch_size`` starts from ``train_batch_size``. A
    checkpoint of the run given as the model (``--model checkpoint-N/``) gives its own.

    >>> TrainerBookkeeping().save_steps
    500
    """

    train_batch_size: int = 8
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500

    @classmethod
    def of_directory(cls, spec: Any) -> TrainerBookkeeping:
        """The fields of a model directory that is a checkpoint of the run (its trainer_state.json), else the
        defaults.

        >>> TrainerBookkeeping.of_directory("torch.nn:Identity").train_batch_size
        8
        """
        path = Path(spec) / "trainer_state.json" if isinstance(spec, (str, os.PathLike)) else None
        if path is None or not path.is_file():
            return cls()
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: not readable as JSON ({exc})") from None
        fields = {f.name: document.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0})


def trainer_state_document(global_step: int, max_steps: int, bookkeeping: TrainerBookkeeping) -> dict[str, Any]:
    """trainer_state.json for a run at ``global_step``: fields ``TrainerState.load_from_json`` takes (it refuses
    unknown ones), an empty log history, and ``TrainerControl``'s entry in ``stateful_callbacks``, which the
    Trainer's next save updates in place (a KeyError without it). Another stateful callback of the resumed run
    (EarlyStoppingCallback) needs its own entry, as in any checkpoint written without it.

    >>> trainer_state_document(4, 10, TrainerBookkeeping())["global_step"]
    4
    """
    return {
        "global_step": global_step,
        "max_steps": max_steps,
        "log_history": [],
        **dataclasses.asdict(bookkeeping),
        "stateful_callbacks": {"TrainerControl": {"args": dict.fromkeys(_CONTROL_FLAGS, False), "attributes": {}}},
    }


def _trainer_optim(state: OptimizerState, source: str) -> str:
    optim = TRAINER_OPTIM.get(state.optimizer)
    if optim is None:
        raise UnsupportedError(
            f"{source}: optimizer {state.spec.torch_class}: the Trainer builds torch's own optimizers only for "
            f"optim={', '.join(TORCH_OPTIMIZERS)} (AdamW, SGD, Adagrad, RMSprop); its optimizer.pt would not load "
            "into the optimizer a Trainer builds (convert --to torch for your own loop)"
        )
    return optim


def _check_directory_name(path: Path, step: int) -> None:
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match is not None and int(match[1]) != step:
        raise OptstateError(
            f"{path}: the state is at global step {step}, and the Trainer names a checkpoint by its step "
            f"(resume_from_checkpoint=True takes the highest): name it checkpoint-{step}"
        )


def _schedule(state: OptimizerState, step: int, source: str) -> tuple[TransformersSchedule, list[float]]:
    """The transformers schedule the state follows and each of its groups' base lr: a Trainer's LambdaLR read
    with its schedule, or (no scheduler) the groups' lr held constant; every group's lr checked against it."""
    sd = state.metadata.lr_scheduler
    if sd is not None:
        if KEY not in sd:
            raise UnsupportedError(
                f"{source}: the state's LR scheduler is a {scheduler_class(sd)}; the Trainer continues a LambdaLR "
                "whose function its TrainingArguments name (lr_scheduler_type), so only a transformers schedule "
                "(from a Trainer checkpoint) or a constant lr is written (convert --to torch keeps this scheduler)"
            )
        schedule = TransformersSchedule.from_json(sd[KEY])
        base = [float(b) for b in sd["base_lrs"]]
        if len(base) != len(state.param_groups):
            raise FormatError(
                f"{source}: the scheduler has {len(base)} base_lrs, the state {len(state.param_groups)} groups"
            )
    else:
        refuse_uncarried_schedule(state, source)
        schedule = TransformersSchedule("constant", {})
        base = [float(g["lr"]) for g in state.param_groups]
    for gi, (group, b) in enumerate(zip(state.param_groups, base, strict=True)):
        want = b * schedule.factor(step)
        if not math.isclose(float(group["lr"]), want, rel_tol=1e-12, abs_tol=0.0):
            raise UnsupportedError(
                f"{source}: param group {gi} has lr {group['lr']!r}, where {schedule.describe()} from base lr {b!r} "
                f"gives {want!r} at step {step}: the Trainer's scheduler would not continue it"
            )
    return schedule, base


def _trainer_split(
    state: OptimizerState, model: torch.nn.Module, target: TargetModel, source: str
) -> tuple[list[str], list[str]]:
    """The Trainer's two groups of names (:func:`decay_split`), checked against what the state tracks (each
    tracked parameter's shape and dtype the model's: :func:`.target.check_params`)."""
    decay, no_decay = decay_split(model)
    tracked = {path_to_name(p.path) for p in state.params}
    unknown = [name for name in tracked if name not in target.names or name not in decay + no_decay]
    if unknown:
        raise MappingError(
            f"{source}: the state tracks {unknown[0]!r}, which is not a trainable parameter of the model "
            f"({len(unknown)} such; the model has e.g. {', '.join(target.names[:3])}): not the model of the state"
        )
    untracked = [name for name in decay + no_decay if name not in tracked]
    if untracked:
        raise MappingError(
            f"{source}: the model's trainable parameter {untracked[0]!r} ({len(untracked)} such) is not tracked by "
            "the state; the Trainer would train it: if it was frozen, set requires_grad=False in the model (--model)"
        )
    check_params(state, target, {n: n for n in tracked})
    return decay, no_decay


def _trainer_groups(
    state: OptimizerState, split: tuple[list[str], list[str]], base_lrs: Sequence[float], source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two param groups' hyperparameters. The Trainer builds both with one set of hyperparameters but for
    weight_decay, which is 0.0 in its second group: a state whose groups cannot be those is refused."""
    spec = state.spec
    group_of = {path_to_name(p.path): p.group for p in state.params}

    def hyperparams(name: str) -> dict[str, Any]:
        gi = group_of[name]
        hp = {k: v for k, v in spec.with_defaults(state.param_groups[gi]).items() if k not in ("params", "param_names")}
        return {**hp, "initial_lr": base_lrs[gi]}

    names = split[0] + split[1]
    if not names:
        raise MappingError(f"{source}: the model has no trainable parameters")
    reference = {k: v for k, v in hyperparams(names[0]).items() if k != "weight_decay"}
    decays: list[dict[float, str]] = [{}, {}]
    for gi, group in enumerate(split):
        for name in group:
            hp = hyperparams(name)
            decays[gi].setdefault(float(hp.pop("weight_decay", 0.0)), name)
            differ = next((k for k in sorted(set(hp) | set(reference)) if hp.get(k) != reference.get(k)), None)
            if differ is not None:
                raise MappingError(
                    f"{source}: {name!r} has {differ}={hp.get(differ)!r} where {names[0]!r} has "
                    f"{reference.get(differ)!r}; the Trainer builds its param groups with one {differ}"
                )
        if len(decays[gi]) > 1:
            (a, x), (b, y) = list(decays[gi].items())[:2]
            raise MappingError(
                f"{source}: the Trainer's param group {gi} ({_GROUPS[gi]}) would hold {x!r} at weight_decay {a} "
                f"and {y!r} at {b}: the state was not trained with the Trainer's groups"
            )
    undecayed = next(((wd, name) for wd, name in decays[1].items() if wd != 0.0), None)
    if undecayed is not None:
        raise MappingError(
            f"{source}: {undecayed[1]!r} has weight_decay {undecayed[0]}, but Trainer.get_decay_parameter_names "
            "leaves it undecayed (the Trainer's param group 1 has weight_decay 0.0): the state was not trained "
            "with the Trainer's groups"
        )
    decay = next(iter(decays[0]), 0.0)
    return {**reference, "weight_decay": decay}, {**reference, "weight_decay": 0.0}


def _in_run_dtype(target: TargetModel, spec: Any) -> TargetModel:
    """The model as the run builds it: one built from a model directory's config.json (on the meta device, in
    the default dtype) in the config's ``dtype`` (``torch_dtype`` before transformers 4.56) where it names one;
    else the model's own parameters' dtypes, which a float64 state must match too (the Trainer's
    load_state_dict would cast it and its optimizer state)."""
    config = Path(spec) / "config.json" if isinstance(spec, (str, os.PathLike)) else None
    if config is None or not config.is_file():
        return target
    document = json.loads(config.read_text(encoding="utf-8"))
    dtype = document.get("dtype") or document.get("torch_dtype")
    return target.in_dtype(dtype) if isinstance(dtype, str) else target


def _model_config(spec: Any) -> bytes | None:
    """config.json of a model directory given as the model, to write beside the weights."""
    if isinstance(spec, (str, os.PathLike)) and (Path(spec) / "config.json").is_file():
        return (Path(spec) / "config.json").read_bytes()
    return None


@dataclass(frozen=True)
class _Checkpoint:
    """Everything a checkpoint-N/ holds, built and checked before anything is written."""

    weights: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    trainer_state: Mapping[str, Any]
    arguments: Mapping[str, Any]
    config: bytes | None


@dataclass(frozen=True)
class _Checked:
    """What the checks settle about a state and the Trainer that resumes it, before anything is assembled."""

    state: OptimizerState  # under the model's names (in_model_names)
    optim: str
    step: int
    schedule: TransformersSchedule
    split: tuple[list[str], list[str]]
    groups: tuple[dict[str, Any], dict[str, Any]]
    weights: Mapping[str, Any]


def _check(state: OptimizerState, path: Path, spec: Any, requested_step: int | None) -> _Checked:
    """Every check of the state against the Trainer's optimizer, schedule, step and model (built once)."""
    source = str(path)
    optim = _trainer_optim(state, source)
    step = written_step(state, requested_step, source)
    _check_directory_name(path, step)
    schedule, base_lrs = _schedule(state, step, source)
    target, model = load_target(spec)
    target = _in_run_dtype(target, spec)
    state = in_model_names(state, target, source)  # another trainer's names (a LightningModule's net.fc1.weight)
    require_torch_order(state, target, source)  # the Trainer's groups follow the model's parameters
    split = _trainer_split(state, model, target, source)
    stored = model_weights(state, target, tied_once=True, loader="the Trainer")
    groups = _trainer_groups(state, split, base_lrs, source)
    return _Checked(state, optim, step, schedule, split, groups, {name: stored[name] for name in sorted(stored)})


def _assemble(
    state: OptimizerState, checked: _Checked, spec: Any, bookkeeping: TrainerBookkeeping | None
) -> _Checkpoint:
    """The files of the checkpoint, from what :func:`_check` settled."""
    # The Trainer's groups hold no param_names (it builds them from parameters, not named ones).
    optimizer = optimizer_state_dict(
        checked.state, list(zip(checked.groups, checked.split, strict=True)), param_names=False
    )
    base_lr = float(checked.groups[0]["initial_lr"])
    arguments = {
        "optim": checked.optim,
        "weight_decay": checked.groups[0]["weight_decay"],
        **trainer_arguments(checked.schedule, learning_rate=base_lr),
    }
    # The Trainer replaces max_steps with its own; optstate's reader takes it as the schedule's horizon.
    max_steps = arguments.get("max_steps", state.metadata.lr_horizon or checked.step)
    return _Checkpoint(
        checked.weights,
        optimizer,
        lambda_lr_state(checked.schedule, [base_lr, base_lr], checked.step),
        trainer_state_document(checked.step, max_steps, bookkeeping or TrainerBookkeeping.of_directory(spec)),
        arguments,
        _model_config(spec),
    )


def write_checkpoint(
    state: OptimizerState,
    path: str | os.PathLike,
    model: Any,
    *,
    step: int | None = None,
    bookkeeping: TrainerBookkeeping | None = None,
    force: bool = False,
    fsync: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Write ``state`` as the ``checkpoint-N/`` directory ``path`` that ``Trainer.train(resume_from_checkpoint=path)``
    continues exactly, atomically; return the ``TrainingArguments`` fields to resume with (also written to
    :data:`RESUME_ARGUMENTS`): ``optim``, ``learning_rate``, ``weight_decay``, ``lr_scheduler_type``,
    ``warmup_steps``, ``max_steps``, ``lr_scheduler_kwargs``.

    ``model`` is the model the Trainer will train (a torch module, ``module:function`` or a Hugging Face model
    directory, whose config.json is copied): its parameters' order and :func:`decay_split` make the param
    groups. The files: model.safetensors (the state's weights), optimizer.pt (the Trainer's two groups),
    scheduler.pt (its LambdaLR at ``last_epoch`` = the step), trainer_state.json (``global_step``; the rest
    from ``bookkeeping``, by default :meth:`TrainerBookkeeping.of_directory` of the model). Not written:
    rng_state.pth (the resumed run's dropout and data order follow the seed, not the stopped run's
    generators) and training_args.bin (a pickle of objects; the Trainer does not read it to resume).
    ``step`` is the global step where the state records none (SGD).

    >>> import tempfile, torch
    >>> from optstate.schema import ParamInfo
    >>> net = torch.nn.Linear(2, 1, dtype=torch.float64)
    >>> params = (ParamInfo(("weight",), (1, 2), "float64", 0, 3), ParamInfo(("bias",), (1,), "float64", 1, 3))
    >>> slots = {(s, p.path): np.zeros(p.shape) for s in ("first_moment", "second_moment") for p in params}
    >>> groups = ({"lr": 0.1, "weight_decay": 0.01}, {"lr": 0.1, "weight_decay": 0.0})
    >>> weights = {("weight",): np.ones((1, 2)), ("bias",): np.zeros(1)}
    >>> state = OptimizerState("adamw", groups, params, slots, weights)
    >>> write_checkpoint(state, tempfile.mkdtemp() + "/checkpoint-3", net)  # doctest: +NORMALIZE_WHITESPACE
    {'optim': 'adamw_torch', 'weight_decay': 0.01, 'lr_scheduler_type': 'constant', 'warmup_steps': 0,
     'learning_rate': 0.1, 'lr_scheduler_kwargs': {}}
    """
    directory = Path(path)
    built = _assemble(state, _check(state, directory, model, step), model, bookkeeping)
    with write_directory(directory, WriteOptions(force=force, fsync=fsync, progress=progress)) as save:
        save(built.weights, "model.safetensors")
        save(built.optimizer, "optimizer.pt")
        save(built.scheduler, "scheduler.pt")
        save(json.dumps(built.trainer_state, indent=2, sort_keys=True) + "\n", "trainer_state.json")
        save(json.dumps({"TrainingArguments": built.arguments}, indent=2) + "\n", RESUME_ARGUMENTS)
        if built.config is not None:
            save(built.config, "config.json")
    return dict(built.arguments)


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``hf-trainer`` format: :func:`write_checkpoint` with ``options.model`` (``--model``;
    required) and ``options.step``, warning with the TrainingArguments to resume with (the Trainer rebuilds
    its optimizer class and LR schedule from them: other ones would not continue the state).

    >>> write(None, "out/checkpoint-500", WriteOptions())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: out/checkpoint-500: a Trainer checkpoint's param groups follow ... (--model ...)
    """
    if options.model is None:
        raise OptstateError(
            f"{os.fspath(path)}: a Trainer checkpoint's param groups follow the model's parameters: name the model "
            "the Trainer will train (--model module:function or a Hugging Face model directory)"
        )
    arguments = write_checkpoint(
        state,
        path,
        options.model,
        step=options.step,
        force=options.force,
        fsync=options.fsync,
        progress=options.progress,
    )
    warnings.warn(
        f"{os.fspath(path)}: resume with TrainingArguments("
        + ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        + ") and your run's batch size, data order and max_grad_norm; the Trainer rebuilds its optimizer and LR "
        f"schedule from them (recorded in {RESUME_ARGUMENTS})",
        stacklevel=2,
    )
