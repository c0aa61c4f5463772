"""The example's model, written once for torch and once for JAX (torch layout: y = x @ W.T + b)."""

from __future__ import annotations

import itertools

import numpy as np

LAYERS = ("encoder", "hidden", "head")
SIZES = (8, 32, 32, 1)


def dataset(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SIZES[0]))
    y = np.sin(x @ rng.normal(size=(SIZES[0], 1))) + 0.1 * rng.normal(size=(n, 1))
    return x, y


def batches(step: int, x: np.ndarray, y: np.ndarray, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(1000 + step).choice(len(x), size, replace=False)
    return x[idx], y[idx]


def torch_model():
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            for name, (a, b) in zip(LAYERS, itertools.pairwise(SIZES), strict=True):
                setattr(self, name, torch.nn.Linear(a, b, dtype=torch.float64))

        def forward(self, x):
            for name in LAYERS[:-1]:
                x = torch.tanh(getattr(self, name)(x))
            return self.head(x)

    return MLP()


def jax_loss(params, x, y):
    import jax.numpy as jnp

    for name in LAYERS[:-1]:
        x = jnp.tanh(x @ params[name]["weight"].T + params[name]["bias"])
    pred = x @ params["head"]["weight"].T + params["head"]["bias"]
    return jnp.mean((pred - y) ** 2)
