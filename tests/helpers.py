"""The measurement protocol: one tiny model in both frameworks, the same gradients from NumPy for both, so
that any difference after a step is the optimizers' and not the models'."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

import optstate
from optstate.schema import OptimizerState, ParamInfo
from optstate.schema.state import NON_NEGATIVE_SLOTS

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


# ----------------------------------------------------------------------------- canonical states (property-based)

DTYPES = [np.dtype(d) for d in ("float64", "float32", "float16")] + [np.dtype(ml_dtypes.bfloat16)]
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="."), min_size=1, max_size=8)


@st.composite
def states(draw):
    family = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    spec = optstate.OPTIMIZERS[family]
    paths = draw(st.lists(st.tuples(names, names), min_size=1, max_size=4, unique=True))
    groups = draw(st.integers(1, 2))
    params, slots = [], {}
    for i, path in enumerate(paths):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        step = draw(st.integers(0, 2**40)) if spec.has_step else None
        params.append(ParamInfo(path, shape, str(dtype), i % groups, step))
        if draw(st.booleans()):
            for slot in spec.slots:
                bits = draw(
                    st.binary(
                        min_size=dtype.itemsize * int(np.prod(shape)), max_size=dtype.itemsize * int(np.prod(shape))
                    )
                )
                array = np.frombuffer(bits, dtype=np.dtype(f"u{dtype.itemsize}")).copy().reshape(shape)
                # Any finite bit pattern: clear the exponent's top bit so no NaN or inf sneaks in, and the sign
                # bit of a slot that is never negative (a second moment), which is refused as a diverged run is.
                keep = ~np.array(1 << (8 * dtype.itemsize - 2), array.dtype)
                if slot.name in NON_NEGATIVE_SLOTS:
                    keep &= ~np.array(1 << (8 * dtype.itemsize - 1), array.dtype)
                slots[(slot.name, path)] = (array & keep).view(dtype)
    hp = [{"lr": draw(st.floats(1e-6, 1.0)), "note": draw(names)} for _ in range(groups)]
    return OptimizerState(family, tuple(hp), tuple(params), slots)
