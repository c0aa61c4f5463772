"""torch ``lr_scheduler.state_dict()`` → one Optax schedule per param group, and back.

A torch scheduler's state dict does not name its class; :func:`scheduler_class` tells it from the
attributes it holds. :func:`optax_schedules` turns it into one schedule per param group such that
``schedule(c)`` is the ``group["lr"]`` torch's optimizer uses on the step taken when
``scheduler.last_epoch == c`` (one ``scheduler.step()``, without arguments, per optimizer step,
as torch documents), i.e. the schedule to
pass to ``optax.scale_by_learning_rate`` with ``ScaleByScheduleState.count = last_epoch``.
:func:`restore_torch_scheduler_state` and :func:`group_lrs` go the other way: the state dict a
torch scheduler has after ``count`` steps taken elsewhere, and the ``group["lr"]`` to set.

**How the values are exact.** Most torch schedulers are *chainable*: ``get_lr()`` computes the
next lr from the current ``group["lr"]`` (``lr * gamma``, LinearLR's ratio, CosineAnnealingLR's
recursive formula, with its own branch past ``T_max``), not from a closed form, so a closed form
rounds differently. Evaluated in JAX it also uses ``jnp.cos`` rather than ``math.cos``, which
matters where ``1 + cos`` is small: measured against torch's ``group["lr"]``, a float64 closed
form is off by 1.6e-10 relative for CosineAnnealingLR(T_max=100000) near its end (so is
``optax.cosine_decay_schedule``; 6.5e-13 at T_max=10000), and by 1e-14 for ExponentialLR after
1e5 steps. So no closed form is used: this module replays torch's own ``step()``/``get_lr()``
code, operation for operation, on Python floats (which is what torch computes with), and each
schedule indexes a float64 table of the results by the step count. The values are bit-identical
to torch's ``group["lr"]``. Building a table costs a few microseconds per step in Python (about
3 s for a million steps of warm-up + cosine); under ``jit`` the table is a constant.

**Table length.** Schedulers whose lr stops changing (LinearLR, ConstantLR, PolynomialLR,
MultiStepLR after its last milestone, StepLR/ExponentialLR with ``gamma == 1``, a SequentialLR
whose last child is one of these) need no horizon: the table ends where the lr settles and the
schedule clamps to its last entry, exact for every count. The others (StepLR, ExponentialLR,
CosineAnnealingLR, CosineAnnealingWarmRestarts, and sequences ending in them) need
``horizon=``: the largest count the schedule will be called with (the total number of optimizer
steps of the run). OneCycleLR's horizon defaults to its ``total_steps`` (torch raises past it).
Beyond the horizon the schedule does not guess: with a concrete count it raises ``ValueError``,
under ``jit`` (where raising is impossible) it returns NaN, so a run past the horizon fails loudly.

**Refused** (:class:`~optstate.errors.UnsupportedError`, naming the scheduler): LambdaLR and
MultiplicativeLR (torch does not save the function), ReduceLROnPlateau (depends on metrics),
CyclicLR (a custom ``scale_fn`` function is saved as ``None``, so the curve cannot be told from
the state dict), OneCycleLR with ``cycle_momentum=True`` (it also cycles momentum / ``betas[0]``),
containers nested in containers, and any state whose ``_last_lr`` is not what the scheduler itself
produces from ``base_lrs`` (the lr was changed outside it, e.g. by a second scheduler on the same
optimizer).

The schedules compute in float64 when ``jax_enable_x64`` is on (float32 otherwise, which is not
exact, and warns once per schedule). This module imports only NumPy at the top; JAX is imported
when a schedule is called.

>>> sd = {"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1, "_last_lr": [1.0]}
>>> scheduler_class(sd)
'ExponentialLR'
>>> group_lrs(sd, 3)
[0.125]
>>> restore_torch_scheduler_state(sd, 3)["_step_count"]
4
"""

from __future__ import annotations

import bisect
import copy
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import FormatError, UnsupportedError


class ScheduleRangeError(UnsupportedError, ValueError):
    """A step count or horizon outside what the schedule answers exactly."""

__all__ = [
    "LAMBDA",
    "REFUSED",
    "SUPPORTED",
    "TorchLRSchedule",
    "group_lrs",
    "optax_schedules",
    "restore_torch_scheduler_state",
    "scheduler_class",
]

#: What :func:`scheduler_class` returns for LambdaLR and MultiplicativeLR: their state dicts hold
#: the same keys (``lr_lambdas`` and the base attributes), so they cannot be told apart.
LAMBDA = "LambdaLR/MultiplicativeLR"

#: Schedulers converted exactly.
SUPPORTED = ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR", "ConstantLR",
             "PolynomialLR", "OneCycleLR", "CosineAnnealingWarmRestarts", "SequentialLR", "ChainedScheduler")
#: Schedulers refused, always.
REFUSED = (LAMBDA, "ReduceLROnPlateau", "CyclicLR")

#: The longest table built (per param group), so that a huge ``total_iters`` or ``horizon`` fails
#: with a message instead of running for minutes.
MAX_TABLE = 10_000_000

# Attributes every LRScheduler subclass may hold (``verbose`` in torch < 2.7).
_BASE = frozenset({"base_lrs", "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step",
                   "_is_initial", "verbose"})

