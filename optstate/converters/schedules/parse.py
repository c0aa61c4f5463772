"""A torch scheduler's ``state_dict()``, checked once, as a tree of leaf schedulers.

:func:`parse` refuses what cannot be reproduced exactly (see :mod:`.identify`) and what is malformed,
and returns a :class:`ParsedScheduler`: the state dict's own attributes, their types checked and
normalized (lrs as floats, MultiStepLR's milestones as a ``Counter``), and for a SequentialLR or
ChainedScheduler its children, each a leaf (torch cannot step a container nested in a container at a
milestone, so neither is accepted). Every conversion reads this one tree: :mod:`.history` replays it,
never the state dict.
"""

from __future__ import annotations

import copy
import math
import numbers
import types
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import FormatError, UnsupportedError
from .identify import CONTAINER_SCHEDULERS, TRANSFORMERS_LAMBDA, key_list, refusal, scheduler_class
from .transformers import KEY as TRANSFORMERS_KEY
from .transformers import TransformersSchedule

__all__ = ["ParsedScheduler", "check_param_groups", "floats", "last_epoch", "parse"]

# The attributes each leaf class steps with: integers (counts of steps) and other numbers.
_INTS = {
    "StepLR": ("step_size",),
    "ConstantLR": ("total_iters",),
    "LinearLR": ("total_iters",),
    "PolynomialLR": ("total_iters",),
    "CosineAnnealingLR": (),
    "OneCycleLR": ("total_steps",),
    "CosineAnnealingWarmRestarts": ("T_0", "T_i", "T_mult"),
    "MultiStepLR": (),
    "ExponentialLR": (),
    TRANSFORMERS_LAMBDA: (),  # its schedule's arguments are checked by TransformersSchedule
}
_REALS = {
    "StepLR": ("gamma",),
    "MultiStepLR": ("gamma",),
    "ExponentialLR": ("gamma",),
    "ConstantLR": ("factor",),
    "LinearLR": ("start_factor", "end_factor"),
    "PolynomialLR": ("power",),
    "CosineAnnealingLR": ("T_max", "eta_min"),
    "OneCycleLR": (),
    "CosineAnnealingWarmRestarts": ("eta_min", "T_cur"),
    TRANSFORMERS_LAMBDA: (),
}


@dataclass(frozen=True)
class ParsedScheduler:
    """One scheduler's checked state: a leaf (no ``children``) or a SequentialLR/ChainedScheduler.

    ``state`` is the state dict's attributes, less ``_schedulers`` (the children's are in
    ``children``); read-only: :meth:`fresh_state` gives a copy to step. ``groups`` is OneCycleLR's
    per-group ``initial_lr``, ``max_lr``, ... which torch keeps in the optimizer's param groups.

    >>> p = parse({"gamma": 0.5, "base_lrs": [1], "last_epoch": 2, "_step_count": 3, "_last_lr": [0.25]})
    >>> p.name, p.epoch, p.last_lrs, p.state["base_lrs"]
    ('ExponentialLR', 2, [0.25], [1.0])
    """

    name: str
    state: Mapping[str, Any]
    children: tuple[ParsedScheduler, ...] = ()
    groups: tuple[dict[str, float], ...] | None = None

    @property
    def leaves(self) -> tuple[ParsedScheduler, ...]:
        """The leaf schedulers: the children of a container, else this one."""
        return self.children or (self,)

    @property
    def epoch(self) -> int:
        """The ``last_epoch`` (a ChainedScheduler has none of its own: its children's, all equal)."""
        if self.name == "ChainedScheduler":
            return self.children[0].epoch
        return self.state["last_epoch"]

    @property
    def last_lrs(self) -> list[float]:
        """``_last_lr``: the lr of each param group for the step after ``last_epoch``."""
        return list(self.state["_last_lr"])

    def fresh_state(self) -> dict[str, Any]:
        """A private copy of ``state``, for a replay to update as torch updates the scheduler's ``__dict__``."""
        return _copy_state(self.state)


def parse(sd: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]] | None = None) -> ParsedScheduler:
    """The state dict ``sd`` as a :class:`ParsedScheduler`, refusing what cannot be exact.

    ``param_groups`` (``optimizer.state_dict()["param_groups"]``) is needed for OneCycleLR only.
    Raises :class:`~optstate.errors.UnsupportedError` naming the scheduler for a refused one,
    :class:`~optstate.errors.FormatError` for a malformed state dict.

    >>> sd = {"base_lrs": [0.1], "last_epoch": 3, "_step_count": 4, "_last_lr": [0.1]}
    >>> tree = parse({"_schedulers": [{**sd, "gamma": 1.0}, {**sd, "step_size": 2, "gamma": 1.0}],
    ...               "_last_lr": [0.1]})
    >>> tree.name, [leaf.name for leaf in tree.leaves], tree.epoch
    ('ChainedScheduler', ['ExponentialLR', 'StepLR'], 3)
    """
    return _parse(sd, param_groups, "")


