"""torch ``lr_scheduler.state_dict()`` → one Optax schedule per param group, and back.

The entry points, each defined in the module that says what it does:

- :func:`scheduler_class` (:mod:`.identify`): which torch class a state dict comes from (it does
  not say); :data:`SUPPORTED` and :data:`REFUSED` list what is converted exactly and what never is.
- :func:`optax_schedules` (:mod:`.optax_schedule`): one :class:`TorchLRSchedule` per param group,
  ``schedule(c)`` being the ``group["lr"]`` torch's optimizer uses on the step taken when
  ``scheduler.last_epoch == c``, bit for bit.
- :func:`restore_torch_scheduler_state` and :func:`group_lrs` (:mod:`.restore`): the other way, the
  state dict a torch scheduler has after ``count`` steps taken elsewhere, and the ``group["lr"]`` to set.
- :func:`last_epoch`: the step count a state dict was saved at.

The values are exact because no closed form is used: the state dict is parsed once into a tree of
leaf schedulers (:mod:`.parse`), and torch's own ``step()``/``get_lr()`` code is replayed on it
(:mod:`.replay`, :mod:`.history`). This module and those import only NumPy at the top; JAX is
imported when a schedule is called.

>>> sd = {"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0, "_step_count": 1, "_last_lr": [1.0]}
>>> scheduler_class(sd)
'ExponentialLR'
>>> group_lrs(sd, 3)
[0.125]
>>> restore_torch_scheduler_state(sd, 3)["_step_count"]
4
"""

from __future__ import annotations

from .identify import LAMBDA, REFUSED, SUPPORTED, scheduler_class
from .optax_schedule import MAX_TABLE, TorchLRSchedule, optax_schedules
from .parse import last_epoch
from .replay import ScheduleRangeError
from .restore import group_lrs, restore_torch_scheduler_state

__all__ = [
    "LAMBDA",
    "MAX_TABLE",
    "REFUSED",
    "SUPPORTED",
    "ScheduleRangeError",
    "TorchLRSchedule",
    "group_lrs",
    "last_epoch",
    "optax_schedules",
    "restore_torch_scheduler_state",
    "scheduler_class",
]