# name: (keys that identify it, other keys it may hold besides _BASE). Most specific first.
_SIGNATURES: tuple[tuple[str, frozenset, frozenset], ...] = tuple(
    (name, frozenset(required), frozenset(optional) | (_BASE if base else frozenset()))
    for name, required, optional, base in (
        ("SequentialLR", {"_milestones", "_schedulers"}, set(), True),
        ("ChainedScheduler", {"_schedulers"}, set(), True),
        ("ReduceLROnPlateau", {"patience", "cooldown", "num_bad_epochs"},
         {"factor", "default_min_lr", "min_lrs", "eps", "last_epoch", "_last_lr", "mode_worse", "mode",
          "threshold", "threshold_mode", "best", "cooldown_counter", "verbose"}, False),
        ("CyclicLR", {"max_lrs", "total_size", "step_ratio"},
         {"mode", "gamma", "scale_mode", "cycle_momentum", "use_beta1", "base_momentums", "max_momentums",
          "_scale_fn_custom", "_scale_fn_ref", "scale_fn"}, True),
        ("OneCycleLR", {"total_steps", "_schedule_phases"},
         {"_anneal_func_type", "anneal_func", "cycle_momentum", "use_beta1"}, True),
        ("CosineAnnealingWarmRestarts", {"T_0", "T_i", "T_mult", "T_cur"}, {"eta_min"}, True),
        ("CosineAnnealingLR", {"T_max", "eta_min"}, set(), True),
        (LAMBDA, {"lr_lambdas"}, set(), True),
        ("StepLR", {"step_size", "gamma"}, set(), True),
        ("MultiStepLR", {"milestones", "gamma"}, set(), True),
        ("LinearLR", {"start_factor", "end_factor", "total_iters"}, set(), True),
        ("PolynomialLR", {"total_iters", "power"}, set(), True),
        ("ConstantLR", {"factor", "total_iters"}, set(), True),
        ("ExponentialLR", {"gamma"}, set(), True),
    )
)

_CONTAINERS = ("SequentialLR", "ChainedScheduler")


# ----------------------------------------------------------------------------- class detection

def scheduler_class(sd: Mapping) -> str:
    """The name of the torch scheduler class whose ``state_dict()`` this is, told by its keys.

    Returns one of the names in :data:`SUPPORTED` or :data:`REFUSED` (LambdaLR and
    MultiplicativeLR give :data:`LAMBDA`: their state dicts cannot be told apart). Raises
    :class:`~optstate.errors.UnsupportedError` naming the keys when they match no known class,
    or match one but hold attributes it does not have (a subclass, or a newer torch).

    >>> scheduler_class({"step_size": 3, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": 0})
    'StepLR'
    """
    if not isinstance(sd, Mapping):
        raise FormatError(f"a scheduler state dict must be a mapping, not {type(sd).__name__}")
    keys = set(sd)
    for name, required, allowed in _SIGNATURES:
        if required <= keys:
            extra = keys - required - allowed
            if extra:
                raise UnsupportedError(
                    f"the scheduler state dict looks like {name} (it holds {_fmt(required)}) but also holds "
                    f"{_fmt(extra)}, which {name} does not have: a subclass or a newer torch; refusing to guess")
            return name
    if {"state", "param_groups"} <= keys:
        raise UnsupportedError("this is an optimizer state dict (keys 'state', 'param_groups'), "
                               "not a scheduler state dict")
    raise UnsupportedError(f"unknown torch LR scheduler: its state dict holds {_fmt(keys - _BASE) or 'no keys'}"
                           f"{' besides ' + _fmt(keys & _BASE) if keys & _BASE else ''}; "
                           f"known: {', '.join(SUPPORTED + REFUSED)}")


def _fmt(keys) -> str:
    return ", ".join(repr(k) for k in sorted(keys, key=str))


# ----------------------------------------------------------------------------- refusals

def _refusal(name: str, sd: Mapping) -> str | None:
    if name == LAMBDA:
        saved = [f for f in sd.get("lr_lambdas") or [] if f is not None]
        how = ("its lr_lambdas are callable objects, of which torch saves only the attributes, not the code"
               if saved else "torch saves a function or lambda as None (lr_lambdas is "
               f"{list(sd.get('lr_lambdas') or [])!r})")
        return (f"LambdaLR or MultiplicativeLR (their state dicts look alike): the lr_lambda function is not "
                f"in the state dict ({how}), so the schedule cannot be recovered from it; build the equivalent "
                f"Optax schedule yourself (a function of the step count; LambdaLR: base_lr * f(count), "
                f"MultiplicativeLR: the running product of f) and pass it explicitly")
    if name == "ReduceLROnPlateau":
        return ("ReduceLROnPlateau: its learning rate depends on the metric values passed to step(), not on the "
                "step count, so no schedule reproduces it; continue with a constant lr equal to its _last_lr "
                f"({list(sd.get('_last_lr') or [])!r}) or port the plateau logic yourself")
    if name == "CyclicLR":
        return ("CyclicLR: a custom scale_fn given as a function is saved as None, so the state dict cannot show "
                "which curve was used (and with cycle_momentum=True, the default, it also cycles momentum / "
                "betas[0]); build the equivalent Optax schedule yourself")
    if name == "OneCycleLR" and sd.get("cycle_momentum"):
        return ("OneCycleLR with cycle_momentum=True: besides the lr it cycles SGD's momentum / Adam's betas[0] "
                "on every step, which an lr schedule cannot carry; construct it with cycle_momentum=False, "
                "or also schedule the momentum yourself (optax.inject_hyperparams)")
    return None


