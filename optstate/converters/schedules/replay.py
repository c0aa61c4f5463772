"""torch's LR schedulers, replayed: each class's ``step()``/``get_lr()``, operation for operation, on Python floats.

**Why a replay and not a closed form.** Most torch schedulers are *chainable*: ``get_lr()`` computes
the next lr from the current ``group["lr"]`` (``lr * gamma``, LinearLR's ratio, CosineAnnealingLR's
recursive formula, with its own branch past ``T_max``), not from a closed form, so a closed form
rounds differently. Evaluated in JAX it also uses ``jnp.cos`` rather than ``math.cos``, which
matters where ``1 + cos`` is small: measured against torch's ``group["lr"]``, a float64 closed
form is off by 1.6e-10 relative for CosineAnnealingLR(T_max=100000) near its end (so is
``optax.cosine_decay_schedule``; 6.5e-13 at T_max=10000), and by 1e-14 for ExponentialLR after
1e5 steps. Replaying torch's own code on Python floats (which is what torch computes with) gives
values bit-identical to torch's ``group["lr"]``.

A replay is built from a :class:`~.parse.ParsedScheduler` by :func:`replayer` and owns a copy of its
state (``st``), updated as torch updates the scheduler's ``__dict__``; ``lrs``, passed to each call,
is the list of ``group["lr"]``, shared by the children of a container as they share the optimizer.

>>> from .parse import parse
>>> node = replayer(parse({"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1,
...                        "_last_lr": [1.0]}))
>>> lrs = [1.0]
>>> node.step(lrs); node.step(lrs); lrs, node.epoch
([0.25], 2)
"""

from __future__ import annotations

import abc
import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ...errors import FormatError, UnsupportedError
from .identify import TRANSFORMERS_LAMBDA
from .parse import ParsedScheduler
from .transformers import KEY as TRANSFORMERS_KEY
from .transformers import TransformersSchedule

__all__ = ["LEAF_REPLAYS", "LeafReplay", "ScheduleRangeError", "SchedulerReplay", "replayer"]


class ScheduleRangeError(UnsupportedError, ValueError):
    """A step count or horizon outside what the schedule answers exactly.

    Also a ``ValueError``: the count or horizon is an argument out of range, as ``schedule(c)`` callers expect.

    >>> issubclass(ScheduleRangeError, ValueError) and issubclass(ScheduleRangeError, UnsupportedError)
    True
    """


