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
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import FormatError, MappingError, MissingDependencyError, OptstateError, UnsupportedError
from ...schema.fileformat import read_safetensors, read_sharded_safetensors
from ...schema.state import OptimizerState
from ..formats import ReadOptions, WriteOptions
from ..schedules.identify import LAMBDA, scheduler_class
from ..schedules.transformers import (
    REFUSED_TYPES,
    TransformersSchedule,
    attach,
    num_warmup_steps,
    schedule_from_arguments,
)
from . import ptfile
from .state_dict import state_from_checkpoint

if TYPE_CHECKING:
    import torch

    from ...report import Report

__all__ = ["TrainerArguments", "TrainerCheckpoint", "decay_split", "inspect", "name_param_groups", "read"]

#: The Trainer's ``optim`` values whose optimizer is torch's own class (``torch.optim.AdamW``, ``SGD``, ...):
#: the others are transformers', bitsandbytes' or another library's, whose state optstate does not read.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")

# The files the Trainer writes that a conversion does not carry, and what is lost with them.
_NOT_CARRIED = {
    "rng_state": "the run's RNG states (dropout masks and the data order continue differently)",
    "scaler.pt": "the fp16 GradScaler's loss scale",
}

_GROUPS = ("weight decay", "no weight decay")


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
        arguments_file = directory / "training_args.bin"
        arguments = (
            TrainerArguments.from_record(ptfile.load(arguments_file, records=True), str(arguments_file))
            if arguments_file.is_file()
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
        f"LR schedule: {schedule.describe()}, rebuilt from training_args.bin and max_steps (torch does not save "
        f"the LambdaLR's function); exact in Optax for {span}"
    )


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """Not written yet (the writer lands with issue 17)."""
    raise OptstateError(f"{os.fspath(path)}: writing the hf-trainer format is not implemented yet")