# ----------------------------------------------------------------------------- torch, replayed

class _Beyond(Exception):
    """torch raises here (OneCycleLR stepped past total_steps)."""


class _Leaf:
    """One torch scheduler, replaying its ``step()``/``get_lr()`` on Python floats.

    ``st`` is a copy of the scheduler's state dict, updated as torch updates ``__dict__``;
    ``lrs`` (passed in) is the list of ``group["lr"]``, shared by the children of a container.
    """

    name = ""
    has_closed_form = True  # torch's _update_lr(epoch) uses _get_closed_form_lr when it exists

    def __init__(self, st: dict, groups: list[dict] | None):
        self.st = st
        self.groups = groups

    # LRScheduler.step / _update_lr / _initial_step / __init__
    def step(self, lrs: list[float]) -> None:
        self.st["_step_count"] += 1
        self._update(lrs, None, initial=False)

    def update_to(self, lrs: list[float], epoch: int) -> None:
        """``scheduler._update_lr(epoch)``, which SequentialLR calls at a milestone."""
        self._update(lrs, epoch, initial=False)

    def _update(self, lrs, epoch, initial):
        st = self.st
        if epoch is None:
            st["last_epoch"] += 1
            values = self.get_lr(lrs, initial)
        else:
            st["last_epoch"] = epoch
            values = self.closed_form() if self.has_closed_form else self.get_lr(lrs, False)
        lrs[:] = values
        st["_last_lr"] = list(lrs)

    def initial_step(self, lrs: list[float]) -> None:
        self.st["_step_count"] = 0
        self.st["_step_count"] += 1
        self._update(lrs, None, initial=True)

    def construct(self, lrs: list[float]) -> None:
        """What the constructor does (``last_epoch=-1``), ``lrs`` being ``group["lr"]`` at that time."""
        self.st["last_epoch"] = -1
        self.initial_step(lrs)

    # per class
    def get_lr(self, lrs, initial) -> list[float]:
        raise NotImplementedError

    def closed_form(self) -> list[float]:
        raise NotImplementedError

    def frozen(self) -> bool:
        """Whether every later step leaves the lrs exactly as they are."""
        return False

    def freezes(self) -> bool:
        """Whether :meth:`frozen` becomes true after finitely many steps."""
        return False

    def limit(self) -> int | None:
        """The largest ``last_epoch`` torch allows, or None."""
        return None

    def export(self) -> dict:
        return self.st

    @property
    def base(self) -> list[float]:
        return self.st["base_lrs"]

    @property
    def epoch(self) -> int:
        return self.st["last_epoch"]


class _StepLR(_Leaf):
    name = "StepLR"

    def get_lr(self, lrs, initial):
        st = self.st
        if (st["last_epoch"] == 0) or (st["last_epoch"] % st["step_size"] != 0):
            return list(lrs)
        return [lr * st["gamma"] for lr in lrs]

    def closed_form(self):
        st = self.st
        return [b * st["gamma"] ** (st["last_epoch"] // st["step_size"]) for b in self.base]

    def frozen(self):
        return self.st["gamma"] == 1.0

    freezes = frozen


class _MultiStepLR(_Leaf):
    name = "MultiStepLR"

    def get_lr(self, lrs, initial):
        st = self.st
        if st["last_epoch"] not in st["milestones"]:
            return list(lrs)
        return [lr * st["gamma"] ** st["milestones"][st["last_epoch"]] for lr in lrs]

    def closed_form(self):
        st = self.st
        milestones = sorted(Counter(st["milestones"]).elements())
        return [b * st["gamma"] ** bisect.bisect_right(milestones, st["last_epoch"]) for b in self.base]

    def frozen(self):
        return self.epoch >= 0 and all(m <= self.epoch for m in self.st["milestones"])

    def freezes(self):
        return True


class _ConstantLR(_Leaf):
    name = "ConstantLR"

    def get_lr(self, lrs, initial):
        st = self.st
        if st["last_epoch"] == 0:
            return [lr * st["factor"] for lr in lrs]
        if st["last_epoch"] != st["total_iters"]:
            return list(lrs)
        return [lr * (1.0 / st["factor"]) for lr in lrs]

    def closed_form(self):
        st = self.st
        return [b * (st["factor"] + (st["last_epoch"] >= st["total_iters"]) * (1 - st["factor"]))
                for b in self.base]

    def frozen(self):
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self):
        return True


class _LinearLR(_Leaf):
    name = "LinearLR"

    def get_lr(self, lrs, initial):
        st = self.st
        e, start, end, total = st["last_epoch"], st["start_factor"], st["end_factor"], st["total_iters"]
        if e == 0:
            return [lr * start for lr in lrs]
        if initial or e > total:
            return list(lrs)
        return [lr * (1.0 + (end - start) / (total * start + (e - 1) * (end - start))) for lr in lrs]

    def closed_form(self):
        st = self.st
        e, start, end, total = st["last_epoch"], st["start_factor"], st["end_factor"], st["total_iters"]
        return [b * (start + (end - start) * min(total, e) / total) for b in self.base]

    def frozen(self):
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self):
        return True


