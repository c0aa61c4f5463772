"""Orbax output holds a few arrays at a time: lazy arrays (layout moves) are made as Orbax writes them."""

from __future__ import annotations

import weakref

import jax
import numpy as np

import optstate
from optstate.converters.jax.orbax import _ArrayWriter
from optstate.schema.state import Deferred, OptimizerState, ParamInfo

N = 3 * _ArrayWriter.IN_FLIGHT


def _lazy_state():
    """SGD with momentum over N matrices, every momentum buffer a Deferred transpose that records how
    many results of such transposes are alive when it is made."""
    rng = np.random.default_rng(0)
    sources = {(f"layer{i}", "kernel"): rng.standard_normal((64, 32)).astype(np.float32) for i in range(N)}
    alive, made = [], []

    def transpose(source):
        made.append(sum(ref() is not None for ref in alive))
        result = np.ascontiguousarray(source.T)
        alive.append(weakref.ref(result))
        return result

    slots = {
        ("momentum", p): Deferred((32, 64), np.dtype(np.float32), lambda s=s: transpose(s)) for p, s in sources.items()
    }
    params = tuple(ParamInfo(p, (32, 64), "float32", 0, 1) for p in sources)
    weights = {p: np.zeros((32, 64), np.float32) for p in sources}
    state = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), params, slots, weights)
    return state, sources, made


def test_lazy_arrays_are_made_while_orbax_writes_a_few_at_a_time(tmp_path):
    state, sources, made = _lazy_state()
    written = []
    optstate.api.write(state, tmp_path / "out", "optax", progress=written.append)
    assert len(made) == N  # each made once, by the writer
    assert max(made) <= _ArrayWriter.IN_FLIGHT, f"{max(made)} transposes alive at once"
    assert sum(written) == 2 * N * 32 * 64 * 4  # progress: the weights and the moments, as written

    _params, opt_state, _ = optstate.load_optax(tmp_path / "out")
    trace = jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "trace"))[0].trace
    for (module, leaf), source in sources.items():
        np.testing.assert_array_equal(trace[module][leaf], source.T)
