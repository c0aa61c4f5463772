"""PyTorch Lightning ``.ckpt`` files, written so that ``Trainer.fit(model, ckpt_path=...)`` resumes them.

Lightning checkpoints are read by the torch format (:func:`optstate.converters.torch.state_dict.split_checkpoint`).
The writer needs the LightningModule the run resumes with (``--model module:function``, ``model=``), as
Lightning's own ``_CheckpointConnector.restore`` (lightning 2.6) does with the file:

- ``state_dict``: loaded strictly into the module, so every tensor of ``module.state_dict()``, named as the
  module names it (its attribute prefix, ``net.fc1.weight``), with the module's shapes and dtypes;
- ``optimizer_states``: one ``Optimizer.state_dict()``, laid out as the optimizer the module's
  ``configure_optimizers`` builds (its param groups, its parameters' order); ``load_state_dict`` matches
  by position, so this order is the module's, never the state's;
- ``lr_schedulers``: the state of the scheduler ``configure_optimizers`` attaches, after as many steps as
  the state took; written only where the state carries that same schedule (compared value by value);
- ``loops``: the fit loop's progress as Lightning saves it at the end of an epoch (``global_step``,
  ``current_epoch`` and the batch counts are read from it on resume, not from the top-level keys);
- ``epoch``, ``global_step``, ``pytorch-lightning_version`` (read by Lightning's checkpoint migration),
  ``callbacks`` (empty: no callback state is carried).

An epoch is ``len(module.train_dataloader())`` optimizer steps (``accumulate_grad_batches=1``, no
``limit_train_batches``); a state that stops mid-epoch is refused, as Lightning restarts a dataloader
that is not resumable at the start of its epoch. Written with NumPy alone (:mod:`.ptfile`); the module
is built, and its ``configure_optimizers`` called, with torch and Lightning.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import MappingError, MissingDependencyError, OptstateError, UnsupportedError
from ...schema.state import OptimizerState, name_to_path, path_to_name
from ..formats import WriteOptions
from ..schedules.identify import attached_scheduler, refuse_uncarried_schedule, scheduler_class
from ..schedules.torch_schedulers import last_epoch, restore_torch_scheduler_state
from . import ptfile
from . import state_dict as torch_dict
from .target import (
    TargetModel,
    check_params,
    model_names,
    model_weights,
    optimizer_state_dict,
    require_torch_order,
    scheduled_group,
    target_of,
    written_step,
)

# The Lightning release whose checkpoint layout (the loops' keys) this module writes; Lightning migrates
# a checkpoint from the version it names, so the name must be that of the layout, not of what is installed.
LAYOUT_VERSION = "2.6.6"


@dataclass(frozen=True)
class ModuleTarget:
    """What the LightningModule resumes into: the module as a model (:class:`.target.TargetModel`: its
    ``state_dict()`` tensors), the optimizer ``configure_optimizers`` builds (its class and each group's parameter
    names, in order), the scheduler it attaches (its fresh ``state_dict()``, interval and frequency) and the
    batches of an epoch.

    >>> model = TargetModel(("net.w",), ("net.w",), {"net.w": ((2,), "float64")}, source="the module")
    >>> t = ModuleTarget(model, "SGD", (("net.w",),), batches_per_epoch=1)
    >>> t.tracked, t.scheduler is None, t.source
    (('net.w',), True, 'the module')
    """

    model: TargetModel
    optimizer_class: str
    groups: tuple[tuple[str, ...], ...]
    scheduler: Mapping[str, Any] | None = None
    interval: str = "step"
    frequency: int = 1
    batches_per_epoch: int | None = None
    hyperparams: tuple[Mapping[str, Any], ...] = ()  # each group's as configure_optimizers builds it

    @property
    def source(self) -> str:
        """The module, as the user named it (``--model``)."""
        return self.model.source

    @property
    def tracked(self) -> tuple[str, ...]:
        """The parameters the optimizer updates, in the order its ``state_dict`` numbers them."""
        return tuple(name for group in self.groups for name in group)


# ----------------------------------------------------------------------------- the module, through torch and Lightning


def _lightning_optimizer_parsing() -> Any:
    """Lightning's own parser of ``configure_optimizers``' return value (``lightning`` or ``pytorch_lightning``)."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(f"{package}.core.optimizer")
        except ImportError:
            continue
    raise MissingDependencyError("writing a Lightning checkpoint builds the LightningModule: pip install lightning")