def _parse(sd: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]] | None, where: str) -> ParsedScheduler:
    """:func:`parse`, ``where`` naming the container a child is in, for the messages."""
    name = scheduler_class(sd)
    reason = refusal(name, sd)
    if reason:
        raise UnsupportedError(where + reason)
    st = _copy_state(sd)
    if name in CONTAINER_SCHEDULERS:
        return _parse_container(name, sd, st, param_groups, where)
    return _parse_leaf(name, sd, st, param_groups, where)


def _copy_state(sd: Mapping[str, Any]) -> dict[str, Any]:
    # an old OneCycleLR's bound method would drag the whole scheduler (and optimizer) into a deepcopy
    return {k: (v if k == "anneal_func" else copy.deepcopy(v)) for k, v in sd.items() if k != "_schedulers"}


# ----------------------------------------------------------------------------- containers


def _parse_container(
    name: str, sd: Mapping[str, Any], st: dict[str, Any], param_groups: Sequence[Mapping[str, Any]] | None, where: str
) -> ParsedScheduler:
    children = _parse_children(name, sd, param_groups, where)
    n_groups = {len(c.state["base_lrs"]) for c in children}
    if len(n_groups) != 1:
        raise FormatError(f"{where}{name}: its children disagree on the number of param groups")
    if name == "SequentialLR":
        _need(sd, name, ("_milestones", "last_epoch", "_last_lr"))
        st["_milestones"] = _milestones(st["_milestones"], len(children), where)
    else:
        _need(sd, name, ("_last_lr",))
        if len({c.epoch for c in children}) != 1:
            raise FormatError(f"{where}ChainedScheduler: its children's last_epoch differ")
    st["_last_lr"] = floats(st["_last_lr"], f"{where}{name} _last_lr")
    if len(st["_last_lr"]) != n_groups.pop():
        raise FormatError(f"{where}{name}: _last_lr has the wrong number of param groups")
    return ParsedScheduler(name, types.MappingProxyType(st), tuple(children))


def _parse_children(
    name: str, sd: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]] | None, where: str
) -> list[ParsedScheduler]:
    children_sd = sd["_schedulers"]
    if not isinstance(children_sd, Sequence) or not children_sd:
        raise FormatError(f"{where}{name}: _schedulers must be a non-empty list of state dicts")
    children = []
    for i, child in enumerate(children_sd):
        at = f"{where}{name} child {i}: "
        if scheduler_class(child) in CONTAINER_SCHEDULERS:
            raise UnsupportedError(
                f"{at}{scheduler_class(child)} nested in {name} is not supported "
                f"(torch cannot step it at a milestone either)"
            )
        children.append(_parse(child, param_groups, at))
    return children


def _milestones(milestones: Any, n_children: int, where: str) -> list[int]:
    ms = list(milestones)
    if len(ms) != n_children - 1 or any(not isinstance(m, numbers.Integral) for m in ms):
        raise FormatError(f"{where}SequentialLR: _milestones {ms!r} must be {n_children - 1} integers")
    return ms


# ----------------------------------------------------------------------------- leaves


def _parse_leaf(
    name: str, sd: Mapping[str, Any], st: dict[str, Any], param_groups: Sequence[Mapping[str, Any]] | None, where: str
) -> ParsedScheduler:
    _need(sd, name, ("base_lrs", "last_epoch", "_step_count", "_last_lr"))
    st["base_lrs"] = floats(st["base_lrs"], f"{where}{name} base_lrs")
    st["_last_lr"] = floats(st["_last_lr"], f"{where}{name} _last_lr")
    if len(st["_last_lr"]) != len(st["base_lrs"]):
        raise FormatError(f"{where}{name}: base_lrs and _last_lr have different lengths")
    _check_numbers(name, st)
    if name == "CosineAnnealingWarmRestarts" and st["T_cur"] != math.floor(st["T_cur"]):
        raise UnsupportedError(
            f"{where}CosineAnnealingWarmRestarts was stepped with fractional epochs "
            f"(T_cur={st['T_cur']!r}): its lr then follows the epochs passed to step(), "
            "not the optimizer step count"
        )
    if name == "MultiStepLR":
        st["milestones"] = _milestone_counts(st["milestones"], where)
    if name == TRANSFORMERS_LAMBDA:
        st[TRANSFORMERS_KEY] = _transformers_schedule(st, where)
    groups = None
    if name == "OneCycleLR":
        groups = _one_cycle_groups(st, param_groups, where)
    return ParsedScheduler(name, types.MappingProxyType(st), groups=groups)


def _check_numbers(name: str, st: Mapping[str, Any]) -> None:
    _number(st, name, "last_epoch", integral=True)
    _number(st, name, "_step_count", integral=True)
    for key in _INTS[name]:
        _number(st, name, key, integral=True)
    for key in _REALS[name]:
        _number(st, name, key)


