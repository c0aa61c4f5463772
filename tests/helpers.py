"""The measurement protocol of SEMANTICS.md: one tiny model in both frameworks, gradients from NumPy."""

from __future__ import annotations

import numpy as np

SHAPES = {"fc1.weight": (5, 3), "fc1.bias": (5,), "fc2.weight": (2, 5), "fc2.bias": (2,)}
TOL = 1e-12


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape) for name, shape in SHAPES.items()}


def gradient(step: int, name: str, value: np.ndarray) -> np.ndarray:
    """A fixed quadratic pull towards a target plus fixed per-step noise, at the current value."""
    rng = np.random.default_rng([step, *map(ord, name)])
    target = np.random.default_rng([*map(ord, name)]).normal(size=value.shape)
    return 0.7 * (value - target) + 0.3 * rng.normal(size=value.shape)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def flat(tree, prefix=()) -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{dotted name: array}``."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, prefix + (str(k),)))
        return out
    return {".".join(prefix): np.asarray(tree)}


def nested(named: dict[str, np.ndarray]) -> dict:
    root: dict = {}
    for name, value in named.items():
        *parents, leaf = name.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return root
