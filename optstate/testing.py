"""Helpers for users' own tests (pytest or any other runner): a torch optimizer and an Optax transform continue alike.

>>> from optstate.testing import assert_continues  # doctest: +SKIP
>>> assert_continues(torch_opt, tx, opt_state, params, steps=3)  # doctest: +SKIP

This module imports NumPy only; torch and JAX are imported when a check runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .converters import OPTAX, TORCH, adapter
from .schema.state import path_to_name
from .verify import (
    OptaxRun,
    Tally,
    TorchRun,
    VerifyReport,
    compare_states,
    param_roundings,
    random_gradients,
    rounding_notes,
    torch_param_groups,
    worst_first,
)

__all__ = ["assert_continues", "continues"]


def continues(
    torch_optimizer: Any,
    optax_tx: Any,
    optax_state: Any,
    params: Any,
    *,
    steps: int = 3,
    seed: int = 0,
    model: Any = None,
    scheduler: Any = None,
) -> VerifyReport:
    """Step a copy of ``torch_optimizer`` (over copies of its parameters) and ``optax_tx`` from ``optax_state``
    at ``params`` with the same seeded random gradients, and compare them after each step: every parameter's
    value, every slot, the step count. Neither the torch optimizer nor its parameters are changed.

    The Optax parameters are found by path: ``params["fc"]["weight"]`` is torch's ``fc.weight`` (in torch's
    layout). The torch optimizer names its parameters (built from ``model.named_parameters()``), or ``model``
    names them; a live ``scheduler`` sets the torch side's learning rate after each step as it would.

    The Optax side runs with JAX's 64-bit mode on, for this thread and this call only, as :func:`optstate.verify`
    runs it: its step scalars (bias corrections, ...) are then computed in float64 as torch's Python floats
    are, and its arrays keep their dtypes (checked after each step).
    """
    TORCH.require("assert_continues")
    OPTAX.require("assert_continues")
    import jax

    live = adapter("torch")
    state = live.from_torch(torch_optimizer, model=model, scheduler=scheduler)
    tensors = [p for group in torch_optimizer.param_groups for p in group["params"]]
    start = {info.path: live.tensor_to_numpy(t) for info, t in zip(state.params, tensors, strict=True)}
    roundings = param_roundings(state, ("torch", "optax"))
    with jax.enable_x64(True):
        torch_run = TorchRun(dataclasses.replace(state, weights=None, buffers=()), start)
        optax_run = OptaxRun(optax_tx, optax_state, params, state.optimizer, torch_param_groups(state))
        tallies = {p.path: Tally(path_to_name(p.path), p.dtype) for p in state.params}
        for step in range(1, steps + 1):
            grads = random_gradients(seed, step, state.params)
            torch_run.step(grads)
            optax_run.step(grads)
            compare_states(torch_run.snapshot(), optax_run.snapshot(), step, tallies, start, roundings)
    return VerifyReport(
        "the torch optimizer",
        "torch",
        "the Optax state",
        "optax",
        state.spec.torch_class,
        steps,
        seed,
        "random",
        worst_first(tallies),
        rounding_notes(state, ("torch", "optax")),
    )


def assert_continues(
    torch_optimizer: Any,
    optax_tx: Any,
    optax_state: Any,
    params: Any,
    *,
    steps: int = 3,
    seed: int = 0,
    model: Any = None,
    scheduler: Any = None,
) -> VerifyReport:
    """Assert that ``optax_tx`` from ``optax_state`` continues as ``torch_optimizer`` does (see :func:`continues`);
    an ``AssertionError`` otherwise, naming the parameters that differ, what differs and at which step.
    Returns the report.

    >>> import torch, jax, optax, optstate
    >>> from optstate.testing import assert_continues
    >>> jax.config.update("jax_enable_x64", True)
    >>> net = torch.nn.Linear(2, 1).double()
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> params = {"weight": net.weight.detach().numpy().copy(), "bias": net.bias.detach().numpy().copy()}
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> bool(assert_continues(opt, tx, tx.init(params), params))
    True
    >>> assert_continues(opt, optax.sgd(0.2, momentum=0.9), tx.init(params), params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: the Optax state does not continue the torch optimizer: DISAGREES: ... param differs by ...
    """
    report = continues(
        torch_optimizer, optax_tx, optax_state, params, steps=steps, seed=seed, model=model, scheduler=scheduler
    )
    if not report.agrees:
        lines = [f"the Optax state does not continue the torch optimizer: {report.summary()}"]
        lines += [f"  {check.describe()}" for check in report.disagreeing[:10]]
        raise AssertionError("\n".join(lines))
    return report
