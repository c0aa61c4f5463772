"""``optstate inspect``: what a checkpoint holds, and what restoring from it would lose."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .converters import formats
from .converters.formats import ReadOptions
from .converters.schedules.identify import attached_scheduler
from .errors import MissingDependencyError, OptstateError
from .schema.families import BOOKKEEPING_KEYS, OPTIMIZERS, optimizer_spec
from .schema.state import OptimizerState, path_to_name


@dataclass(frozen=True)
class ParamFacts:
    """One tracked parameter: its name, group, the state keys it has (torch's names) and its step."""

    name: str
    group: int
    keys: tuple[str, ...]
    step: int | None


@dataclass(frozen=True)
class Report:
    """The facts ``optstate inspect`` prints; ``to_json`` gives them to programs."""

    path: str
    format: str
    weights: Mapping[str, int] | None
    optimizer: str | None
    param_groups: tuple[Mapping[str, Any], ...]
    params: tuple[ParamFacts, ...]
    names: str
    frozen: tuple[str, ...]
    lr_scheduler: bool
    optax: str
    notes: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)


def _weights_facts(shapes: Mapping[str, tuple[tuple[int, ...], bool]] | None) -> dict[str, int] | None:
    if shapes is None:
        return None
    return {
        "tensors": len(shapes),
        "elements": sum(math.prod(s) for s, _ in shapes.values()),
        "buffers": sum(is_buffer for _, is_buffer in shapes.values()),
    }


def _notes(
    optimizer: str | None,
    groups: Sequence[Mapping[str, Any]],
    params: Sequence[ParamFacts],
    weights: Mapping[str, int] | None,
    lr_scheduler: bool,
    names: str,
    frozen: Sequence[str],
) -> list[str]:
    notes = []
    if optimizer is None:
        return [
            "no optimizer state: restoring from this file restarts momentum buffers, Adam moments and the "
            "step count from zero (save optimizer.state_dict() beside the model)"
        ]
    without = [p.name for p in params if not p.keys]
    if params and len(without) == len(params):
        spec = OPTIMIZERS.get(optimizer.lower())
        if spec is not None and not any(spec.active_slots(g) for g in groups):
            notes.append(f"{optimizer} with these hyperparameters keeps no per-parameter state: nothing is lost")
        else:
            notes.append("the optimizer never stepped: its state is empty")
    elif without:
        notes.append(
            f"{len(without)} of {len(params)} parameters have no state (no gradient yet, or frozen), "
            f"e.g. {', '.join(without[:3])}: they start from zero state on their first step"
        )
    steps = Counter(p.step for p in params if p.step is not None)
    if len(steps) > 1:
        notes.append(
            "parameters have taken different numbers of steps: "
            + ", ".join(f"{n} at step {s}" for s, n in sorted(steps.items()))
        )
    if weights is None:
        notes.append("no model weights in this file")
    if frozen:
        notes.append(
            f"{len(frozen)} model parameter(s) not tracked by the optimizer (frozen): "
            f"{', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}"
        )
    attached = attached_scheduler(groups)
    if attached is not None and not lr_scheduler:
        notes.append(
            f"{attached} (an LR scheduler was attached) but the file holds no "
            "scheduler state: a resumed schedule would restart"
        )
    if names != "param_names":
        notes.append(f"parameter names: {names}")
    return notes


def _optax_verdict(state: OptimizerState | None, error: Exception | None) -> str:
    if state is None:
        return f"refused: {error}" if error else "no optimizer state"
    # Approximation is reported on its own line below; the dry run checks everything else.
    checked = state.with_metadata(approximate=state.metadata.approximate or "allowed to check the rest")
    scheduler = state.metadata.lr_scheduler
    if scheduler is not None and state.metadata.lr_horizon is None:
        from .converters.schedules.torch_schedulers import last_epoch

        checked = checked.with_metadata(lr_horizon=last_epoch(scheduler) + 1)  # any horizon will do to check
    try:
        from .converters import adapter

        adapter("optax").dry_run(checked)
    except MissingDependencyError:
        return "not checked (install optstate[jax])"
    except OptstateError as exc:
        return f"refused: {exc}"
    verdict = "exact"
    if scheduler is not None and state.metadata.lr_horizon is None:
        verdict += " (pass --horizon N if the LR schedule never settles)"
    approximate = state.metadata.approximate or state.spec.approximate
    return f"approximate, with --allow-approximate: {approximate}" if approximate else verdict


