"""Hugging Face transformers' LR schedules, reproduced: the ``lr_lambda`` of each ``get_*_schedule`` function.

The Trainer's scheduler is a torch ``LambdaLR`` whose function is a ``functools.partial`` of a
function in ``transformers/optimization.py`` (``_get_linear_schedule_with_warmup_lr_lambda`` and the
like). torch saves such a function as nothing at all, so a ``scheduler.pt`` cannot say which curve it
follows; the Trainer's arguments can (``lr_scheduler_type``, ``warmup_steps``, ``max_steps``,
``lr_scheduler_kwargs``). :func:`schedule_from_arguments` turns them into a :class:`TransformersSchedule`
(the function and the keyword arguments its ``partial`` holds, computed as ``get_scheduler`` and the
``get_*`` functions compute them), and :func:`attach` records it in the LambdaLR's state dict under
:data:`KEY`, after checking that it gives the lr the state dict saved. From there the state dict goes
where every torch scheduler goes: :mod:`.parse` reads the record, :mod:`.replay` steps torch's LambdaLR
(``base_lr * lr_lambda(last_epoch)``) with :meth:`TransformersSchedule.factor` as its function.

The functions below are transformers' own, operation for operation on Python floats (so the values
are bit-identical to the Trainer's ``group["lr"]``), from transformers 5.25's ``optimization.py``
(Apache 2.0), unchanged in their arithmetic since 4.40. Types decided by metrics
(``reduce_lr_on_plateau``, ``greedy``) are refused by name.

>>> s = schedule_from_arguments("linear", num_warmup_steps=2, num_training_steps=10, learning_rate=0.1)
>>> [s.factor(step) for step in (0, 1, 2, 6, 10, 12)]
[0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
>>> s.settles_at()
10
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ...errors import FormatError, UnsupportedError

__all__ = [
    "KEY",
    "REFUSED_TYPES",
    "SCHEDULE_TYPES",
    "TransformersSchedule",
    "attach",
    "lambda_lr_state",
    "num_warmup_steps",
    "schedule_from_arguments",
    "trainer_arguments",
]

#: The key under which a LambdaLR's state dict carries the transformers schedule it follows.
KEY = "transformers_schedule"


# ----------------------------------------------------------------------------- transformers' lr_lambdas
# Copied from transformers/optimization.py; the arithmetic (and the order of it) is what makes them exact.


def _constant(current_step: int) -> float:
    # _get_constant_lambda returns the int 1; base_lr * 1 == base_lr * 1.0 exactly
    return 1


def _constant_with_warmup(current_step: int, *, num_warmup_steps: int) -> float:
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear_with_warmup(current_step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine_with_warmup(
    current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float, min_lr_rate: float = 0.0
) -> float:
    # optimization.py defines _get_cosine_schedule_with_warmup_lr_lambda twice; the second definition (this one,
    # with min_lr_rate) replaces the first before any schedule is built, so "cosine" runs it too, with 0.0.
    # Both give the same floats: factor * 1.0 + 0.0 is factor, and max(0, .) and max(0.0, .) scale to 0.0 alike.
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _cosine_with_hard_restarts(
    current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int
) -> float:
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial_decay(
    current_step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float,
    power: float,
    lr_init: float,
) -> float:
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    elif current_step > num_training_steps:
        return lr_end / lr_init
    else:
        lr_range = lr_init - lr_end
        decay_steps = num_training_steps - num_warmup_steps
        pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
        decay = lr_range * pct_remaining**power + lr_end
        return decay / lr_init


def _inverse_sqrt(current_step: int, *, num_warmup_steps: int, timescale: int) -> float:
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    shift = timescale - num_warmup_steps
    decay = 1.0 / math.sqrt((current_step + shift) / timescale)
    return decay


def _cosine_warmup_with_min_lr_rate(
    current_step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float,
    min_lr_rate: float = 0.0,
    warmup_lr_rate: float | None = None,
) -> float:
    step = float(current_step)
    warmup = float(num_warmup_steps)
    total = float(num_training_steps)
    if step < warmup:
        if warmup_lr_rate is None:
            return (step + 1.0) / max(1.0, warmup)
        warmup_lr_rate = float(warmup_lr_rate)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * (step) / (max(1, warmup - 1))
    progress = (step - warmup + 1.0) / (max(1.0, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _warmup_stable_decay(
    current_step: int,
    *,
    num_warmup_steps: int,
    num_stable_steps: int,
    num_decay_steps: int,
    warmup_type: str,
    decay_type: str,
    min_lr_ratio: float,
    num_cycles: float,
) -> float:
    if current_step < num_warmup_steps:
        progress = float(current_step) / float(max(1, num_warmup_steps))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        else:  # "1-sqrt", checked when the schedule was read
            factor = 1.0 - math.sqrt(1.0 - progress)
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    if current_step < num_warmup_steps + num_stable_steps:
        return 1.0
    if current_step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(current_step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        else:  # "1-sqrt"
            factor = 1.0 - math.sqrt(progress)
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    return min_lr_ratio


# ----------------------------------------------------------------------------- the table of types


@dataclass(frozen=True)
class _Type:
    """One ``lr_scheduler_type``: its lr_lambda, the keyword arguments that lambda's partial holds (integer
    step counts, other numbers, strings), and from which step on the lr stops changing (None: never)."""

    function: Callable[..., float]
    ints: tuple[str, ...] = ()
    reals: tuple[str, ...] = ()
    strings: tuple[str, ...] = ()
    optional_reals: tuple[str, ...] = ()  # a number or None
    settles: Callable[[Mapping[str, Any]], int] | None = None

    @property
    def keywords(self) -> frozenset[str]:
        return frozenset(self.ints + self.reals + self.strings + self.optional_reals)


_COUNTS = ("num_warmup_steps", "num_training_steps")

#: Every ``lr_scheduler_type`` reproduced, by its value in ``transformers.SchedulerType``.
_TYPES: dict[str, _Type] = {
    "constant": _Type(_constant, settles=lambda kw: 0),
    "constant_with_warmup": _Type(
        _constant_with_warmup, ints=("num_warmup_steps",), settles=lambda kw: max(kw["num_warmup_steps"], 0)
    ),
    "linear": _Type(
        _linear_with_warmup, ints=_COUNTS, settles=lambda kw: max(kw["num_warmup_steps"], kw["num_training_steps"], 0)
    ),
    "cosine": _Type(_cosine_with_warmup, ints=_COUNTS, reals=("num_cycles",)),
    "cosine_with_restarts": _Type(
        _cosine_with_hard_restarts,
        ints=_COUNTS,
        reals=("num_cycles",),
        # progress >= 1.0 from here on, so the lambda returns 0.0
        settles=lambda kw: max(kw["num_warmup_steps"] + max(1, kw["num_training_steps"] - kw["num_warmup_steps"]), 0),
    ),
    "polynomial": _Type(
        _polynomial_decay,
        ints=_COUNTS,
        reals=("lr_end", "power", "lr_init"),
        settles=lambda kw: max(kw["num_warmup_steps"], kw["num_training_steps"] + 1, 0),  # lr_end / lr_init
    ),
    "inverse_sqrt": _Type(_inverse_sqrt, ints=("num_warmup_steps", "timescale")),
    "cosine_with_min_lr": _Type(_cosine_with_warmup, ints=_COUNTS, reals=("num_cycles", "min_lr_rate")),
    "cosine_warmup_with_min_lr": _Type(
        _cosine_warmup_with_min_lr_rate,
        ints=_COUNTS,
        reals=("num_cycles", "min_lr_rate"),
        optional_reals=("warmup_lr_rate",),
    ),
    "warmup_stable_decay": _Type(
        _warmup_stable_decay,
        ints=("num_warmup_steps", "num_stable_steps", "num_decay_steps"),
        reals=("min_lr_ratio", "num_cycles"),
        strings=("warmup_type", "decay_type"),
        settles=lambda kw: max(
            kw["num_warmup_steps"],
            kw["num_warmup_steps"] + kw["num_stable_steps"],
            kw["num_warmup_steps"] + kw["num_stable_steps"] + kw["num_decay_steps"],
            0,
        ),
    ),
}

#: The ``lr_scheduler_type`` values reproduced exactly.
SCHEDULE_TYPES = tuple(_TYPES)

#: The ``lr_scheduler_type`` values refused, and why.
REFUSED_TYPES = types.MappingProxyType(
    {
        "reduce_lr_on_plateau": "its lr follows the evaluation metric passed to step(), not the step count",
        "greedy": "GreedyLR follows the training metric passed to step(), not the step count",
    }
)

_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class TransformersSchedule:
    """A transformers LR schedule: ``type`` (an ``lr_scheduler_type``) and the keyword arguments its
    lr_lambda's ``functools.partial`` holds, as the ``get_*`` function computed them.

    Checked when built: an unknown or refused type, a missing or extra argument, or one of the wrong
    kind is refused by name.

    >>> s = TransformersSchedule("cosine", {"num_warmup_steps": 0, "num_training_steps": 4, "num_cycles": 0.5})
    >>> [round(s.factor(step), 12) for step in range(4)], s.settles_at() is None
    ([1.0, 0.853553390593, 0.5, 0.146446609407], True)
    >>> TransformersSchedule("cosine", {"num_warmup_steps": 0})
    Traceback (most recent call last):
    optstate.errors.FormatError: transformers schedule 'cosine': missing 'num_cycles', 'num_training_steps'
    """

    type: str
    kwargs: Mapping[str, Any]

    def __post_init__(self) -> None:
        kind = _type(self.type)
        kwargs = dict(self.kwargs)
        where = f"transformers schedule {self.type!r}"
        missing, extra = kind.keywords - set(kwargs), set(kwargs) - kind.keywords
        if missing or extra:
            parts = [f"missing {_keys(missing)}"] * bool(missing) + [f"unexpected {_keys(extra)}"] * bool(extra)
            raise FormatError(f"{where}: {'; '.join(parts)}")
        for name in kind.ints:
            _check_number(kwargs[name], f"{where}: {name}", integral=True)
        for name in kind.reals:
            _check_number(kwargs[name], f"{where}: {name}")
        for name in kind.optional_reals:
            if kwargs[name] is not None:
                _check_number(kwargs[name], f"{where}: {name}")
        for name in kind.strings:
            if kwargs[name] not in _WSD_SHAPES:
                raise UnsupportedError(f"{where}: {name} {kwargs[name]!r} is not one of {', '.join(_WSD_SHAPES)}")
        object.__setattr__(self, "kwargs", types.MappingProxyType(kwargs))

    def factor(self, step: int) -> float:
        """The lr_lambda at ``step`` (torch's ``last_epoch``): the lr is ``base_lr * factor(step)``.

        >>> TransformersSchedule("constant_with_warmup", {"num_warmup_steps": 4}).factor(1)
        0.25
        """
        return _TYPES[self.type].function(step, **self.kwargs)

    def settles_at(self) -> int | None:
        """The first step from which the factor never changes again, or None where it keeps changing
        (cosine, inverse_sqrt: an Optax table of it needs a horizon).

        >>> TransformersSchedule("polynomial", {"num_warmup_steps": 1, "num_training_steps": 5, "lr_end": 0.0,
        ...                                     "power": 2.0, "lr_init": 0.1}).settles_at()
        6
        """
        settles = _TYPES[self.type].settles
        return None if settles is None else settles(self.kwargs)

    def describe(self) -> str:
        """One line for people: the type and its arguments.

        >>> TransformersSchedule("linear", {"num_warmup_steps": 2, "num_training_steps": 10}).describe()
        'linear (num_warmup_steps=2, num_training_steps=10)'
        """
        return f"{self.type} ({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

    def to_json(self) -> dict[str, Any]:
        """The record a state dict carries under :data:`KEY` (plain strings and numbers).

        >>> TransformersSchedule.from_json(TransformersSchedule("constant", {}).to_json())
        TransformersSchedule(type='constant', kwargs=mappingproxy({}))
        """
        return {"type": self.type, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, document: Any) -> TransformersSchedule:
        """The schedule :meth:`to_json` wrote, checked."""
        if not isinstance(document, Mapping) or set(document) != {"type", "kwargs"}:
            raise FormatError(f"{KEY} must be a mapping of 'type' and 'kwargs', got {document!r}")
        if not isinstance(document["kwargs"], Mapping):
            raise FormatError(f"{KEY} kwargs must be a mapping, got {document['kwargs']!r}")
        return cls(str(document["type"]), document["kwargs"])


def _type(name: str) -> _Type:
    if name in REFUSED_TYPES:
        raise UnsupportedError(f"transformers lr_scheduler_type {name!r}: {REFUSED_TYPES[name]}; refusing")
    kind = _TYPES.get(name)
    if kind is None:
        raise UnsupportedError(
            f"transformers lr_scheduler_type {name!r} is not reproduced (reproduced: {', '.join(SCHEDULE_TYPES)})"
        )
    return kind


def _keys(keys: Iterable[str]) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def _check_number(value: Any, what: str, integral: bool = False) -> None:
    ok = isinstance(value, numbers.Integral if integral else numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise FormatError(f"{what} must be {'an integer' if integral else 'a number'}, got {value!r}")


# ----------------------------------------------------------------------------- from the Trainer's arguments


def num_warmup_steps(warmup_steps: float, num_training_steps: int, warmup_ratio: float | None = None) -> int:
    """The warm-up length the Trainer passes to ``get_scheduler``: ``TrainingArguments.get_warmup_steps``.

    transformers 5 takes ``warmup_steps`` >= 1 as steps and below 1 as a ratio of the training steps;
    4.x had ``warmup_ratio`` apart, used when ``warmup_steps`` is 0. One formula gives both.

    >>> num_warmup_steps(3.0, 10), num_warmup_steps(0.25, 10), num_warmup_steps(0, 10, warmup_ratio=0.15)
    (3, 3, 2)
    """
    if warmup_steps >= 1:
        return int(warmup_steps)
    if warmup_steps > 0:
        return math.ceil(num_training_steps * warmup_steps)
    return math.ceil(num_training_steps * warmup_ratio) if warmup_ratio else 0


def schedule_from_arguments(
    lr_scheduler_type: str,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    learning_rate: float,
    lr_scheduler_kwargs: Mapping[str, Any] | None = None,
) -> TransformersSchedule:
    """The schedule ``transformers.get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps,
    num_training_steps, scheduler_specific_kwargs=lr_scheduler_kwargs)`` builds for an optimizer whose
    default lr is ``learning_rate``: the arguments each ``get_*`` function gives its lr_lambda, defaults
    and derived values (``timescale``, ``min_lr_rate``, ``num_stable_steps``, ``lr_init``) included.

    ``lr_scheduler_kwargs`` that the ``get_*`` function would not take are refused by name (transformers
    raises a TypeError on them); those that ``get_scheduler`` ignores (for ``constant`` and
    ``constant_with_warmup``) are ignored.

    >>> schedule_from_arguments("inverse_sqrt", num_warmup_steps=0, num_training_steps=10, learning_rate=0.1).kwargs
    mappingproxy({'num_warmup_steps': 0, 'timescale': 10000})
    >>> schedule_from_arguments("cosine_with_min_lr", num_warmup_steps=1, num_training_steps=10, learning_rate=0.5,
    ...                         lr_scheduler_kwargs={"min_lr": 0.05}).kwargs["min_lr_rate"]
    0.1
    """
    _type(lr_scheduler_type)
    extra = dict(lr_scheduler_kwargs or {})
    counts = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    build = _BUILDERS[lr_scheduler_type]
    kwargs = build(counts, extra, learning_rate)
    if extra:
        raise UnsupportedError(
            f"transformers lr_scheduler_type {lr_scheduler_type!r}: lr_scheduler_kwargs {_keys(set(extra))} "
            "are not arguments of its schedule function (transformers raises a TypeError on them)"
        )
    return TransformersSchedule(lr_scheduler_type, kwargs)


def _take(extra: dict[str, Any], name: str, default: Any) -> Any:
    return extra.pop(name, default)


def _min_lr_rate(extra: dict[str, Any], learning_rate: float, name: str) -> float:
    """``min_lr`` / ``min_lr_rate`` as ``get_cosine_with_min_lr_schedule_with_warmup`` reads them."""
    min_lr, min_lr_rate = extra.pop("min_lr", None), extra.pop("min_lr_rate", None)
    if min_lr is not None and min_lr_rate is not None:
        raise FormatError(f"transformers lr_scheduler_type {name!r}: set one of min_lr and min_lr_rate, not both")
    if min_lr is not None:
        return min_lr / learning_rate
    if min_lr_rate is None:
        raise FormatError(
            f"transformers lr_scheduler_type {name!r}: lr_scheduler_kwargs sets neither min_lr nor min_lr_rate"
        )
    return min_lr_rate


def _polynomial_kwargs(counts: dict[str, int], extra: dict[str, Any], learning_rate: float) -> dict[str, Any]:
    lr_end, power = _take(extra, "lr_end", 1e-7), _take(extra, "power", 1.0)
    if not learning_rate > lr_end:  # transformers raises here
        raise FormatError(
            f"transformers polynomial schedule: lr_end ({lr_end}) must be smaller than the lr ({learning_rate})"
        )
    return {**counts, "lr_end": lr_end, "power": power, "lr_init": learning_rate}


def _inverse_sqrt_kwargs(counts: dict[str, int], extra: dict[str, Any], learning_rate: float) -> dict[str, Any]:
    timescale = _take(extra, "timescale", None)
    warmup = counts["num_warmup_steps"]
    return {"num_warmup_steps": warmup, "timescale": (warmup or 10_000) if timescale is None else timescale}


def _wsd_kwargs(counts: dict[str, int], extra: dict[str, Any], learning_rate: float) -> dict[str, Any]:
    if "num_decay_steps" not in extra:
        raise FormatError("transformers warmup_stable_decay schedule: lr_scheduler_kwargs lacks num_decay_steps")
    decay = extra.pop("num_decay_steps")
    warmup, total = counts["num_warmup_steps"], counts["num_training_steps"]
    stable = _take(extra, "num_stable_steps", None)
    return {
        "num_warmup_steps": warmup,
        "num_stable_steps": total - warmup - decay if stable is None else stable,
        "num_decay_steps": decay,
        "warmup_type": _take(extra, "warmup_type", "linear"),
        "decay_type": _take(extra, "decay_type", "cosine"),
        "min_lr_ratio": _take(extra, "min_lr_ratio", 0),
        "num_cycles": _take(extra, "num_cycles", 0.5),
    }


def _constant_kwargs(counts: dict[str, int], extra: dict[str, Any], learning_rate: float) -> dict[str, Any]:
    extra.clear()  # get_scheduler passes get_constant_schedule no lr_scheduler_kwargs
    return {}


def _constant_with_warmup_kwargs(counts: dict[str, int], extra: dict[str, Any], learning_rate: float) -> dict[str, Any]:
    extra.clear()  # nor get_constant_schedule_with_warmup
    return {"num_warmup_steps": counts["num_warmup_steps"]}


# What each get_* function passes its lr_lambda; each takes the kwargs it reads out of ``extra``.
_BUILDERS: dict[str, Callable[[dict[str, int], dict[str, Any], float], dict[str, Any]]] = {
    "constant": _constant_kwargs,
    "constant_with_warmup": _constant_with_warmup_kwargs,
    "linear": lambda counts, extra, lr: dict(counts),
    "cosine": lambda counts, extra, lr: {**counts, "num_cycles": _take(extra, "num_cycles", 0.5)},
    "cosine_with_restarts": lambda counts, extra, lr: {**counts, "num_cycles": _take(extra, "num_cycles", 1)},
    "polynomial": _polynomial_kwargs,
    "inverse_sqrt": _inverse_sqrt_kwargs,
    "cosine_with_min_lr": lambda counts, extra, lr: {
        **counts,
        "num_cycles": _take(extra, "num_cycles", 0.5),
        "min_lr_rate": _min_lr_rate(extra, lr, "cosine_with_min_lr"),
    },
    "cosine_warmup_with_min_lr": lambda counts, extra, lr: {
        **counts,
        "num_cycles": _take(extra, "num_cycles", 0.5),
        "min_lr_rate": _min_lr_rate(extra, lr, "cosine_warmup_with_min_lr"),
        "warmup_lr_rate": _take(extra, "warmup_lr_rate", None),
    },
    "warmup_stable_decay": _wsd_kwargs,
}


# ----------------------------------------------------------------------------- the LambdaLR's state dict


def attach(sd: Mapping[str, Any], schedule: TransformersSchedule, source: str = "scheduler") -> dict[str, Any]:
    """The LambdaLR state dict ``sd`` with ``schedule`` recorded under :data:`KEY`, so that it converts.

    Refused unless ``schedule`` gives the lr the state dict saved: ``_last_lr`` must be
    ``base_lr * schedule.factor(last_epoch)`` for every param group (else the arguments do not
    describe this scheduler: another function, a changed lr, a different ``max_steps``).

    >>> sd = {"base_lrs": [0.1], "last_epoch": 1, "_step_count": 2, "_last_lr": [0.05], "lr_lambdas": [{}]}
    >>> s = schedule_from_arguments("linear", num_warmup_steps=2, num_training_steps=10, learning_rate=0.1)
    >>> attach(sd, s)[KEY]
    {'type': 'linear', 'kwargs': {'num_warmup_steps': 2, 'num_training_steps': 10}}
    >>> attach({**sd, "_last_lr": [0.04]}, s)
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: scheduler: the linear schedule gives lr 0.05 at step 1 for param group 0, ...
    """
    for key in ("base_lrs", "last_epoch", "_last_lr", "lr_lambdas"):
        if key not in sd:
            raise FormatError(f"{source}: a LambdaLR state dict holds {key!r}; this one does not")
    base, last, epoch = list(sd["base_lrs"]), list(sd["_last_lr"]), sd["last_epoch"]
    if not (len(base) == len(last) == len(sd["lr_lambdas"])):
        raise FormatError(f"{source}: base_lrs, _last_lr and lr_lambdas hold different numbers of param groups")
    for group, (b, saved) in enumerate(zip(base, last, strict=True)):
        want = float(b) * schedule.factor(epoch)
        if not math.isclose(want, float(saved), rel_tol=1e-12, abs_tol=0.0):
            raise UnsupportedError(
                f"{source}: the {schedule.type} schedule gives lr {want!r} at step {epoch} for param group {group}, "
                f"but the scheduler saved _last_lr {float(saved)!r}: the arguments ({schedule.describe()}) do not "
                "describe this scheduler; refusing"
            )
    return {**sd, KEY: schedule.to_json()}


# ----------------------------------------------------------------------------- the way back: a Trainer's scheduler


def trainer_arguments(schedule: TransformersSchedule, *, learning_rate: float) -> dict[str, Any]:
    """The ``TrainingArguments`` fields under which ``Trainer.create_scheduler`` builds ``schedule``:
    ``lr_scheduler_type``, ``warmup_steps`` (whole steps), ``max_steps`` (where the schedule reads the number
    of training steps), ``learning_rate`` and ``lr_scheduler_kwargs``. Checked the way round:
    :func:`schedule_from_arguments` of them gives ``schedule`` back, else refused (``polynomial``'s
    ``lr_init`` is the learning rate, say).

    >>> s = schedule_from_arguments("cosine", num_warmup_steps=2, num_training_steps=10, learning_rate=0.1)
    >>> trainer_arguments(s, learning_rate=0.1)  # doctest: +NORMALIZE_WHITESPACE
    {'lr_scheduler_type': 'cosine', 'warmup_steps': 2, 'max_steps': 10, 'learning_rate': 0.1,
     'lr_scheduler_kwargs': {'num_cycles': 0.5}}
    >>> trainer_arguments(TransformersSchedule("constant", {}), learning_rate=0.1)
    {'lr_scheduler_type': 'constant', 'warmup_steps': 0, 'learning_rate': 0.1, 'lr_scheduler_kwargs': {}}
    >>> s = schedule_from_arguments("polynomial", num_warmup_steps=0, num_training_steps=5, learning_rate=0.1)
    >>> trainer_arguments(s, learning_rate=0.2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: transformers schedule polynomial (..., lr_init=0.1): no TrainingArguments ...
    """
    kwargs = dict(schedule.kwargs)
    warmup = int(kwargs.pop("num_warmup_steps", 0))
    total = kwargs.pop("num_training_steps", None)
    kwargs.pop("lr_init", None)  # get_polynomial_decay_schedule_with_warmup takes the optimizer's lr
    try:
        rebuilt = schedule_from_arguments(
            schedule.type,
            num_warmup_steps=num_warmup_steps(warmup, total or 0),
            num_training_steps=total or 0,  # not read by the types without it
            learning_rate=learning_rate,
            lr_scheduler_kwargs=kwargs,
        )
    except (FormatError, UnsupportedError) as exc:
        _refuse_arguments(schedule, learning_rate, str(exc))
    if dict(rebuilt.kwargs) != dict(schedule.kwargs):
        _refuse_arguments(schedule, learning_rate, f"they build {rebuilt.describe()}")
    steps = {} if total is None else {"max_steps": int(total)}
    return {
        "lr_scheduler_type": schedule.type,
        "warmup_steps": warmup,
        **steps,
        "learning_rate": learning_rate,
        "lr_scheduler_kwargs": kwargs,
    }


def _refuse_arguments(schedule: TransformersSchedule, learning_rate: float, why: str) -> NoReturn:
    raise UnsupportedError(
        f"transformers schedule {schedule.describe()}: no TrainingArguments with learning_rate={learning_rate!r} "
        f"build it ({why}); refusing"
    )


def lambda_lr_state(schedule: TransformersSchedule, base_lrs: Iterable[float], last_epoch: int) -> dict[str, Any]:
    """The state dict of the Trainer's ``LambdaLR`` (torch 2.x's keys) after ``last_epoch`` steps of
    ``schedule``, one entry per param group: what ``scheduler.load_state_dict`` continues from. The
    function itself is not in it (torch saves a ``functools.partial`` as ``{}``): the Trainer rebuilds it.

    >>> s = schedule_from_arguments("linear", num_warmup_steps=2, num_training_steps=10, learning_rate=0.1)
    >>> sd = lambda_lr_state(s, [0.1, 0.1], 6)
    >>> sd["last_epoch"], sd["_step_count"], sd["_last_lr"], sd["lr_lambdas"]
    (6, 7, [0.05, 0.05], [{}, {}])
    """
    base = [float(b) for b in base_lrs]
    return {
        "base_lrs": base,
        "last_epoch": last_epoch,
        "_step_count": last_epoch + 1,
        "_is_initial": False,
        "_get_lr_called_within_step": False,
        "_last_lr": [b * schedule.factor(last_epoch) for b in base],
        "lr_lambdas": [{} for _ in base],
    }
