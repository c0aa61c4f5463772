"""Training loops in torch and JAX that feed both frameworks the same NumPy gradients."""

from __future__ import annotations

import jax
import numpy as np
import optax
import torch

from helpers import SHAPES, flat, gradient, initial_params, nested

jax.config.update("jax_enable_x64", True)


class TinyNet(torch.nn.Module):
    def __init__(self, frozen: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 5, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(5, 2, dtype=torch.float64)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.from_numpy(initial_params()[name]))
        if frozen:
            self.fc1.bias.requires_grad_(False)


def torch_train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.from_numpy(gradient(step, name, p.detach().numpy().copy()))
        opt.step()


def torch_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def jax_params() -> dict:
    return nested({n: jax.numpy.asarray(v) for n, v in initial_params().items()})


def jax_train(tx, params, opt_state, steps: range, frozen: tuple[str, ...] = ()):
    for step in steps:
        grads = nested({n: np.zeros_like(v) if n in frozen else gradient(step, n, v) for n, v in flat(params).items()})
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


assert set(SHAPES) == {n for n, _ in TinyNet().named_parameters()}