def _report(
    path: str,
    fmt: str,
    state: OptimizerState | None,
    *,
    optimizer: str | None = None,
    groups: Sequence[Mapping[str, Any]] = (),
    params: Sequence[ParamFacts] = (),
    weights: dict[str, int] | None = None,
    lr_scheduler: bool = False,
    names: str = "param_names",
    frozen: Sequence[str] = (),
    error: Exception | None = None,
) -> Report:
    groups = [
        {k: v for k, v in g.items() if k not in ("params", "param_names")}
        | {"params": sum(p.group == gi for p in params)}
        for gi, g in enumerate(groups)
    ]
    notes = _notes(optimizer, groups, params, weights, lr_scheduler, names, frozen)
    return Report(
        path,
        fmt,
        weights,
        optimizer,
        tuple(groups),
        tuple(params),
        names,
        tuple(frozen),
        lr_scheduler,
        _optax_verdict(state, error),
        tuple(notes),
    )


def inspect_state(path: str, fmt: str, state: OptimizerState) -> Report:
    """The report of a state as read: what every format's inspector starts from, adding what its files say.

    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> inspect_state("s.safetensors", "optstate", s).params[0].name
    'w'
    """
    spec = state.spec
    params = [
        ParamFacts(
            path_to_name(p.path),
            p.group,
            (("step",) if p.step is not None and state.has_state(p.path) else ())
            + tuple(s.torch_key for s in spec.slots if (s.name, p.path) in state.slots),
            p.step,
        )
        for p in state.params
    ]
    weights = (
        None
        if state.weights is None
        else _weights_facts({path_to_name(p): (a.shape, p in state.buffers) for p, a in state.weights.items()})
    )
    report = _report(
        path,
        fmt,
        state,
        optimizer=spec.torch_class,
        groups=state.param_groups,
        params=params,
        weights=weights,
        lr_scheduler=state.metadata.lr_scheduler is not None,
        frozen=[path_to_name(p) for p in state.frozen_paths()],
    )
    if state.metadata.nonfinite is None:
        return report
    # Recorded by --allow-nonfinite when this file was written: the file says so, and so must inspect.
    return dataclasses.replace(report, notes=(*report.notes, state.metadata.nonfinite))