def _milestone_counts(ms: Any, where: str) -> Counter[int]:
    """MultiStepLR's milestones: a ``Counter`` (a milestone given twice decays twice there)."""
    if not isinstance(ms, Mapping) or any(not isinstance(m, numbers.Integral) or isinstance(m, bool) for m in ms):
        raise FormatError(f"{where}MultiStepLR: milestones must be a Counter of integer epochs, got {ms!r}")
    return Counter(ms) if not isinstance(ms, Counter) else ms


def _transformers_schedule(st: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The transformers schedule a LambdaLR carries, checked (an unknown type or argument is refused by name)."""
    if len(st["lr_lambdas"]) != len(st["base_lrs"]):
        raise FormatError(
            f"{where}{TRANSFORMERS_LAMBDA}: {len(st['lr_lambdas'])} lr_lambdas for {len(st['base_lrs'])} base_lrs"
        )
    try:
        return TransformersSchedule.from_json(st[TRANSFORMERS_KEY]).to_json()
    except (FormatError, UnsupportedError) as exc:
        raise type(exc)(f"{where}{TRANSFORMERS_LAMBDA}: {exc}") from None


def _one_cycle_groups(
    st: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]] | None, where: str
) -> tuple[dict[str, float], ...]:
    """The per-group lrs OneCycleLR's phases name (``max_lr``, ``min_lr``...), from the optimizer's groups."""
    if param_groups is None:
        raise UnsupportedError(
            f"{where}OneCycleLR keeps max_lr and min_lr in the optimizer's param_groups, not in its own state "
            "dict: pass param_groups=optimizer.state_dict()['param_groups']"
        )
    if len(param_groups) != len(st["base_lrs"]):
        raise FormatError(f"{where}OneCycleLR: {len(param_groups)} param_groups for {len(st['base_lrs'])} base_lrs")
    used = {p[k] for p in st["_schedule_phases"] for k in ("start_lr", "end_lr")}
    groups = []
    for i, group in enumerate(param_groups):
        g = {"initial_lr": st["base_lrs"][i], **{k: group[k] for k in used if k in group}}
        missing = used - set(g)
        if missing:
            raise UnsupportedError(f"{where}OneCycleLR: param_groups[{i}] lacks {key_list(missing)}")
        groups.append({k: float(v) for k, v in g.items()})
    return tuple(groups)


# ----------------------------------------------------------------------------- checks


def floats(values: Any, what: str) -> list[float]:
    """``values`` as a list of Python floats (what torch computes lrs with), or a FormatError naming ``what``.

    >>> floats([1, 0.5], "base_lrs")
    [1.0, 0.5]
    """
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{what} must be a list of numbers, got {values!r}") from exc


def _need(sd: Mapping[str, Any], name: str, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise FormatError(f"{name} state dict lacks {key_list(missing)}")


def _number(st: Mapping[str, Any], name: str, key: str, integral: bool = False) -> None:
    value = st[key]
    ok = isinstance(value, numbers.Integral) if integral else isinstance(value, numbers.Real)
    if not ok or isinstance(value, bool):
        raise FormatError(f"{name}: {key} must be {'an integer' if integral else 'a number'}, got {value!r}")


def last_epoch(sd: Mapping[str, Any]) -> int:
    """A scheduler state dict's ``last_epoch``: the number of ``scheduler.step()`` calls so far
    (a ChainedScheduler has none of its own: its first child's). Reads ``sd`` as it is, unchecked.

    >>> last_epoch({"_schedulers": [{"last_epoch": 5}, {"last_epoch": 5}], "_last_lr": [0.1]})
    5
    """
    if "last_epoch" in sd:
        return sd["last_epoch"]
    return last_epoch(sd["_schedulers"][0])


def check_param_groups(tree: ParsedScheduler, param_groups: Sequence[Mapping[str, Any]] | None) -> None:
    """Refuse optimizer param groups whose ``lr`` is not the scheduler's ``_last_lr``: the lr was changed
    after the scheduler's last step, so a schedule from the state dict would not continue the run.

    >>> tree = parse({"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 1, "_step_count": 2, "_last_lr": [0.5]})
    >>> check_param_groups(tree, [{"lr": 0.5}])
    >>> check_param_groups(tree, [{"lr": 0.4}])
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: ExponentialLR: param_groups[0]['lr'] = 0.4 is not the scheduler's ...
    """
    if param_groups is None:
        return
    last = tree.last_lrs
    if len(param_groups) != len(last):
        raise FormatError(f"{tree.name}: {len(param_groups)} param_groups but {len(last)} learning rates")
    for i, (group, want) in enumerate(zip(param_groups, last, strict=True)):
        if "lr" in group and not math.isclose(float(group["lr"]), want, rel_tol=1e-12, abs_tol=0.0):
            raise UnsupportedError(
                f"{tree.name}: param_groups[{i}]['lr'] = {float(group['lr'])!r} is not the scheduler's _last_lr "
                f"{want!r}: the lr was changed after the scheduler's last step; refusing"
            )
