"""Which torch LR scheduler a ``state_dict()`` comes from, and which ones no schedule can reproduce.

A torch scheduler's state dict does not name its class: it is the scheduler's ``__dict__`` less the
optimizer. :func:`scheduler_class` tells the class from the attributes it holds, and refuses a state
dict whose attributes fit no class exactly (a subclass, or a newer torch), rather than guess.

**Refused** (:func:`refusal` gives the reason, naming the scheduler): LambdaLR and MultiplicativeLR
(torch does not save the function), ReduceLROnPlateau (depends on metrics), CyclicLR (a custom
``scale_fn`` function is saved as ``None``, so the curve cannot be told from the state dict),
OneCycleLR with ``cycle_momentum=True`` (it also cycles momentum / ``betas[0]``).

A LambdaLR whose state dict also carries the transformers schedule it follows (recorded by
:func:`.transformers.attach`, from a Trainer's arguments) is :data:`TRANSFORMERS_LAMBDA`, and converts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...errors import FormatError, UnsupportedError
from .transformers import KEY as TRANSFORMERS_KEY

__all__ = [
    "CONTAINER_SCHEDULERS",
    "LAMBDA",
    "REFUSED",
    "SCHEDULER_GROUP_KEYS",
    "SUPPORTED",
    "TRANSFORMERS_LAMBDA",
    "attached_scheduler",
    "key_list",
    "refusal",
    "refuse_uncarried_schedule",
    "scheduler_class",
]

#: What :func:`scheduler_class` returns for LambdaLR and MultiplicativeLR: their state dicts hold
#: the same keys (``lr_lambdas`` and the base attributes), so they cannot be told apart.
LAMBDA = "LambdaLR/MultiplicativeLR"

#: A LambdaLR built by a transformers ``get_*_schedule`` function, its state dict carrying that function
#: and its arguments under :data:`.transformers.KEY` (torch saves the function as nothing).
TRANSFORMERS_LAMBDA = "LambdaLR[transformers]"

#: Schedulers converted exactly.
SUPPORTED = (
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LinearLR",
    "ConstantLR",
    "PolynomialLR",
    "OneCycleLR",
    "CosineAnnealingWarmRestarts",
    "SequentialLR",
    "ChainedScheduler",
    TRANSFORMERS_LAMBDA,
)
#: Schedulers refused, always.
REFUSED = (LAMBDA, "ReduceLROnPlateau", "CyclicLR")

#: Keys an LR scheduler writes into the param groups it drives (``initial_lr`` every scheduler,
#: the rest OneCycleLR and CyclicLR): an optimizer state_dict holding one had a scheduler attached.
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")

#: Schedulers that step other schedulers (their state dict holds the children's, under ``_schedulers``).
CONTAINER_SCHEDULERS = ("SequentialLR", "ChainedScheduler")

# Attributes every LRScheduler subclass may hold (``verbose`` in torch < 2.7).
_BASE = frozenset(
    {"base_lrs", "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "verbose"}
)

# name: (keys that identify it, other keys it may hold besides _BASE). Most specific first: a class
# whose keys include another's must be tried before it (SequentialLR before ChainedScheduler).
_SIGNATURES: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = tuple(
    (name, frozenset(required), frozenset(optional) | (_BASE if base else frozenset()))
    for name, required, optional, base in (
        ("SequentialLR", {"_milestones", "_schedulers"}, set(), True),
        ("ChainedScheduler", {"_schedulers"}, set(), True),
        (
            "ReduceLROnPlateau",
            {"patience", "cooldown", "num_bad_epochs"},
            {
                "factor",
                "default_min_lr",
                "min_lrs",
                "eps",
                "last_epoch",
                "_last_lr",
                "mode_worse",
                "mode",
                "threshold",
                "threshold_mode",
                "best",
                "cooldown_counter",
                "verbose",
            },
            False,
        ),
        (
            "CyclicLR",
            {"max_lrs", "total_size", "step_ratio"},
            {
                "mode",
                "gamma",
                "scale_mode",
                "cycle_momentum",
                "use_beta1",
                "base_momentums",
                "max_momentums",
                "_scale_fn_custom",
                "_scale_fn_ref",
                "scale_fn",
            },
            True,
        ),
        (
            "OneCycleLR",
            {"total_steps", "_schedule_phases"},
            {"_anneal_func_type", "anneal_func", "cycle_momentum", "use_beta1"},
            True,
        ),
        ("CosineAnnealingWarmRestarts", {"T_0", "T_i", "T_mult", "T_cur"}, {"eta_min"}, True),
        ("CosineAnnealingLR", {"T_max", "eta_min"}, set(), True),
        (TRANSFORMERS_LAMBDA, {"lr_lambdas", TRANSFORMERS_KEY}, set(), True),
        (LAMBDA, {"lr_lambdas"}, set(), True),
        ("StepLR", {"step_size", "gamma"}, set(), True),
        ("MultiStepLR", {"milestones", "gamma"}, set(), True),
        ("LinearLR", {"start_factor", "end_factor", "total_iters"}, set(), True),
        ("PolynomialLR", {"total_iters", "power"}, set(), True),
        ("ConstantLR", {"factor", "total_iters"}, set(), True),
        ("ExponentialLR", {"gamma"}, set(), True),
    )
)


def scheduler_class(sd: Mapping[str, Any]) -> str:
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
                    f"the scheduler state dict looks like {name} (it holds {key_list(required)}) but also holds "
                    f"{key_list(extra)}, which {name} does not have: a subclass or a newer torch; refusing to guess"
                )
            return name
    raise _unknown(keys)


def _unknown(keys: set[str]) -> UnsupportedError:
    if {"state", "param_groups"} <= keys:
        return UnsupportedError(
            "this is an optimizer state dict (keys 'state', 'param_groups'), not a scheduler state dict"
        )
    return UnsupportedError(
        f"unknown torch LR scheduler: its state dict holds {key_list(keys - _BASE) or 'no keys'}"
        f"{' besides ' + key_list(keys & _BASE) if keys & _BASE else ''}; "
        f"known: {', '.join(SUPPORTED + REFUSED)}"
    )


def key_list(keys: Iterable[Any]) -> str:
    """Keys for a message, sorted, quoted.

    >>> key_list({"gamma", "T_max"})
    "'T_max', 'gamma'"
    """
    return ", ".join(repr(k) for k in sorted(keys, key=str))


def refusal(name: str, sd: Mapping[str, Any]) -> str | None:
    """Why the scheduler ``name`` (as :func:`scheduler_class` says) with state ``sd`` cannot become a
    schedule, and what to do instead; None when it can.

    >>> refusal("StepLR", {}) is None
    True
    >>> refusal("ReduceLROnPlateau", {"_last_lr": [0.1]})[:50]
    'ReduceLROnPlateau: its learning rate depends on th'
    """
    if name == LAMBDA:
        return _lambda_refusal(sd)
    if name == "ReduceLROnPlateau":
        return (
            "ReduceLROnPlateau: its learning rate depends on the metric values passed to step(), not on the "
            "step count, so no schedule reproduces it; continue with a constant lr equal to its _last_lr "
            f"({list(sd.get('_last_lr') or [])!r}) or port the plateau logic yourself"
        )
    if name == "CyclicLR":
        return (
            "CyclicLR: a custom scale_fn given as a function is saved as None, so the state dict cannot show "
            "which curve was used (and with cycle_momentum=True, the default, it also cycles momentum / "
            "betas[0]); build the equivalent Optax schedule yourself"
        )
    if name == "OneCycleLR" and sd.get("cycle_momentum"):
        return (
            "OneCycleLR with cycle_momentum=True: besides the lr it cycles SGD's momentum / Adam's betas[0] "
            "on every step, which an lr schedule cannot carry; construct it with cycle_momentum=False, "
            "or also schedule the momentum yourself (optax.inject_hyperparams)"
        )
    return None


def _lambda_refusal(sd: Mapping[str, Any]) -> str:
    saved = [f for f in sd.get("lr_lambdas") or [] if f is not None]
    how = (
        "its lr_lambdas are callable objects, of which torch saves only the attributes, not the code"
        if saved
        else f"torch saves a function or lambda as None (lr_lambdas is {list(sd.get('lr_lambdas') or [])!r})"
    )
    return (
        f"LambdaLR or MultiplicativeLR (their state dicts look alike): the lr_lambda function is not "
        f"in the state dict ({how}), so the schedule cannot be recovered from it; build the equivalent "
        f"Optax schedule yourself (a function of the step count; LambdaLR: base_lr * f(count), "
        f"MultiplicativeLR: the running product of f) and pass it explicitly. A Hugging Face Trainer's "
        f"scheduler.pt converts with its checkpoint-N directory, whose training_args.bin names the schedule"
    )


def attached_scheduler(param_groups: Iterable[Mapping[str, Any]]) -> str | None:
    """Where param groups show that an LR scheduler drove them (``"param group 0 holds 'initial_lr'"``),
    or ``None``: the lr such a state continues with is the scheduler's, not the group's ``lr``.

    >>> attached_scheduler([{"lr": 0.1}]), attached_scheduler([{"lr": 0.05, "initial_lr": 0.1}])
    (None, "param group 0 holds 'initial_lr'")
    """
    for gi, group in enumerate(param_groups):
        found = [k for k in SCHEDULER_GROUP_KEYS if k in group]
        if found:
            return f"param group {gi} holds {key_list(found)}"
    return None


def refuse_uncarried_schedule(state: Any, where: str) -> None:
    """Refuse a state that followed an LR schedule whose state it does not carry, unless the user said the lr
    stays (``state.metadata.constant_lr``, ``--constant-lr``). The one rule of every trainer writer: with no
    torch scheduler state (``metadata.lr_scheduler`` is ``None``), an Optax schedule's count
    (``metadata.schedule_count``) or a param group holding a key a torch scheduler sets
    (:data:`SCHEDULER_GROUP_KEYS`, :func:`attached_scheduler`) means the lr the run takes next is unknown.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "initial_lr": 0.1},), (ParamInfo(("w",), (1,), "float32", 0),), {})
    >>> refuse_uncarried_schedule(s.with_metadata(constant_lr=True), "out")
    >>> refuse_uncarried_schedule(s, "out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.UnsupportedError: out: the state followed an LR schedule that it does not carry (param group 0 ...
    """
    metadata = state.metadata
    if metadata.lr_scheduler is not None or metadata.constant_lr:
        return
    count = metadata.schedule_count
    held = f"an Optax schedule at count {count}" if count is not None else attached_scheduler(state.param_groups)
    if held is not None:
        raise UnsupportedError(
            f"{where}: the state followed an LR schedule that it does not carry ({held}), so the lr the resumed run "
            "takes next is unknown; if the lr stays at the param groups' values from here, say so: --constant-lr"
        )