def _torch_names(
    sd: Mapping[str, Any], model: Any, model_sd: Mapping[str, Any] | None, optimizer: str | None, path: str
) -> tuple[str | None, list[str], str]:
    """The torch optimizer class, one name per tracked tensor, and where the names came from; positions
    (``"0"``, ``"1"``, ...) with the reason where the names cannot be had."""
    from .converters.torch import state_dict as torch_dict

    groups = sd["param_groups"]
    found = None
    try:
        hint = optimizer_spec(optimizer).torch_class if optimizer else None
        found = torch_dict.torch_class_of(groups[0], hint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = torch_dict.param_names(sd, optimizer_spec(found), model=model, weights=model_sd, source=path)
    except OptstateError as exc:
        return found, [str(i) for g in groups for i in g["params"]], f"positional ({exc})"
    if all("param_names" in g for g in groups):
        return found, names, "param_names"
    if model is not None:
        return found, names, "aligned by position with the model given (--model)"
    if model_sd is not None:
        return found, names, "aligned by position with the model weights"
    return found, names, "positional (no names saved)"


def _torch_param_facts(sd: Mapping[str, Any], names: Sequence[str]) -> list[ParamFacts]:
    """What the state_dict holds for each tracked tensor: its group, its state keys, its step."""
    indices = [(gi, i) for gi, g in enumerate(sd["param_groups"]) for i in g["params"]]
    facts = []
    for name, (gi, i) in zip(names, indices, strict=True):
        entry = sd["state"].get(i, {})
        step = int(float(entry["step"])) if "step" in entry else None
        facts.append(ParamFacts(name, gi, tuple(sorted(k for k, v in entry.items() if v is not None)), step))
    return facts


def inspect_torch_file(path: str, fmt: str = "torch", options: ReadOptions = ReadOptions()) -> Report:
    """The report of a ``torch.save`` file (the ``torch`` format's inspector), read once: what its
    optimizer state_dict holds is reported even where the state does not convert.

    >>> import tempfile, numpy as np
    >>> from optstate.converters.torch.state_dict import save_torch_file
    >>> from optstate.schema import ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},),
    ...     (ParamInfo(("w",), (2,), "float64", 0),), {("momentum", ("w",)): np.ones(2)})
    >>> path = tempfile.mkdtemp() + "/c.pt"; save_torch_file(s, path)
    >>> report = inspect_torch_file(path)
    >>> report.optimizer, report.params[0].keys, report.notes
    ('SGD', ('momentum_buffer',), ('no model weights in this file',))
    """
    from .converters.torch import state_dict as torch_dict

    checkpoint = torch_dict.read_torch_file(path)
    sd, model_sd, scheduler_sd = torch_dict.split_checkpoint(checkpoint, path)
    tied = torch_dict._tied(model_sd) if model_sd is not None else {}
    if model_sd is not None and tied:  # one tensor, two names (GPT-2's lm_head and wte): one parameter, named once
        model_sd = {n: t for n, t in model_sd.items() if n not in tied}
    weights = (
        None
        if model_sd is None
        else _weights_facts({n: (tuple(t.shape), torch_dict.is_buffer(n, t)) for n, t in model_sd.items()})
    )
    if sd is None:
        return _report(path, fmt, None, weights=weights)
    torch_dict.check_state_dict(sd, path)
    groups = sd["param_groups"]
    model = torch_dict.torch_model(options.model)
    optimizer, names, origin = _torch_names(sd, model, model_sd, options.optimizer, path)
    state, error = None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch_dict.state_from_checkpoint(  # as the reader does
                checkpoint, path, origin="torch", optimizer=options.optimizer, model=model
            )
    except OptstateError as exc:
        error = exc
    params = _torch_param_facts(sd, names)
    tracked = set(names)
    frozen = [n for n, t in (model_sd or {}).items() if n not in tracked and not torch_dict.is_buffer(n, t)]
    report = _report(
        path,
        fmt,
        state,
        optimizer=optimizer or "unknown",
        groups=groups,
        params=params,
        weights=weights,
        lr_scheduler=scheduler_sd is not None,
        names=origin,
        frozen=frozen,
        error=error,
    )
    if not tied:
        return report
    shared = ", ".join(f"{alias} is {name}" for alias, name in list(tied.items())[:3])
    note = f"tied weights, counted and named once: {shared}{', ...' if len(tied) > 3 else ''}"
    return dataclasses.replace(report, notes=(*report.notes, note))


def inspect(path: str | os.PathLike, fmt: str | None = None, *, options: ReadOptions = ReadOptions()) -> Report:
    """What a checkpoint holds: weights, optimizer state, slots per parameter, what a restore would lose.

    The format (``fmt``, else guessed from the path) reads the state, or its inspector, where it
    has one, reports on the file itself (:class:`optstate.converters.formats.Format`). ``options`` say
    what the checkpoint does not (the optimizer of an Optax state, the model that names parameters).

    >>> import tempfile, torch, optstate
    >>> d = tempfile.mkdtemp(); net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.AdamW(net.named_parameters(), lr=1e-3)
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> torch.save({"optimizer": opt.state_dict()}, f"{d}/c.pt")
    >>> report = optstate.inspect(f"{d}/c.pt")
    >>> report.optimizer, report.optax, report.notes
    ('AdamW', 'exact', ('no model weights in this file',))
    """
    path = os.fspath(path)
    row = formats.get(fmt or formats.detect(path))
    if row.inspector is not None:
        inspector: Callable[[str, str, ReadOptions], Report] = row.function(row.inspector)
        return inspector(path, row.name, options)
    return inspect_state(path, row.name, row.read(path, dataclasses.replace(options, allow_approximate=True)))


def format_report(report: Report) -> str:
    """The report as people read it."""
    lines = [f"{report.path} ({report.format})"]
    w = report.weights
    lines.append(
        f"  model weights: {w['tensors']} tensors, {w['elements']:,} values"
        + (f", {w['buffers']} buffers" if w["buffers"] else "")
        if w
        else "  model weights: none"
    )
    if report.optimizer is None:
        lines.append("  optimizer state: none")
    else:
        stepped = Counter(p.step for p in report.params if p.step is not None)
        step = (
            ", ".join(f"{s} ({n} params)" for s, n in sorted(stepped.items()))
            if len(stepped) > 1
            else (str(next(iter(stepped))) if stepped else "-")
        )
        lines.append(f"  optimizer: {report.optimizer}, {len(report.params)} parameters, step {step}")
        for gi, group in enumerate(report.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params" and k not in BOOKKEEPING_KEYS)
            lines.append(f"    group {gi} ({group['params']} params): {hp}")
        keys = Counter(k for p in report.params for k in p.keys)
        for key, n in sorted(keys.items()):
            lines.append(f"    {key}: {n} of {len(report.params)} parameters")
    lines.append(f"  LR scheduler state: {'yes' if report.lr_scheduler else 'none'}")
    lines.append(f"  to Optax: {report.optax}")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)
