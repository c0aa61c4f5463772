"""A scheduler's lrs over its steps: replayed from its construction, or continued from where it was saved.

Both directions of the conversion need the lrs before the saved ``last_epoch`` (a schedule answers
every count from 0; the state torch holds at an earlier count), and a state dict holds only the
latest. So the scheduler is replayed from its construction, on the lrs the optimizer had then
(``initial_lr``), and that replay must arrive at the saved ``_last_lr``: if it does not, the lr was
changed outside the scheduler, and no replay of it explains the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import UnsupportedError
from .parse import ParsedScheduler, floats
from .replay import SchedulerReplay, replayer

__all__ = ["advance", "replay_from_construction", "verified_history"]

# Not bit equality: a run resumed by building its scheduler with last_epoch=N took one closed-form step
# there (CosineAnnealingLR), which rounds differently from the chained steps replayed here.
_REL_TOL = 1e-12


def advance(node: SchedulerReplay, lrs: list[float], steps: int) -> list[list[float]]:
    """Step ``node`` ``steps`` times from the groups' ``lrs`` (updated in place); the lrs after each step.

    >>> from .parse import parse
    >>> node = replayer(parse({"step_size": 2, "gamma": 0.5, "base_lrs": [1.0], "last_epoch": 0,
    ...                        "_step_count": 1, "_last_lr": [1.0]}))
    >>> advance(node, [1.0], 4)
    [[1.0], [0.5], [0.5], [0.25]]
    """
    rows = []
    for _ in range(steps):
        node.step(lrs)
        rows.append(list(lrs))
    return rows


def replay_from_construction(
    tree: ParsedScheduler, param_groups: Sequence[Mapping[str, Any]] | None, steps: int
) -> tuple[SchedulerReplay, list[list[float]]]:
    """The scheduler as its constructor left it, stepped ``steps`` times, and the lrs at every
    ``last_epoch`` from 0 to ``steps``.

    >>> from .parse import parse
    >>> tree = parse({"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 9, "_step_count": 10, "_last_lr": [0.5 ** 9]})
    >>> node, rows = replay_from_construction(tree, None, 2)
    >>> node.epoch, rows
    (2, [[1.0], [0.5], [0.25]])
    """
    node = replayer(tree)
    lrs = _initial_lrs(tree, param_groups)
    node.construct(lrs)
    return node, [list(lrs), *advance(node, lrs, steps)]


def verified_history(tree: ParsedScheduler, param_groups: Sequence[Mapping[str, Any]] | None) -> list[list[float]]:
    """The lrs at every ``last_epoch`` from 0 to the saved one, replayed from the scheduler's construction;
    refused unless the replay reproduces the saved ``_last_lr``.

    >>> from .parse import parse
    >>> sd = {"gamma": 0.5, "base_lrs": [1.0], "last_epoch": 2, "_step_count": 3, "_last_lr": [0.25]}
    >>> verified_history(parse(sd), None)
    [[1.0], [0.5], [0.25]]
    """
    k = tree.epoch
    _, rows = replay_from_construction(tree, param_groups, k)
    got, want = rows[k], tree.last_lrs
    if any(not math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=0.0) for a, b in zip(got, want, strict=True)):
        raise UnsupportedError(
            f"{tree.name}: replaying the scheduler from its base_lrs gives lr {got} at last_epoch={k}, but the state "
            f"dict holds _last_lr={want}: the learning rate was changed outside this scheduler (a second "
            f"scheduler stepping the same optimizer, a manual edit, or a tensor lr); refusing"
        )
    return rows


def _initial_lrs(tree: ParsedScheduler, param_groups: Sequence[Mapping[str, Any]] | None) -> list[float]:
    """``group["lr"]`` when the (first) scheduler was constructed, i.e. the groups' ``initial_lr``."""
    if param_groups is not None and all("initial_lr" in g for g in param_groups):
        return floats([g["initial_lr"] for g in param_groups], "param_groups initial_lr")
    bases = {tuple(leaf.state["base_lrs"]) for leaf in tree.leaves}
    if len(bases) != 1:
        raise UnsupportedError(
            f"{tree.name}: its children hold different base_lrs, so the optimizer's initial_lr "
            "is ambiguous: pass param_groups=optimizer.state_dict()['param_groups']"
        )
    return list(bases.pop())
