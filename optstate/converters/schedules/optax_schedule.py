"""torch scheduler → Optax schedules: a table of the replayed lrs, indexed by the step count.

``schedule(c)`` is the ``group["lr"]`` torch's optimizer uses on the step taken when
``scheduler.last_epoch == c`` (one ``scheduler.step()``, without arguments, per optimizer step, as
torch documents), i.e. the schedule to pass to ``optax.scale_by_learning_rate`` with
``ScaleByScheduleState.count = last_epoch``. The table holds the lrs :mod:`.history` replays:
bit-identical to torch's. Building it costs a few microseconds per step in Python (about 3 s for a
million steps of warm-up + cosine); under ``jit`` it is a constant.

**Table length.** Schedulers whose lr stops changing (LinearLR, ConstantLR, PolynomialLR,
MultiStepLR after its last milestone, StepLR/ExponentialLR with ``gamma == 1``, a SequentialLR
whose last child is one of these) need no horizon: the table ends where the lr settles and the
schedule clamps to its last entry, exact for every count. The others (StepLR, ExponentialLR,
CosineAnnealingLR, CosineAnnealingWarmRestarts, and sequences ending in them) need
``horizon=``: the largest count the schedule will be called with (the total number of optimizer
steps of the run). OneCycleLR's horizon defaults to its ``total_steps`` (torch raises past it).
Beyond the horizon the schedule does not guess: with a concrete count it raises ``ValueError``,
under ``jit`` (where raising is impossible) it returns NaN, so a run past the horizon fails loudly.

The schedules compute in float64 when ``jax_enable_x64`` is on (float32 otherwise, which is not
exact, and warns once per schedule). JAX is imported when a schedule is called, not before.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import UnsupportedError
from .history import verified_history
from .parse import ParsedScheduler, check_param_groups, parse
from .replay import ScheduleRangeError, SchedulerReplay, replayer

__all__ = ["MAX_TABLE", "TorchLRSchedule", "optax_schedules"]

#: The longest table built (per param group), so that a huge ``total_iters`` or ``horizon`` fails
#: with a message instead of running for minutes.
MAX_TABLE = 10_000_000


class TorchLRSchedule:
    """An Optax schedule (``count -> lr``) holding torch's exact lr sequence for one param group.

    ``lrs[c]`` is torch's ``group["lr"]`` at ``last_epoch == c``. When ``clamped``, the lr never
    changes after the last entry, so every count ``>= 0`` is exact; otherwise counts above
    ``horizon`` (= ``len(lrs) - 1``) are refused: ``ValueError`` for a concrete count, NaN for a
    traced one (under ``jit``). Works with int32 counts under ``jit`` and ``vmap``; the result is
    float64 when ``jax_enable_x64`` is on.

    >>> schedule = TorchLRSchedule(np.array([0.1, 0.05]), clamped=True, scheduler="StepLR", group=0)
    >>> schedule, schedule.horizon
    (TorchLRSchedule(StepLR, group 0, all counts), None)
    """

    def __init__(self, lrs: np.ndarray, *, clamped: bool, scheduler: str, group: int):
        self.lrs = np.array(lrs, dtype=np.float64)
        self.lrs.flags.writeable = False
        self.clamped = bool(clamped)
        self.scheduler = scheduler
        self.group = group
        self._device: dict[bool, Any] = {}  # the table as a JAX array, by jax_enable_x64

    @property
    def horizon(self) -> int | None:
        """The largest count answered, or None when every count is (``clamped``)."""
        return None if self.clamped else len(self.lrs) - 1

    def __repr__(self) -> str:
        span = "all counts" if self.clamped else f"counts 0..{self.horizon}"
        return f"TorchLRSchedule({self.scheduler}, group {self.group}, {span})"

    def _table(self) -> Any:
        import jax
        import jax.numpy as jnp

        x64 = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
        if x64 not in self._device:
            if not x64:
                warnings.warn(
                    f"{self!r}: jax_enable_x64 is off, so the lr is rounded to float32 (torch uses "
                    "Python floats); call jax.config.update('jax_enable_x64', True) for exact values",
                    stacklevel=3,
                )
            with jax.ensure_compile_time_eval():
                self._device[x64] = jnp.asarray(self.lrs)
        return self._device[x64]

    def __call__(self, count: Any) -> Any:
        import jax
        import jax.numpy as jnp

        last = len(self.lrs) - 1
        if not isinstance(count, jax.core.Tracer):
            self._check_count(count)
        count = jnp.asarray(count)
        lr = self._table()[jnp.clip(count, 0, last)]
        valid = count >= 0 if self.clamped else (count >= 0) & (count <= last)
        return jnp.where(valid, lr, jnp.nan)

    def _check_count(self, count: Any) -> None:
        """A concrete count can be refused with a message (a traced one gets NaN instead)."""
        c = np.asarray(count)
        if not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"{self!r}: the step count must be an integer, got {count!r}")
        if c.size and (c.min() < 0 or (not self.clamped and c.max() > len(self.lrs) - 1)):
            raise ScheduleRangeError(
                f"{self!r}: count {count!r} is outside the exact range; "
                + ("counts start at 0" if c.min() < 0 else "build the schedules with a larger horizon=")
            )


def optax_schedules(
    sd: Mapping[str, Any], *, horizon: int | None = None, param_groups: Sequence[Mapping[str, Any]] | None = None
) -> list[TorchLRSchedule]:
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

    Raises :class:`~optstate.errors.UnsupportedError` for the refused schedulers (see
    :mod:`.identify`), when a needed horizon or param_groups is missing, and when the state dict's
    ``_last_lr`` is not what the scheduler produces from ``base_lrs``.

    >>> sd = {"total_iters": 2, "start_factor": 0.5, "end_factor": 1.0, "base_lrs": [1.0], "last_epoch": 1,
    ...       "_step_count": 2, "_last_lr": [0.75]}
    >>> (schedule,) = optax_schedules(sd)  # LinearLR settles after total_iters: no horizon needed
    >>> schedule.lrs.tolist(), schedule.horizon
    ([0.5, 0.75, 1.0], None)
    """
    tree = parse(sd, param_groups)
    rows = verified_history(tree, param_groups)
    check_param_groups(tree, param_groups)
    # From last_epoch on, continue from the state dict itself (its lrs, its counters), exactly as
    # torch would after load_state_dict; the replay from construction only fills the counts before it.
    node = replayer(tree)
    rows[tree.epoch :] = _lrs_from_saved_state(tree, node, _table_end(tree, node, horizon))
    table = np.asarray(rows, dtype=np.float64)
    clamped = node.frozen()
    return [TorchLRSchedule(table[:, i], clamped=clamped, scheduler=tree.name, group=i) for i in range(table.shape[1])]