def _configured(module: Any, source: str) -> tuple[Any, Any | None]:
    """``(optimizer, scheduler config or None)`` that ``module.configure_optimizers()`` returns, parsed as
    Lightning parses it; several optimizers or schedulers are refused."""
    parsing = _lightning_optimizer_parsing()
    try:
        optimizers, schedulers, monitor = parsing._configure_optimizers(module.configure_optimizers())
    except Exception as exc:  # the user's code, run outside a Trainer (self.trainer is not attached)
        raise OptstateError(
            f"{source}: configure_optimizers() failed outside a Trainer ({type(exc).__name__}: {exc}); "
            "optstate builds the optimizer it returns to lay the checkpoint out as Lightning loads it"
        ) from None
    if len(optimizers) != 1:
        raise UnsupportedError(
            f"{source}: configure_optimizers() returns {len(optimizers)} optimizers; optstate writes one"
        )
    configs = (
        parsing._configure_schedulers_automatic_opt(schedulers, monitor)
        if getattr(module, "automatic_optimization", True)
        else parsing._configure_schedulers_manual_opt(schedulers)
    )
    if len(configs) > 1:
        raise UnsupportedError(
            f"{source}: configure_optimizers() attaches {len(configs)} LR schedulers to one optimizer; "
            "optstate writes an optimizer driven by one"
        )
    return optimizers[0], (configs[0] if configs else None)


def _batches_per_epoch(module: Any) -> int | None:
    """``len(module.train_dataloader())``, or ``None`` where the module has no sized one of its own."""
    try:
        return len(module.train_dataloader())
    except Exception:  # not overridden (Lightning raises), a datamodule's, or an iterable without a length
        return None


def module_target(module: Any, source: str = "the module") -> ModuleTarget:
    """The :class:`ModuleTarget` of a LightningModule: its tensors, and what its ``configure_optimizers``
    builds (called outside a Trainer, as Lightning would call it).

    >>> import torch, lightning
    >>> class Net(lightning.LightningModule):
    ...     def __init__(self):
    ...         super().__init__(); self.net = torch.nn.Linear(2, 1)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> t = module_target(Net())
    >>> t.optimizer_class, t.groups, t.scheduler, t.batches_per_epoch
    ('SGD', (('net.weight', 'net.bias'),), None, None)
    """
    if not callable(getattr(module, "configure_optimizers", None)):
        raise OptstateError(
            f"{source}: a {type(module).__name__}, not a LightningModule (no configure_optimizers); "
            "pass --model module:function returning the LightningModule the run resumes with"
        )
    names = {id(p): name for name, p in module.named_parameters()}
    optimizer, config = _configured(module, source)
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        foreign = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if foreign:
            raise MappingError(
                f"{source}: the optimizer's param group {gi} holds a tensor (position {foreign[0]}) that is not a "
                "parameter of the module; optstate names the optimizer's tensors by the module's parameters"
            )
        groups.append(tuple(names[id(p)] for p in group["params"]))
    return ModuleTarget(
        target_of(module, source),
        type(optimizer).__name__,
        tuple(groups),
        None if config is None else torch_dict.plain_scheduler_state(config.scheduler.state_dict()),
        "step" if config is None else config.interval,
        1 if config is None else config.frequency,
        _batches_per_epoch(module),
        tuple(
            {k: v for k, v in group.items() if k not in ("params", "param_names")} for group in optimizer.param_groups
        ),
    )


def _load_module_target(model: Any) -> ModuleTarget:
    """The :class:`ModuleTarget` of ``model`` (a LightningModule, or ``module:function`` returning one);
    torch and Lightning are imported here, and only here."""
    if model is None:
        raise OptstateError(
            "writing a Lightning checkpoint needs the LightningModule the run resumes with: "
            "--model module:function returning it (model= in Python)"
        )
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    return module_target(torch_dict.torch_model(model), source)


# ----------------------------------------------------------------------------- the optimizer and its schedule


def _state_group(state: OptimizerState, names: Sequence[str], gi: int, target: ModuleTarget) -> int:
    """The state's param group holding all of the module's group ``gi`` (its parameters by the state's names)."""
    found = sorted({state.param(name_to_path(n)).group for n in names})
    if len(found) > 1:
        raise MappingError(
            f"{target.source}: the optimizer's param group {gi} holds parameters of the state's groups {found}, "
            "whose hyperparameters differ; build the module's param groups as the state's"
        )
    return found[0] if found else 0


