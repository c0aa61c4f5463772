"""Shared by the torch-semantics tests: run an Optax transform over NumPy gradients, compare results."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.cache
def jitted_update(tx: optax.GradientTransformation):
    # Compiling dominates the run time; each chain is compiled once for all tests that use it.
    return jax.jit(tx.update)


def run_optax(tx, params, gradients, steps: range, state=None) -> list[np.ndarray]:
    """Train ``params`` (a list of arrays) over ``steps`` with ``gradients(step, params)``."""
    params = [jnp.asarray(p) for p in params]
    state = tx.init(params) if state is None else state
    update = jitted_update(tx)
    for step in steps:
        grads = [jnp.asarray(g) for g in gradients(step, params)]
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