def _table_end(tree: ParsedScheduler, node: SchedulerReplay, horizon: int | None) -> int | None:
    """The last count the table must reach: ``horizon``, else where torch stops; None: where the lr settles."""
    limit = node.limit()
    if horizon is not None:
        _check_horizon(tree, horizon, limit)
        return horizon
    if node.freezes():
        return None
    if limit is None:
        raise UnsupportedError(
            f"{tree.name}: its learning rate never stops changing, so the schedule is a table that needs an end: "
            "pass --horizon N (horizon= in Python), the largest step count you will train to "
            "(exact up to it, refused beyond)"
        )
    return limit


def _check_horizon(tree: ParsedScheduler, horizon: int, limit: int | None) -> None:
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral):
        raise TypeError(f"horizon must be an integer, got {horizon!r}")
    if horizon < tree.epoch:
        raise ScheduleRangeError(
            f"{tree.name}: horizon={horizon} is below the state's last_epoch={tree.epoch}; "
            "horizon is the largest absolute step count, not the number of remaining steps"
        )
    if limit is not None and horizon > limit:
        raise ScheduleRangeError(
            f"{tree.name}: horizon={horizon} goes past step {limit}, where torch raises (OneCycleLR's total_steps)"
        )


def _lrs_from_saved_state(tree: ParsedScheduler, node: SchedulerReplay, end: int | None) -> list[list[float]]:
    """The lrs at ``last_epoch`` and after, stepping ``node`` until the lr settles or the count reaches ``end``."""
    lrs = tree.last_lrs
    rows = [list(lrs)]
    count = tree.epoch
    while not node.frozen() and (end is None or count < end):
        if count - tree.epoch >= MAX_TABLE:
            raise UnsupportedError(
                f"{tree.name}: more than {MAX_TABLE} steps before the lr settles; "
                "pass a smaller --horizon (horizon= in Python)"
            )
        node.step(lrs)
        rows.append(list(lrs))
        count += 1
    return rows
