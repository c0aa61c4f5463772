"""Optax → torch: the state dict a torch scheduler would hold after ``count`` steps taken elsewhere.

An Optax schedule's state is its step count alone; a torch scheduler also keeps what its next step
reads (``_last_lr``, ``_step_count``, CosineAnnealingWarmRestarts' ``T_cur``/``T_i``, the children
of a container), and chainable schedulers compute the next lr from ``group["lr"]``. So the count is
turned back into all of these by replaying torch's own steps up to it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from .history import advance, replay_from_construction, verified_history
from .parse import parse
from .replay import ScheduleRangeError, replayer

__all__ = ["group_lrs", "restore_torch_scheduler_state"]


def restore_torch_scheduler_state(
    sd: Mapping[str, Any], count: int, *, param_groups: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
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
    :func:`~.optax_schedule.optax_schedules` (required for OneCycleLR).

    >>> sd = {"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1, "_last_lr": [1.0]}
    >>> state = restore_torch_scheduler_state(sd, 3)
    >>> state["last_epoch"], state["_step_count"], state["_last_lr"]
    (3, 4, [0.125])
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ScheduleRangeError(f"count must be a non-negative integer, got {count!r}")
    tree = parse(sd, param_groups)
    if count >= tree.epoch:  # forwards: torch's steps from the saved state, as after load_state_dict
        node = replayer(tree)
        advance(node, tree.last_lrs, count - tree.epoch)
    else:  # backwards: a state dict holds no earlier state, so the scheduler is replayed from its construction
        verified_history(tree, param_groups)
        node, _ = replay_from_construction(tree, param_groups, count)
    return node.export()


def group_lrs(
    sd: Mapping[str, Any], count: int, *, param_groups: Sequence[Mapping[str, Any]] | None = None
) -> list[float]:
    """What each torch ``group["lr"]`` must be set to after ``count`` steps: the lr of the next step.

    Equal to ``restore_torch_scheduler_state(sd, count)["_last_lr"]`` and to
    ``optax_schedules(sd)[i](count)``.

    >>> group_lrs({"gamma": 0.5, "base_lrs": [1.0, 0.1], "last_epoch": 0, "_step_count": 1,
    ...            "_last_lr": [1.0, 0.1]}, 2)
    [0.25, 0.025]
    """
    return list(restore_torch_scheduler_state(sd, count, param_groups=param_groups)["_last_lr"])