class SchedulerReplay(abc.ABC):
    """One scheduler (a leaf or a container of leaves) being stepped as torch steps it.

    >>> from .parse import parse
    >>> sd = {"base_lrs": [1.0], "last_epoch": 0, "_step_count": 1, "_last_lr": [1.0]}
    >>> node = replayer(parse({"_schedulers": [{**sd, "gamma": 0.5}, {**sd, "step_size": 2, "gamma": 0.1}],
    ...                        "_last_lr": [1.0]}))  # a ChainedScheduler: both step the same lrs
    >>> lrs = [1.0]
    >>> node.step(lrs); node.step(lrs); [round(lr, 12) for lr in lrs], node.epoch
    ([0.025], 2)
    """

    name: ClassVar[str] = ""

    def __init__(self, st: dict[str, Any]):
        self.st = st

    @abc.abstractmethod
    def step(self, lrs: list[float]) -> None:
        """``scheduler.step()`` without arguments, updating ``lrs`` (the groups' ``lr``) in place."""

    @abc.abstractmethod
    def construct(self, lrs: list[float]) -> None:
        """What the constructor does (``last_epoch=-1``), ``lrs`` being ``group["lr"]`` at that time."""

    @abc.abstractmethod
    def frozen(self) -> bool:
        """Whether every later step leaves the lrs exactly as they are."""

    @abc.abstractmethod
    def freezes(self) -> bool:
        """Whether :meth:`frozen` becomes true after finitely many steps."""

    @abc.abstractmethod
    def limit(self) -> int | None:
        """The largest ``last_epoch`` torch allows, or None."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """The state dict torch would hold now."""

    @property
    @abc.abstractmethod
    def epoch(self) -> int:
        """``last_epoch``."""


# ----------------------------------------------------------------------------- leaves


class LeafReplay(SchedulerReplay):
    """A scheduler stepping the optimizer's lrs itself: ``LRScheduler.step``, ``_update_lr``,
    ``_initial_step`` and ``__init__``, each subclass adding its class's ``get_lr`` (the chainable
    form) and ``_get_closed_form_lr``, which torch uses when stepped to a given epoch.

    >>> node = LEAF_REPLAYS["StepLR"]({"step_size": 2, "gamma": 0.5, "base_lrs": [1.0]})
    >>> lrs = [1.0]
    >>> node.construct(lrs); node.step(lrs); node.step(lrs); lrs, node.epoch, node.st["_step_count"]
    ([0.5], 2, 3)
    """

    has_closed_form: ClassVar[bool] = True  # torch's _update_lr(epoch) uses _get_closed_form_lr when it exists

    def __init__(self, st: dict[str, Any], groups: Sequence[dict[str, float]] | None = None):
        super().__init__(st)
        self.groups = groups

    def step(self, lrs: list[float]) -> None:
        self.st["_step_count"] += 1
        self._update(lrs, None, initial=False)

    def update_to(self, lrs: list[float], epoch: int) -> None:
        """``scheduler._update_lr(epoch)``, which SequentialLR calls at a milestone."""
        self._update(lrs, epoch, initial=False)

    def _update(self, lrs: list[float], epoch: int | None, initial: bool) -> None:
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
        self.st["last_epoch"] = -1
        self.initial_step(lrs)

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        """The class's ``get_lr()``: the next lrs from the current ones (``initial``: in the constructor)."""
        raise NotImplementedError

    def closed_form(self) -> list[float]:
        """The class's ``_get_closed_form_lr()``: the lrs at ``last_epoch`` from ``base_lrs``."""
        raise NotImplementedError

    def frozen(self) -> bool:
        return False

    def freezes(self) -> bool:
        return False

    def limit(self) -> int | None:
        return None

    def export(self) -> dict[str, Any]:
        return self.st

    @property
    def base(self) -> list[float]:
        return self.st["base_lrs"]

    @property
    def epoch(self) -> int:
        return self.st["last_epoch"]


class _StepLR(LeafReplay):
    name = "StepLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        if (st["last_epoch"] == 0) or (st["last_epoch"] % st["step_size"] != 0):
            return list(lrs)
        return [lr * st["gamma"] for lr in lrs]

    def closed_form(self) -> list[float]:
        st = self.st
        return [b * st["gamma"] ** (st["last_epoch"] // st["step_size"]) for b in self.base]

    def frozen(self) -> bool:
        return self.st["gamma"] == 1.0

    def freezes(self) -> bool:
        return self.frozen()


class _MultiStepLR(LeafReplay):
    name = "MultiStepLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        if st["last_epoch"] not in st["milestones"]:
            return list(lrs)
        return [lr * st["gamma"] ** st["milestones"][st["last_epoch"]] for lr in lrs]

    def closed_form(self) -> list[float]:
        st = self.st
        milestones = sorted(Counter(st["milestones"]).elements())
        return [b * st["gamma"] ** bisect.bisect_right(milestones, st["last_epoch"]) for b in self.base]

    def frozen(self) -> bool:
        return self.epoch >= 0 and all(m <= self.epoch for m in self.st["milestones"])

    def freezes(self) -> bool:
        return True


class _ConstantLR(LeafReplay):
    name = "ConstantLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        if st["last_epoch"] == 0:
            return [lr * st["factor"] for lr in lrs]
        if st["last_epoch"] != st["total_iters"]:
            return list(lrs)
        return [lr * (1.0 / st["factor"]) for lr in lrs]

    def closed_form(self) -> list[float]:
        st = self.st
        return [b * (st["factor"] + (st["last_epoch"] >= st["total_iters"]) * (1 - st["factor"])) for b in self.base]

    def frozen(self) -> bool:
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self) -> bool:
        return True


class _LinearLR(LeafReplay):
    name = "LinearLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        e, start, end, total = st["last_epoch"], st["start_factor"], st["end_factor"], st["total_iters"]
        if e == 0:
            return [lr * start for lr in lrs]
        if initial or e > total:
            return list(lrs)
        return [lr * (1.0 + (end - start) / (total * start + (e - 1) * (end - start))) for lr in lrs]

    def closed_form(self) -> list[float]:
        st = self.st
        e, start, end, total = st["last_epoch"], st["start_factor"], st["end_factor"], st["total_iters"]
        return [b * (start + (end - start) * min(total, e) / total) for b in self.base]

    def frozen(self) -> bool:
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self) -> bool:
        return True