class _ExponentialLR(_Leaf):
    name = "ExponentialLR"

    def get_lr(self, lrs, initial):
        if initial:
            return list(lrs)
        return [lr * self.st["gamma"] for lr in lrs]

    def closed_form(self):
        return [b * self.st["gamma"] ** self.st["last_epoch"] for b in self.base]

    def frozen(self):
        return self.st["gamma"] == 1.0

    freezes = frozen


class _PolynomialLR(_Leaf):
    name = "PolynomialLR"

    def get_lr(self, lrs, initial):
        st = self.st
        e, total = st["last_epoch"], st["total_iters"]
        if initial or e > total:
            return list(lrs)
        decay_factor = ((1.0 - e / total) / (1.0 - (e - 1) / total)) ** st["power"]
        return [lr * decay_factor for lr in lrs]

    def closed_form(self):
        st = self.st
        e, total = st["last_epoch"], st["total_iters"]
        return [b * (1.0 - min(total, e) / total) ** st["power"] for b in self.base]

    def frozen(self):
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self):
        return True


class _CosineAnnealingLR(_Leaf):
    name = "CosineAnnealingLR"

    def get_lr(self, lrs, initial):
        st = self.st
        e, t_max, eta_min = st["last_epoch"], st["T_max"], st["eta_min"]
        if initial:
            return list(lrs)
        if st["_step_count"] == 1 and e > 0:
            return [eta_min + (b - eta_min) * (1 + math.cos((e) * math.pi / t_max)) / 2 for b in self.base]
        if (e - 1 - t_max) % (2 * t_max) == 0:
            return [lr + (b - eta_min) * (1 - math.cos(math.pi / t_max)) / 2 for b, lr in zip(self.base, lrs)]
        return [(1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
                * (lr - eta_min) + eta_min for lr in lrs]

    def closed_form(self):
        st = self.st
        e, t_max, eta_min = st["last_epoch"], st["T_max"], st["eta_min"]
        return [eta_min + (b - eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2 for b in self.base]


class _OneCycleLR(_Leaf):
    name = "OneCycleLR"
    has_closed_form = False

    def __init__(self, st, groups):
        super().__init__(st, groups)
        kind = st.get("_anneal_func_type")
        if kind is None and "anneal_func" in st:  # torch < 2.2 kept the bound method
            func = st["anneal_func"]
            kind = {"_annealing_cos": "cos", "_annealing_linear": "linear"}.get(
                getattr(getattr(func, "__func__", func), "__name__", None))
        if kind not in ("cos", "linear"):
            raise UnsupportedError(f"OneCycleLR: unknown annealing function {kind!r} (known: 'cos', 'linear')")
        self.anneal = _annealing_cos if kind == "cos" else _annealing_linear

    def get_lr(self, lrs, initial):
        st = self.st
        step_num = st["last_epoch"]
        if step_num > st["total_steps"]:
            raise _Beyond(f"OneCycleLR: torch raises when stepped past total_steps={st['total_steps']}")
        phases = st["_schedule_phases"]
        out = []
        for group in self.groups:
            start_step = 0.0
            for i, phase in enumerate(phases):
                end_step = phase["end_step"]
                if step_num <= end_step or i == len(phases) - 1:
                    pct = (step_num - start_step) / (end_step - start_step)
                    computed_lr = self.anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    break
                start_step = phase["end_step"]
            out.append(computed_lr)
        return out

    def limit(self):
        return self.st["total_steps"]


def _annealing_cos(start, end, pct):
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def _annealing_linear(start, end, pct):
    return (end - start) * pct + start


class _CosineAnnealingWarmRestarts(_Leaf):
    name = "CosineAnnealingWarmRestarts"
    has_closed_form = False

    def get_lr(self, lrs, initial):
        st = self.st
        return [st["eta_min"] + (b - st["eta_min"]) * (1 + math.cos(math.pi * st["T_cur"] / st["T_i"])) / 2
                for b in self.base]

    def step(self, lrs, epoch=None):  # its own step(): no _step_count, no chaining
        st = self.st
        if epoch is None and st["last_epoch"] < 0:
            epoch = 0
        if epoch is None:
            epoch = st["last_epoch"] + 1
            st["T_cur"] = st["T_cur"] + 1
            if st["T_cur"] >= st["T_i"]:
                st["T_cur"] = st["T_cur"] % st["T_i"]
                st["T_i"] = st["T_i"] * st["T_mult"]
        else:
            if epoch < 0:
                raise ScheduleRangeError(f"Expected non-negative epoch, but got {epoch}")
            if epoch >= st["T_0"]:
                if st["T_mult"] == 1:
                    st["T_cur"] = epoch % st["T_0"]
                else:
                    n = int(math.log((epoch / st["T_0"] * (st["T_mult"] - 1) + 1), st["T_mult"]))
                    st["T_cur"] = epoch - st["T_0"] * (st["T_mult"] ** n - 1) / (st["T_mult"] - 1)
                    st["T_i"] = st["T_0"] * st["T_mult"] ** (n)
            else:
                st["T_i"] = st["T_0"]
                st["T_cur"] = epoch
        st["last_epoch"] = math.floor(epoch)
        lrs[:] = self.get_lr(lrs, False)
        st["_last_lr"] = list(lrs)

    def initial_step(self, lrs):
        self.st["_step_count"] = 0
        self.step(lrs)

    def construct(self, lrs):
        self.st.update(last_epoch=-1, T_cur=-1, T_i=self.st["T_0"])
        self.initial_step(lrs)


_LEAVES = {cls.name: cls for cls in (_StepLR, _MultiStepLR, _ConstantLR, _LinearLR, _ExponentialLR, _PolynomialLR,
                                     _CosineAnnealingLR, _OneCycleLR, _CosineAnnealingWarmRestarts)}


class _Sequential:
    name = "SequentialLR"

    def __init__(self, st: dict, children: list[_Leaf]):
        self.st, self.children = st, children

    def step(self, lrs):
        st = self.st
        st["last_epoch"] += 1
        idx = bisect.bisect_right(st["_milestones"], st["last_epoch"])
        scheduler = self.children[idx]
        if idx > 0 and st["_milestones"][idx - 1] == st["last_epoch"]:
            scheduler.update_to(lrs, 0)
        else:
            scheduler.step(lrs)
        st["_last_lr"] = list(scheduler.st["_last_lr"])

    def construct(self, lrs, initial_lrs):
        for child in self.children:  # the children are built first, each on the optimizer's current lr
            child.construct(lrs)
        st = self.st
        st["last_epoch"] = -1 + 1
        lrs[:] = initial_lrs  # "Reset learning rates back to initial values"
        for child in self.children:  # recursive_undo
            child.st["last_epoch"] -= 1
        idx = bisect.bisect_right(st["_milestones"], 0)
        self.children[idx].initial_step(lrs)
        st["_last_lr"] = list(self.children[idx].st["_last_lr"])

    def frozen(self):
        ms = self.st["_milestones"]
        return (not ms or self.st["last_epoch"] >= ms[-1]) and self.children[-1].frozen()

    def freezes(self):
        return self.children[-1].freezes()

    def limit(self):
        last = self.children[-1].limit()
        return None if last is None else last + (self.st["_milestones"][-1] if self.st["_milestones"] else 0)

    def export(self):
        return {**self.st, "_schedulers": [c.export() for c in self.children]}

    @property
    def epoch(self):
        return self.st["last_epoch"]


class _Chained:
    name = "ChainedScheduler"

    def __init__(self, st: dict, children: list[_Leaf]):
        self.st, self.children = st, children

    def step(self, lrs):
        for child in self.children:
            child.step(lrs)
        self.st["_last_lr"] = list(lrs)

    def construct(self, lrs, initial_lrs):
        for child in self.children:
            child.construct(lrs)
        self.st["_last_lr"] = list(lrs)

    def frozen(self):
        return all(c.frozen() for c in self.children)

    def freezes(self):
        return all(c.freezes() for c in self.children)

    def limit(self):
        limits = [c.limit() for c in self.children if c.limit() is not None]
        return min(limits) if limits else None

    def export(self):
        return {**self.st, "_schedulers": [c.export() for c in self.children]}

    @property
    def epoch(self):
        return self.children[0].st["last_epoch"]


# ----------------------------------------------------------------------------- parsing

def _floats(values, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{what} must be a list of numbers, got {values!r}") from exc


def _need(sd: Mapping, name: str, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise FormatError(f"{name} state dict lacks {_fmt(missing)}")


def _number(st: dict, name: str, key: str, integral: bool = False) -> None:
    value = st[key]
    ok = isinstance(value, numbers.Integral) if integral else isinstance(value, numbers.Real)
    if not ok or isinstance(value, bool):
        raise FormatError(f"{name}: {key} must be {'an integer' if integral else 'a number'}, got {value!r}")


_INTS = {"StepLR": ("step_size",), "ConstantLR": ("total_iters",), "LinearLR": ("total_iters",),
         "PolynomialLR": ("total_iters",), "CosineAnnealingLR": (), "OneCycleLR": ("total_steps",),
         "CosineAnnealingWarmRestarts": ("T_0", "T_i", "T_mult"), "MultiStepLR": (), "ExponentialLR": ()}
_REALS = {"StepLR": ("gamma",), "MultiStepLR": ("gamma",), "ExponentialLR": ("gamma",),
          "ConstantLR": ("factor",), "LinearLR": ("start_factor", "end_factor"), "PolynomialLR": ("power",),
          "CosineAnnealingLR": ("T_max", "eta_min"), "OneCycleLR": (),
          "CosineAnnealingWarmRestarts": ("eta_min", "T_cur")}


def _copy_state(sd: Mapping) -> dict:
    # an old OneCycleLR's bound method would drag the whole scheduler (and optimizer) into a deepcopy
    return {k: (v if k == "anneal_func" else copy.deepcopy(v)) for k, v in sd.items() if k != "_schedulers"}


def _parse(sd: Mapping, param_groups: Sequence[Mapping] | None, where: str = ""):
    """The replaying object for a state dict, refusing what cannot be exact."""
    name = scheduler_class(sd)
    reason = _refusal(name, sd)
    if reason:
        raise UnsupportedError(where + reason)
    st = _copy_state(sd)
    if name in _CONTAINERS:
        children_sd = sd["_schedulers"]
        if not isinstance(children_sd, Sequence) or not children_sd:
            raise FormatError(f"{where}{name}: _schedulers must be a non-empty list of state dicts")
        children = []
        for i, child in enumerate(children_sd):
            at = f"{where}{name} child {i}: "
            if scheduler_class(child) in _CONTAINERS:
                raise UnsupportedError(f"{at}{scheduler_class(child)} nested in {name} is not supported "
                                       f"(torch cannot step it at a milestone either)")
            children.append(_parse(child, param_groups, at))
        n = {len(c.base) for c in children}
        if len(n) != 1:
            raise FormatError(f"{where}{name}: its children disagree on the number of param groups")
        if name == "SequentialLR":
            _need(sd, name, ("_milestones", "last_epoch", "_last_lr"))
            ms = list(st["_milestones"])
            if len(ms) != len(children) - 1 or any(not isinstance(m, numbers.Integral) for m in ms):
                raise FormatError(f"{where}SequentialLR: _milestones {ms!r} must be {len(children) - 1} integers")
            st["_milestones"] = ms
            node = _Sequential(st, children)
        else:
            _need(sd, name, ("_last_lr",))
            if len({c.epoch for c in children}) != 1:
                raise FormatError(f"{where}ChainedScheduler: its children's last_epoch differ")
            node = _Chained(st, children)
        st["_last_lr"] = _floats(st["_last_lr"], f"{where}{name} _last_lr")
        if len(st["_last_lr"]) != n.pop():
            raise FormatError(f"{where}{name}: _last_lr has the wrong number of param groups")
        return node

    _need(sd, name, ("base_lrs", "last_epoch", "_step_count", "_last_lr"))
    st["base_lrs"] = _floats(st["base_lrs"], f"{where}{name} base_lrs")
    st["_last_lr"] = _floats(st["_last_lr"], f"{where}{name} _last_lr")
    if len(st["_last_lr"]) != len(st["base_lrs"]):
        raise FormatError(f"{where}{name}: base_lrs and _last_lr have different lengths")
    _number(st, name, "last_epoch", integral=True)
    _number(st, name, "_step_count", integral=True)
    for key in _INTS[name]:
        _number(st, name, key, integral=True)
    for key in _REALS[name]:
        _number(st, name, key)
    if name == "CosineAnnealingWarmRestarts" and st["T_cur"] != math.floor(st["T_cur"]):
        raise UnsupportedError(f"{where}CosineAnnealingWarmRestarts was stepped with fractional epochs "
                               f"(T_cur={st['T_cur']!r}): its lr then follows the epochs passed to step(), "
                               "not the optimizer step count")
    if name == "MultiStepLR":
        ms = st["milestones"]
        if not isinstance(ms, Mapping) or any(not isinstance(m, numbers.Integral) or isinstance(m, bool) for m in ms):
            raise FormatError(f"{where}MultiStepLR: milestones must be a Counter of integer epochs, got {ms!r}")
        st["milestones"] = Counter(ms) if not isinstance(ms, Counter) else ms
    groups = None
    if name == "OneCycleLR":
        if param_groups is None:
            raise UnsupportedError(
                f"{where}OneCycleLR keeps max_lr and min_lr in the optimizer's param_groups, not in its own state "
                "dict: pass param_groups=optimizer.state_dict()['param_groups']")
        if len(param_groups) != len(st["base_lrs"]):
            raise FormatError(f"{where}OneCycleLR: {len(param_groups)} param_groups for {len(st['base_lrs'])} base_lrs")
        used = {p[k] for p in st["_schedule_phases"] for k in ("start_lr", "end_lr")}
        groups = []
        for i, group in enumerate(param_groups):
            g = {"initial_lr": st["base_lrs"][i], **{k: group[k] for k in used if k in group}}
            missing = used - set(g)
            if missing:
                raise UnsupportedError(f"{where}OneCycleLR: param_groups[{i}] lacks {_fmt(missing)}")
            groups.append({k: float(v) for k, v in g.items()})
    return _LEAVES[name](st, groups)


def _leaves(node) -> list[_Leaf]:
    return node.children if hasattr(node, "children") else [node]


def _initial_lrs(node, name: str, param_groups) -> list[float]:
    """``group["lr"]`` when the (first) scheduler was constructed, i.e. the groups' ``initial_lr``."""
    if param_groups is not None and all("initial_lr" in g for g in param_groups):
        return _floats([g["initial_lr"] for g in param_groups], "param_groups initial_lr")
    bases = {tuple(leaf.base) for leaf in _leaves(node)}
    if len(bases) != 1:
        raise UnsupportedError(f"{name}: its children hold different base_lrs, so the optimizer's initial_lr "
                               "is ambiguous: pass param_groups=optimizer.state_dict()['param_groups']")
    return list(bases.pop())


def _replay_from_scratch(sd, param_groups, name, steps: int, check: bool):
    """A fresh replay of the scheduler, stepped ``steps`` times; rows[c] = lrs at last_epoch c.

    With ``check``, the replay must reproduce the state dict's ``_last_lr`` at its ``last_epoch``.
    """
    node = _parse(sd, param_groups)
    lrs = _initial_lrs(node, name, param_groups)
    if isinstance(node, _Leaf):
        node.construct(lrs)
    else:
        node.construct(lrs, list(lrs))
    rows = [list(lrs)]
    try:
        for _ in range(steps):
            node.step(lrs)
            rows.append(list(lrs))
    except _Beyond as exc:
        raise ScheduleRangeError(str(exc)) from None
    if check:
        k, want = last_epoch(sd), _floats(sd["_last_lr"], "_last_lr")
        got = rows[k]
        if any(not math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for a, b in zip(got, want)):
            raise UnsupportedError(
                f"{name}: replaying the scheduler from its base_lrs gives lr {got} at last_epoch={k}, but the state "
                f"dict holds _last_lr={want}: the learning rate was changed outside this scheduler (a second "
                f"scheduler stepping the same optimizer, a manual edit, or a tensor lr); refusing")
    return node, rows


def last_epoch(sd: Mapping) -> int:
    if "last_epoch" in sd:
        return sd["last_epoch"]
    return last_epoch(sd["_schedulers"][0])  # ChainedScheduler


def _check_groups(name: str, sd: Mapping, param_groups) -> None:
    if param_groups is None:
        return
    last = _floats(sd["_last_lr"], "_last_lr")
    if len(param_groups) != len(last):
        raise FormatError(f"{name}: {len(param_groups)} param_groups but {len(last)} learning rates")
    for i, (group, want) in enumerate(zip(param_groups, last)):
        if "lr" in group and not math.isclose(float(group["lr"]), want, rel_tol=1e-12, abs_tol=0.0):
            raise UnsupportedError(
                f"{name}: param_groups[{i}]['lr'] = {float(group['lr'])!r} is not the scheduler's _last_lr "
                f"{want!r}: the lr was changed after the scheduler's last step; refusing")


# ----------------------------------------------------------------------------- torch → Optax

class TorchLRSchedule:
    """An Optax schedule (``count -> lr``) holding torch's exact lr sequence for one param group.

    ``lrs[c]`` is torch's ``group["lr"]`` at ``last_epoch == c``. When ``clamped``, the lr never
    changes after the last entry, so every count ``>= 0`` is exact; otherwise counts above
    ``horizon`` (= ``len(lrs) - 1``) are refused: ``ValueError`` for a concrete count, NaN for a
    traced one (under ``jit``). Works with int32 counts under ``jit`` and ``vmap``; the result is
    float64 when ``jax_enable_x64`` is on.
    """

    def __init__(self, lrs: np.ndarray, *, clamped: bool, scheduler: str, group: int):
        self.lrs = np.array(lrs, dtype=np.float64)
        self.lrs.flags.writeable = False
        self.clamped = bool(clamped)
        self.scheduler = scheduler
        self.group = group
        self._device: dict[bool, Any] = {}

    @property
    def horizon(self) -> int | None:
        """The largest count answered, or None when every count is (``clamped``)."""
        return None if self.clamped else len(self.lrs) - 1

    def __repr__(self) -> str:
        span = "all counts" if self.clamped else f"counts 0..{self.horizon}"
        return f"TorchLRSchedule({self.scheduler}, group {self.group}, {span})"

    def _table(self):
        import jax
        import jax.numpy as jnp

        x64 = bool(jax.config.jax_enable_x64)
        if x64 not in self._device:
            if not x64:
                warnings.warn(f"{self!r}: jax_enable_x64 is off, so the lr is rounded to float32 (torch uses "
                              "Python floats); call jax.config.update('jax_enable_x64', True) for exact values",
                              stacklevel=3)
            with jax.ensure_compile_time_eval():
                self._device[x64] = jnp.asarray(self.lrs)
        return self._device[x64]

    def __call__(self, count):
        import jax
        import jax.numpy as jnp

        last = len(self.lrs) - 1
        if not isinstance(count, jax.core.Tracer):
            c = np.asarray(count)
            if not np.issubdtype(c.dtype, np.integer):
                raise TypeError(f"{self!r}: the step count must be an integer, got {count!r}")
            if c.size and (c.min() < 0 or (not self.clamped and c.max() > last)):
                raise ScheduleRangeError(f"{self!r}: count {count!r} is outside the exact range; "
                                 + ("counts start at 0" if c.min() < 0 else
                                    "build the schedules with a larger horizon="))
        count = jnp.asarray(count)
        lr = self._table()[jnp.clip(count, 0, last)]
        valid = count >= 0 if self.clamped else (count >= 0) & (count <= last)
        return jnp.where(valid, lr, jnp.nan)


def optax_schedules(sd: Mapping, *, horizon: int | None = None,
                    param_groups: Sequence[Mapping] | None = None) -> list[TorchLRSchedule]:
    """One Optax schedule per param group, reproducing torch's ``group["lr"]`` bit for bit.

    ``schedule(c)`` is the lr torch's optimizer uses on the step taken when the scheduler's
    ``last_epoch == c``; continue with ``ScaleByScheduleState.count = sd["last_epoch"]``.

    ``horizon``: the largest count the schedules will be called with (absolute, not remaining
    steps). Needed when the lr never settles (StepLR, ExponentialLR, CosineAnnealingLR,
    CosineAnnealingWarmRestarts, a SequentialLR/ChainedScheduler ending in one); ignored when it
    settles earlier; OneCycleLR defaults to its ``total_steps``. Building costs one Python step
    per count, about a microsecond each.

    ``param_groups``: ``optimizer.state_dict()["param_groups"]``. Required for OneCycleLR (its
    ``max_lr``/``min_lr`` live there). When given, each ``group["lr"]`` must equal the
    scheduler's ``_last_lr``.

    Raises :class:`~optstate.errors.UnsupportedError` for the refused schedulers (see the module
    docstring), when a needed horizon or param_groups is missing, and when the state dict's
    ``_last_lr`` is not what the scheduler produces from ``base_lrs``.
    """
    name = scheduler_class(sd)
    _parse(sd, param_groups)  # refusals and format errors first
    k = last_epoch(sd)
    node, rows = _replay_from_scratch(sd, param_groups, name, steps=k, check=True)
    _check_groups(name, sd, param_groups)
    limit = node.limit()
    if horizon is not None:
        if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral):
            raise TypeError(f"horizon must be an integer, got {horizon!r}")
        if horizon < k:
            raise ScheduleRangeError(f"{name}: horizon={horizon} is below the state's last_epoch={k}; horizon is the "
                             "largest absolute step count, not the number of remaining steps")
        if limit is not None and horizon > limit:
            raise ScheduleRangeError(f"{name}: horizon={horizon} goes past step {limit}, where torch raises "
                             "(OneCycleLR's total_steps)")
    target = horizon
    if target is None and not node.freezes():
        if limit is None:
            raise UnsupportedError(
                f"{name}: its learning rate never stops changing, so the schedule is a table that needs an end: "
                f"pass horizon=<the largest step count you will train to> (exact up to it, refused beyond)")
        target = limit

    # From last_epoch on, continue from the state dict itself (its lrs, its counters), exactly as
    # torch would after load_state_dict; the scratch replay only fills the counts before it.
    node = _parse(sd, param_groups)
    lrs = _floats(sd["_last_lr"], "_last_lr")
    rows[k] = list(lrs)
    c = k
    try:
        while not node.frozen() and (target is None or c < target):
            if c - k >= MAX_TABLE:
                raise UnsupportedError(f"{name}: more than {MAX_TABLE} steps before the lr settles; "
                                       "pass a smaller horizon=")
            node.step(lrs)
            rows.append(list(lrs))
            c += 1
    except _Beyond as exc:
        raise ScheduleRangeError(str(exc)) from None
    table = np.asarray(rows, dtype=np.float64)
    clamped = node.frozen()
    return [TorchLRSchedule(table[:, i], clamped=clamped, scheduler=name, group=i) for i in range(table.shape[1])]


# ----------------------------------------------------------------------------- Optax → torch

def restore_torch_scheduler_state(sd: Mapping, count: int, *,
                                  param_groups: Sequence[Mapping] | None = None) -> dict:
    """The torch scheduler state dict after ``count`` optimizer steps taken elsewhere.

    ``sd`` is a state dict of the same scheduler (typically of a freshly constructed one, at
    ``last_epoch == 0``). The result holds what torch would hold at ``last_epoch == count``
    (``last_epoch``, ``_step_count``, ``_last_lr``, ``T_cur``/``T_i``, the children of a
    SequentialLR/ChainedScheduler), computed by replaying torch's own steps. Load it with
    ``scheduler.load_state_dict(...)`` and also set every ``group["lr"]`` to :func:`group_lrs`:
    chainable schedulers compute the next lr from it::

        sched = CosineAnnealingLR(opt, T_max=100)
        state = restore_torch_scheduler_state(sched.state_dict(), count)
        sched.load_state_dict(state)
        for group, lr in zip(opt.param_groups, state["_last_lr"]):
            group["lr"] = lr

    When ``count`` is below the state's ``last_epoch``, the scheduler is replayed from its
    construction (and the replay must reproduce ``sd``). ``param_groups`` as in
    :func:`optax_schedules` (required for OneCycleLR).
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ScheduleRangeError(f"count must be a non-negative integer, got {count!r}")
    name = scheduler_class(sd)
    _parse(sd, param_groups)  # refusals and format errors first
    k = last_epoch(sd)
    if count >= k:
        node = _parse(sd, param_groups)
        lrs = _floats(sd["_last_lr"], "_last_lr")
        try:
            for _ in range(count - k):
                node.step(lrs)
        except _Beyond as exc:
            raise ScheduleRangeError(str(exc)) from None
    else:
        _replay_from_scratch(sd, param_groups, name, steps=k, check=True)
        node, _ = _replay_from_scratch(sd, param_groups, name, steps=count, check=False)
    return node.export()


def group_lrs(sd: Mapping, count: int, *, param_groups: Sequence[Mapping] | None = None) -> list[float]:
    """What each torch ``group["lr"]`` must be set to after ``count`` steps: the lr of the next step.

    Equal to ``restore_torch_scheduler_state(sd, count)["_last_lr"]`` and to
    ``optax_schedules(sd)[i](count)``.
    """
    return list(restore_torch_scheduler_state(sd, count, param_groups=param_groups)["_last_lr"])