def _differences(carried: Any, module: Any, where: str) -> list[str]:
    """Where the state's scheduler state dict differs from the module's (a key only one has is left: torch
    versions add keys)."""
    if isinstance(carried, Mapping) and isinstance(module, Mapping):
        return [d for k in carried if k in module for d in _differences(carried[k], module[k], f"{where}[{k!r}]")]
    if isinstance(carried, (list, tuple)) and isinstance(module, (list, tuple)) and len(carried) == len(module):
        pairs = enumerate(zip(carried, module, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{where}[{i}]")]
    return [] if carried == module else [f"{where}: {module!r} in the module's, {carried!r} in the state's"]


def scheduler_state(state: OptimizerState, target: ModuleTarget, step: int) -> dict[str, Any] | None:
    """The state dict of the module's scheduler after ``step`` optimizer steps, where the state carries the
    same schedule (its own scheduler state, compared key by key with the module's replayed to that count);
    ``None`` where neither has one. Anything else is refused: the run would follow another schedule.

    >>> from optstate.schema import ParamInfo
    >>> sd = {"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1, "_last_lr": [1.0]}
    >>> s = OptimizerState("sgd", ({"lr": 0.25, "initial_lr": 1.0},), (ParamInfo(("w",), (1,), "float64", 0),), {})
    >>> model = TargetModel(("w",), ("w",), {"w": ((1,), "float64")}, source="the module")
    >>> t = ModuleTarget(model, "SGD", (("w",),), scheduler=sd)
    >>> scheduler_state(s.with_metadata(lr_scheduler=restore_torch_scheduler_state(sd, 2)), t, 2)["_last_lr"]
    [0.25]
    >>> scheduler_state(s, t, 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: the module's configure_optimizers attaches an ExponentialLR, and the state ...
    """
    carried = state.metadata.lr_scheduler
    if target.scheduler is None:
        _refuse_schedule_without_module_scheduler(state, target)
        refuse_uncarried_schedule(state, target.source)
        return None
    name = scheduler_class(target.scheduler)
    if carried is None:
        why = state.metadata.schedule_count is not None and "an Optax schedule, whose torch scheduler is unknown"
        raise UnsupportedError(
            f"{target.source}'s configure_optimizers attaches an {name}, and the state carries "
            f"{why or 'no LR scheduler state'}"
            f"{f' ({held})' if (held := attached_scheduler(state.param_groups)) else ''}; the resumed run would "
            "follow a schedule the state did not"
        )
    if target.interval != "step" or target.frequency != 1:
        raise UnsupportedError(
            f"{target.source}'s {name} steps every {target.frequency} {target.interval}(s); optstate writes a "
            "schedule stepped once per optimizer step (interval 'step', frequency 1), the count the state keeps"
        )
    if last_epoch(carried) != step:
        raise UnsupportedError(
            f"the state's LR scheduler has stepped {last_epoch(carried)} times and the optimizer {step}; the "
            "module's steps once per optimizer step"
        )
    expected = restore_torch_scheduler_state(target.scheduler, step)
    different = _differences(torch_dict.plain_scheduler_state(carried), expected, "")
    if scheduler_class(carried) != name or different:
        detail = different[0] if different else f"an {scheduler_class(carried)} in the state"
        raise UnsupportedError(
            f"{target.source}'s configure_optimizers attaches an {name} whose state after {step} steps is not the "
            f"state's: {detail}; the resumed run would follow another schedule"
        )
    return expected


def _refuse_schedule_without_module_scheduler(state: OptimizerState, target: ModuleTarget) -> None:
    """A state carrying a torch scheduler, resumed by a module that attaches none, would keep its lr constant."""
    if state.metadata.lr_scheduler is not None:
        raise UnsupportedError(
            f"the state follows {scheduler_class(state.metadata.lr_scheduler)}, and {target.source}'s "
            "configure_optimizers attaches no LR scheduler: the resumed run would keep the lr constant"
        )


#: Group keys the module's optimizer and the state may differ in: the lr, which the schedule sets (checked
#: there), and torch's implementation switches, which do not change the update.
_UNCOMPARED = frozenset({"lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"})


def refuse_other_hyperparams(state_group: Mapping[str, Any], module_group: Mapping[str, Any], where: str) -> None:
    """Refuse a state whose group hyperparameters are not those ``configure_optimizers`` builds: the resumed
    optimizer's ``load_state_dict`` would silently replace the module's with the state's (a JAX run given
    ``--hparams`` that decay its biases, where the module does not).

    >>> ours, module = {"lr": 0.1, "weight_decay": 0.1}, {"lr": 0.2, "weight_decay": 0.0}
    >>> refuse_other_hyperparams(ours, module, "g")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.MappingError: g: weight_decay is 0.0 in the module's configure_optimizers, 0.1 in the state; ...
    """
    for key in sorted(set(state_group) & set(module_group) - _UNCOMPARED):
        ours, theirs = state_group[key], module_group[key]
        if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
            ours, theirs = tuple(ours), tuple(theirs)
        if ours != theirs:
            raise MappingError(
                f"{where}: {key} is {theirs!r} in the module's configure_optimizers, {ours!r} in the state; "
                "Lightning would resume with the state's: give the state's hyperparameters (--hparams) or build "
                "the module's param groups as the state's"
            )


def optimizer_state(
    state: OptimizerState,
    target: ModuleTarget,
    renamed: Mapping[str, str],
    scheduler: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``Optimizer.state_dict()`` of the module's optimizer holding ``state``: its groups and its
    parameters' order, the state's hyperparameters and slots; each group's ``lr`` checked against the
    scheduler's and ``initial_lr`` its base where there is one (:func:`.target.scheduled_group`).

    >>> import numpy as np
    >>> from optstate.schema import ParamInfo
    >>> params = tuple(ParamInfo((n,), (1,), "float64", 0) for n in "ab")
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), params,
    ...     {("momentum", ("a",)): np.ones(1), ("momentum", ("b",)): np.zeros(1)})
    >>> t = ModuleTarget(TargetModel((), (), {}), "SGD", (("m.b", "m.a"),))
    >>> sd = optimizer_state(s, t, {"a": "m.a", "b": "m.b"}, None)
    >>> sd["param_groups"][0]["param_names"], sd["state"][0]["momentum_buffer"].tolist()
    (['m.b', 'm.a'], [0.0])
    """
    back = {module: state_name for state_name, module in renamed.items()}
    groups = []
    for gi, names in enumerate(target.groups):
        ours = [back[n] for n in names]
        hp = state.spec.with_defaults(state.param_groups[_state_group(state, ours, gi, target)])
        if gi < len(target.hyperparams):
            refuse_other_hyperparams(hp, target.hyperparams[gi], f"{target.source}: param group {gi} ({names[0]}, ...)")
        groups.append((scheduled_group(hp, gi, scheduler, target.source), ours))
    return optimizer_state_dict(state, groups, renamed)


# ----------------------------------------------------------------------------- the loops


def _progress(count: int, current: int, *, started: bool = True, processed: bool = True) -> dict[str, Any]:
    """A Lightning ``_Progress``'s state: every counter at ``count`` in ``total``, at ``current`` in ``current``."""

    def counters(n: int) -> dict[str, int]:
        out = {"ready": n, "completed": n}
        if started:
            out["started"] = n
        if processed:
            out["processed"] = n
        return out

    return {"total": counters(count), "current": counters(current)}


def fit_loop_state(step: int, epoch: int, scheduler_steps: int) -> dict[str, Any]:
    """The fit loop's ``state_dict()`` at the start of epoch ``epoch``, after ``step`` optimizer steps and
    ``scheduler_steps`` of its scheduler's: every total counted, the current epoch's batch counters at zero.

    Not the form Lightning saves when a run stops at an epoch's end (``is_last_batch`` and the last epoch's
    batch counts): resumed from that, Lightning 2.6 runs one batch more of the finished epoch, starting its
    dataloader again, and the run continues on other batches than the one that never stopped (measured:
    6e-3 apart after 4 more steps of 2-batch epochs). From this one it starts the next epoch at its first batch.

    >>> loop = fit_loop_state(4, 2, 4)
    >>> loop["epoch_progress"]["current"]["completed"], loop["epoch_loop.state_dict"]
    (2, {'_batches_that_stepped': 4})
    >>> loop["epoch_loop.batch_progress"]["current"]["ready"], loop["epoch_loop.batch_progress"]["is_last_batch"]
    (0, False)
    """
    optimizer = {
        "step": _progress(step, 0, started=False, processed=False),
        "zero_grad": _progress(step, 0, processed=False),
    }
    return {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": step},
        "epoch_loop.batch_progress": {**_progress(step, 0), "is_last_batch": False},
        "epoch_loop.scheduler_progress": _progress(scheduler_steps, 0, started=False, processed=False),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": optimizer},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": _progress(0, 0, started=False, processed=False),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {**_progress(0, 0), "is_last_batch": False},
        "epoch_progress": _progress(epoch, epoch),
    }


def loops_state(step: int, epoch: int, scheduler_steps: int) -> dict[str, Any]:
    """The checkpoint's ``loops``: the fit loop's progress (:func:`fit_loop_state`), the other loops untouched.

    >>> sorted(loops_state(0, 0, 0))
    ['fit_loop', 'predict_loop', 'test_loop', 'validate_loop']
    """
    untouched = {"state_dict": {}, "batch_progress": {**_progress(0, 0), "is_last_batch": False}}
    return {
        "fit_loop": fit_loop_state(step, epoch, scheduler_steps),
        "validate_loop": untouched,
        "test_loop": untouched,
        "predict_loop": {"state_dict": {}, "batch_progress": _progress(0, 0)},
    }


def epoch_of(step: int, target: ModuleTarget) -> int:
    """The epochs completed after ``step`` optimizer steps of ``target``'s epochs; a step inside an epoch, or
    epochs of unknown length, refused.

    >>> none = TargetModel((), (), {})
    >>> epoch_of(6, ModuleTarget(none, "SGD", (), batches_per_epoch=3)), epoch_of(0, ModuleTarget(none, "SGD", ()))
    (2, 0)
    """
    if step == 0:
        return 0
    batches = target.batches_per_epoch
    if not batches:
        raise OptstateError(
            f"{target.source}: its train_dataloader() gives no number of batches per epoch, so the epoch a run "
            f"stopping at step {step} is in cannot be told; Lightning counts epochs from the checkpoint's loops"
        )
    if step % batches:
        raise UnsupportedError(
            f"the state stops at step {step}, inside epoch {step // batches} ({batches} batches per epoch from "
            f"{target.source}'s train_dataloader()); Lightning restarts a dataloader that is not resumable at the "
            "start of its epoch, so the run would not continue as it stopped"
        )
    return step // batches


# ----------------------------------------------------------------------------- the checkpoint


def lightning_checkpoint(state: OptimizerState, target: ModuleTarget, options: WriteOptions) -> dict[str, Any]:
    """The checkpoint dict ``Trainer.fit(module, ckpt_path=...)`` resumes ``state`` from (arrays for tensors).

    >>> import numpy as np
    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (1,), "float64", 0),),
    ...     {("momentum", ("w",)): np.ones(1)}, weights={("w",): np.zeros(1)})
    >>> t = ModuleTarget(TargetModel(("net.w",), ("net.w",), {"net.w": ((1,), "float64")}), "SGD", (("net.w",),),
    ...     batches_per_epoch=1)
    >>> ckpt = lightning_checkpoint(s, t, WriteOptions(step=3))
    >>> ckpt["global_step"], ckpt["epoch"], list(ckpt["state_dict"]), ckpt["lr_schedulers"]
    (3, 3, ['net.w'], [])
    """
    torch_dict.refuse_optax_native(state.spec)
    if state.spec.torch_class != target.optimizer_class:
        raise UnsupportedError(
            f"{target.source}'s configure_optimizers builds {target.optimizer_class}, the state is "
            f"{state.spec.torch_class}'s"
        )
    renamed = model_names([path_to_name(p.path) for p in state.params], target.tracked, target.source)
    require_torch_order(state, target.model, target.source)  # the module's optimizer orders the parameters
    check_params(state, target.model, renamed)
    step = written_step(state, options.step, target.source)
    epoch = epoch_of(step, target)
    scheduler = scheduler_state(state, target, step)
    return {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": LAYOUT_VERSION,
        "state_dict": model_weights(state, target.model, renamed, loader="Lightning (strictly)"),
        "loops": loops_state(step, epoch, step if scheduler is not None else 0),
        "callbacks": {},
        "optimizer_states": [optimizer_state(state, target, renamed, scheduler)],
        "lr_schedulers": [] if scheduler is None else [scheduler],
    }


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """The writer of the ``lightning`` format: a ``.ckpt`` that ``Trainer.fit(module, ckpt_path=path)`` resumes,
    laid out for the LightningModule ``options.model`` names (see the module's docstring), written atomically.

    >>> write(None, "out.ckpt", WriteOptions())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: writing a Lightning checkpoint needs the LightningModule ...
    """
    target = _load_module_target(options.model)
    checkpoint = lightning_checkpoint(state, target, options)
    ptfile.save(checkpoint, path, force=options.force, fsync=options.fsync, progress=options.progress)