class _ExponentialLR(LeafReplay):
    name = "ExponentialLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        if initial:
            return list(lrs)
        return [lr * self.st["gamma"] for lr in lrs]

    def closed_form(self) -> list[float]:
        return [b * self.st["gamma"] ** self.st["last_epoch"] for b in self.base]

    def frozen(self) -> bool:
        return self.st["gamma"] == 1.0

    def freezes(self) -> bool:
        return self.frozen()


class _PolynomialLR(LeafReplay):
    name = "PolynomialLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        e, total = st["last_epoch"], st["total_iters"]
        if initial or e > total:
            return list(lrs)
        decay_factor = ((1.0 - e / total) / (1.0 - (e - 1) / total)) ** st["power"]
        return [lr * decay_factor for lr in lrs]

    def closed_form(self) -> list[float]:
        st = self.st
        e, total = st["last_epoch"], st["total_iters"]
        return [b * (1.0 - min(total, e) / total) ** st["power"] for b in self.base]

    def frozen(self) -> bool:
        return self.epoch >= max(self.st["total_iters"], 0)

    def freezes(self) -> bool:
        return True


class _CosineAnnealingLR(LeafReplay):
    name = "CosineAnnealingLR"

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        e, t_max, eta_min = st["last_epoch"], st["T_max"], st["eta_min"]
        if initial:
            return list(lrs)
        if st["_step_count"] == 1 and e > 0:
            return [eta_min + (b - eta_min) * (1 + math.cos((e) * math.pi / t_max)) / 2 for b in self.base]
        if (e - 1 - t_max) % (2 * t_max) == 0:
            return [
                lr + (b - eta_min) * (1 - math.cos(math.pi / t_max)) / 2 for b, lr in zip(self.base, lrs, strict=True)
            ]
        return [
            (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max)) * (lr - eta_min) + eta_min
            for lr in lrs
        ]

    def closed_form(self) -> list[float]:
        st = self.st
        e, t_max, eta_min = st["last_epoch"], st["T_max"], st["eta_min"]
        return [eta_min + (b - eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2 for b in self.base]


class _OneCycleLR(LeafReplay):
    name = "OneCycleLR"
    has_closed_form = False

    def __init__(self, st: dict[str, Any], groups: Sequence[dict[str, float]] | None = None):
        super().__init__(st, groups)
        self.anneal = _ANNEALING[_anneal_kind(st)]

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        step_num = st["last_epoch"]
        if step_num > st["total_steps"]:
            # torch raises here too, so the lr past total_steps does not exist
            raise ScheduleRangeError(f"OneCycleLR: torch raises when stepped past total_steps={st['total_steps']}")
        return [self._group_lr(group, step_num) for group in self.groups or ()]

    def _group_lr(self, group: dict[str, float], step_num: int) -> float:
        """The lr of one group: annealed between the ends of the phase ``step_num`` is in."""
        phases = self.st["_schedule_phases"]
        start_step = 0.0
        for i, phase in enumerate(phases):
            end_step = phase["end_step"]
            if step_num <= end_step or i == len(phases) - 1:
                pct = (step_num - start_step) / (end_step - start_step)
                return self.anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
            start_step = phase["end_step"]
        raise FormatError("OneCycleLR: _schedule_phases is empty")  # torch builds two or three

    def limit(self) -> int | None:
        return self.st["total_steps"]


def _anneal_kind(st: dict[str, Any]) -> str:
    """``"cos"`` or ``"linear"``: torch >= 2.2 names it, older versions kept the bound method."""
    kind = st.get("_anneal_func_type")
    if kind is None and "anneal_func" in st:
        func = st["anneal_func"]
        method: str | None = getattr(getattr(func, "__func__", func), "__name__", None)
        kind = {"_annealing_cos": "cos", "_annealing_linear": "linear"}.get(method or "")
    if kind not in _ANNEALING:
        raise UnsupportedError(f"OneCycleLR: unknown annealing function {kind!r} (known: 'cos', 'linear')")
    return kind


def _annealing_cos(start: float, end: float, pct: float) -> float:
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def _annealing_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


_ANNEALING: dict[str, Callable[[float, float, float], float]] = {"cos": _annealing_cos, "linear": _annealing_linear}


class _CosineAnnealingWarmRestarts(LeafReplay):
    """Its own ``step(epoch=None)``: no ``_step_count``, no chaining; the cycle is tracked by ``T_cur``/``T_i``."""

    name = "CosineAnnealingWarmRestarts"
    has_closed_form = False

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        st = self.st
        return [
            st["eta_min"] + (b - st["eta_min"]) * (1 + math.cos(math.pi * st["T_cur"] / st["T_i"])) / 2
            for b in self.base
        ]

    def step(self, lrs: list[float], epoch: int | None = None) -> None:
        st = self.st
        if epoch is None and st["last_epoch"] < 0:
            epoch = 0
        if epoch is None:
            epoch = st["last_epoch"] + 1
            self._next_in_cycle()
        else:
            self._cycle_at(epoch)
        st["last_epoch"] = math.floor(epoch)
        lrs[:] = self.get_lr(lrs, False)
        st["_last_lr"] = list(lrs)

    def _next_in_cycle(self) -> None:
        st = self.st
        st["T_cur"] = st["T_cur"] + 1
        if st["T_cur"] >= st["T_i"]:
            st["T_cur"] = st["T_cur"] % st["T_i"]
            st["T_i"] = st["T_i"] * st["T_mult"]

    def _cycle_at(self, epoch: int) -> None:
        st = self.st
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

    def initial_step(self, lrs: list[float]) -> None:
        self.st["_step_count"] = 0
        self.step(lrs)

    def construct(self, lrs: list[float]) -> None:
        self.st.update(last_epoch=-1, T_cur=-1, T_i=self.st["T_0"])
        self.initial_step(lrs)


class _TransformersLambdaLR(LeafReplay):
    """torch's LambdaLR, its function being the transformers schedule the state dict carries
    (:mod:`.transformers`): ``get_lr`` is ``base_lr * lr_lambda(last_epoch)``, no closed form.

    >>> sd = {"base_lrs": [0.1], "last_epoch": 0, "_step_count": 1, "_last_lr": [0.0], "lr_lambdas": [{}],
    ...       "transformers_schedule": {"type": "linear", "kwargs": {"num_warmup_steps": 2, "num_training_steps": 4}}}
    >>> node = LEAF_REPLAYS[TRANSFORMERS_LAMBDA](sd)
    >>> lrs = [0.0]; [node.step(lrs) or lrs[0] for _ in range(4)], node.frozen()
    ([0.05, 0.1, 0.05, 0.0], True)
    """

    name = TRANSFORMERS_LAMBDA
    has_closed_form = False  # LambdaLR has no _get_closed_form_lr: stepped to an epoch, it calls get_lr

    def __init__(self, st: dict[str, Any], groups: Sequence[dict[str, float]] | None = None):
        super().__init__(st, groups)
        self.schedule = TransformersSchedule.from_json(st[TRANSFORMERS_KEY])

    def get_lr(self, lrs: list[float], initial: bool) -> list[float]:
        return [b * self.schedule.factor(self.st["last_epoch"]) for b in self.base]

    def frozen(self) -> bool:
        settles = self.schedule.settles_at()
        return settles is not None and self.epoch >= settles

    def freezes(self) -> bool:
        return self.schedule.settles_at() is not None


#: The replay of each leaf class, by the name :func:`~.identify.scheduler_class` gives.
LEAF_REPLAYS: dict[str, type[LeafReplay]] = {
    cls.name: cls
    for cls in (
        _StepLR,
        _MultiStepLR,
        _ConstantLR,
        _LinearLR,
        _ExponentialLR,
        _PolynomialLR,
        _CosineAnnealingLR,
        _OneCycleLR,
        _CosineAnnealingWarmRestarts,
        _TransformersLambdaLR,
    )
}


# ----------------------------------------------------------------------------- containers


class _ContainerReplay(SchedulerReplay):
    """A scheduler stepping its children (each a leaf), which step the optimizer's lrs."""

    def __init__(self, st: dict[str, Any], children: list[LeafReplay]):
        super().__init__(st)
        self.children = children

    def export(self) -> dict[str, Any]:
        return {**self.st, "_schedulers": [c.export() for c in self.children]}


class _SequentialLR(_ContainerReplay):
    name = "SequentialLR"

    def step(self, lrs: list[float]) -> None:
        st = self.st
        st["last_epoch"] += 1
        idx = bisect.bisect_right(st["_milestones"], st["last_epoch"])
        scheduler = self.children[idx]
        if idx > 0 and st["_milestones"][idx - 1] == st["last_epoch"]:
            scheduler.update_to(lrs, 0)
        else:
            scheduler.step(lrs)
        st["_last_lr"] = list(scheduler.st["_last_lr"])

    def construct(self, lrs: list[float]) -> None:
        initial_lrs = list(lrs)
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

    def frozen(self) -> bool:
        ms = self.st["_milestones"]
        return (not ms or self.st["last_epoch"] >= ms[-1]) and self.children[-1].frozen()

    def freezes(self) -> bool:
        return self.children[-1].freezes()

    def limit(self) -> int | None:
        last = self.children[-1].limit()
        return None if last is None else last + (self.st["_milestones"][-1] if self.st["_milestones"] else 0)

    @property
    def epoch(self) -> int:
        return self.st["last_epoch"]


class _ChainedScheduler(_ContainerReplay):
    name = "ChainedScheduler"

    def step(self, lrs: list[float]) -> None:
        for child in self.children:
            child.step(lrs)
        self.st["_last_lr"] = list(lrs)

    def construct(self, lrs: list[float]) -> None:
        for child in self.children:
            child.construct(lrs)
        self.st["_last_lr"] = list(lrs)

    def frozen(self) -> bool:
        return all(c.frozen() for c in self.children)

    def freezes(self) -> bool:
        return all(c.freezes() for c in self.children)

    def limit(self) -> int | None:
        limits = [limit for limit in (c.limit() for c in self.children) if limit is not None]
        return min(limits) if limits else None

    @property
    def epoch(self) -> int:
        return self.children[0].st["last_epoch"]


_CONTAINER_REPLAYS: dict[str, type[_ContainerReplay]] = {cls.name: cls for cls in (_SequentialLR, _ChainedScheduler)}


def replayer(tree: ParsedScheduler) -> SchedulerReplay:
    """A replay of the scheduler ``tree`` holds, standing where its state dict was saved (as torch's
    scheduler does after ``load_state_dict``), on a copy of that state.

    >>> from .parse import parse
    >>> replayer(parse({"step_size": 2, "gamma": 0.1, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1,
    ...                 "_last_lr": [1.0]})).limit() is None
    True
    """
    if tree.children:
        return _CONTAINER_REPLAYS[tree.name](tree.fresh_state(), [_leaf_replayer(c) for c in tree.children])
    return _leaf_replayer(tree)


def _leaf_replayer(tree: ParsedScheduler) -> LeafReplay:
    return LEAF_REPLAYS[tree.name](tree.fresh_state(), tree.groups)
