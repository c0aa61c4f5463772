"""The in-memory path for tensors on an accelerator: from_torch leaves them where they are and to_optax
hands them to JAX by DLPack. No GPU here, so the tests put CPU tensors through the very same path
(``_stays_on_device`` says yes to them); only that one predicate is left untested."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import optstate
from optstate.converters.torch import live as torch_adapter
from optstate.errors import FormatError
from optstate.schema.state import Deferred

from frameworks import TinyNet, jax_train, torch_params, torch_train
from helpers import TOL, flat, max_abs_diff, nested
from test_continuation import TORCH_CASES, K, N


@pytest.fixture
def on_device(monkeypatch):
    monkeypatch.setattr(torch_adapter, "_stays_on_device", lambda tensor: tensor.ndim > 0)


def _leaves_with_device(state):
    return [a for _, _, a in state.iter_tensors() if isinstance(a, Deferred) and a.dlpack is not None]


@pytest.mark.parametrize("case", ["adam", "adamw-groups", "sgd-momentum", "rmsprop-all", "adafactor", "adagrad"])
def test_device_tensors_continue_exactly_in_jax(case, on_device):
    model = TinyNet()
    opt = TORCH_CASES[case](model)
    torch_train(model, opt, K)
    state = optstate.from_torch(opt, model=model)
    assert len(_leaves_with_device(state)) == len(state.slots) + len(state.weights)  # the path under test
    tx = optstate.optax_transform(state)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    params, _ = jax_train(tx, params, optstate.to_optax(state, tx, params), N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_jax_takes_the_tensors_by_dlpack_copied_on_the_device_or_borrowed(on_device, monkeypatch):
    net = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(net.named_parameters(), lr=1e-3)
    net(torch.ones(2, 64)).sum().backward()
    opt.step()
    live = opt.state[net.weight]["exp_avg"]
    params = {"weight": jax.numpy.zeros((32, 64), np.float32), "bias": jax.numpy.zeros(32, np.float32)}
    for copy in (True, False):
        state = optstate.from_torch(opt, copy=copy)
        kept = state.slots[("first_moment", ("weight",))].dlpack
        assert (kept.data_ptr() == live.data_ptr()) is not copy  # a copy made where the tensor is, or the tensor
        with monkeypatch.context() as m:
            m.setattr(torch_adapter, "tensor_to_numpy", lambda *a, **k: pytest.fail("a copy to the host"))
            mu = optstate.to_optax(state, optstate.optax_transform(state), params)[0].mu["weight"]
        assert mu.unsafe_buffer_pointer() == kept.data_ptr()  # DLPack: JAX reads the tensor's own memory
        np.testing.assert_array_equal(np.asarray(mu), live.numpy())


def test_device_state_saves_through_the_host_bit_exact(on_device, tmp_path):
    model = TinyNet()
    opt = TORCH_CASES["adafactor"](model)
    torch_train(model, opt, K)
    state = optstate.from_torch(opt, model=model)
    optstate.save(state, tmp_path / "s.safetensors")
    back = optstate.load(tmp_path / "s.safetensors")
    named = dict(model.named_parameters())
    for (slot, path), array in back.slots.items():
        expected = opt.state[named[".".join(path)]][back.spec.slot(slot).torch_key]
        assert array.dtype == expected.numpy().dtype and array.tobytes() == expected.numpy().tobytes(), (slot, path)


def test_non_finite_moments_on_the_device_are_refused_by_name(on_device):
    model = TinyNet()
    opt = TORCH_CASES["adam"](model)
    torch_train(model, opt, K)
    opt.state[model.fc2.bias]["exp_avg_sq"][0] = float("nan")
    with pytest.raises(FormatError, match=r"fc2\.bias: slot 'second_moment' holds non-finite"):
        optstate.from_torch(opt, model=model)


def _adam_state_and_params():
    model = TinyNet()
    opt = TORCH_CASES["adam"](model)
    torch_train(model, opt, K)
    return (
        model,
        opt,
        optstate.from_torch(opt, model=model),
        nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()}),
    )


def test_to_optax_allocates_no_template_moments():
    """tx.init would allocate every moment only for to_optax to replace it: on an accelerator, as much
    memory again as the state. The template comes from jax.eval_shape instead."""
    import optax

    _, _, state, params = _adam_state_and_params()
    inner = optstate.optax_transform(state)
    calls = []
    tx = optax.GradientTransformation(lambda p: calls.append(p) or inner.init(p), inner.update)
    optstate.to_optax(state, tx, params)
    assert calls and all(isinstance(leaf, jax.core.Tracer) for p in calls for leaf in jax.tree.leaves(p))


@pytest.mark.parametrize("kind", ["linear", "conv2d", "attention", "embedding"])
def test_layout_moves_of_device_tensors_happen_in_jax_bit_exact(kind, monkeypatch):
    """Moved to a Flax model (transposes, q/k/v split), device tensors are moved by JAX on the device:
    no copy to the host, and the same bits as NumPy's moves on the host."""
    from optstate.converters.jax.optax import nest
    from optstate.converters.layout.targets import relayout

    from test_layout import Case

    case = Case(kind, torch.optim.Adam, lr=1e-2)
    case.torch_steps(case.torch_model, case.opt, case.inputs[:2])
    target = case.target()
    host = relayout(optstate.from_torch(case.opt, model=case.torch_model), target=target)
    params = nest({p.path: np.asarray(host.weights[p.path]) for p in host.params})
    tx = optstate.optax_transform(host)
    expected = optstate.to_optax(host, tx, params)

    monkeypatch.setattr(torch_adapter, "_stays_on_device", lambda tensor: tensor.ndim > 0)
    on_device = relayout(optstate.from_torch(case.opt, model=case.torch_model), target=target)
    sources = [a.moved[0] for a in on_device.slots.values() if isinstance(a, Deferred) and a.moved is not None]
    assert sources and all(source.dlpack is not None for source in sources)  # moves of device tensors
    with monkeypatch.context() as m:
        m.setattr(torch_adapter, "tensor_to_numpy", lambda *a, **k: pytest.fail("a copy to the host"))
        got = optstate.to_optax(on_device, tx, params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_no_room_on_the_device_for_the_copy_means_a_copy_on_the_host(on_device, monkeypatch):
    model = TinyNet()
    opt = TORCH_CASES["adam"](model)
    torch_train(model, opt, K)

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.Tensor, "clone", no_room)
    state = optstate.from_torch(opt, model=model)
    assert not _leaves_with_device(state) and all(isinstance(a, np.ndarray) for a in state.slots.values())
    tx = optstate.optax_transform(state)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    params, _ = jax_train(tx, params, optstate.to_optax(state, tx, params), N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_an_init_jax_cannot_trace_is_run_as_it_is():
    """to_optax reads the template's shapes by tracing tx.init; an init that reads its inputs with
    NumPy cannot be traced, and is then run for real, as before."""
    import optax

    _, _, state, params = _adam_state_and_params()
    inner = optstate.optax_transform(state)
    host_init = optax.GradientTransformation(
        lambda p: (np.asarray(jax.tree.leaves(p)[0]), inner.init(p))[1], inner.update
    )
    for a, b in zip(
        jax.tree.leaves(optstate.to_optax(state, inner, params)),
        jax.tree.leaves(optstate.to_optax(state, host_init, params)),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_what_dlpack_gives_must_match_the_declared_array():
    """A device tensor whose shape or dtype disagrees with what the state declares is not taken as is."""
    from optstate.converters.jax.optax import to_jax

    declared = Deferred(
        (2,), np.dtype(np.float32), lambda: np.array([1.0, 2.0], np.float32), dlpack=torch.zeros(3, dtype=torch.float64)
    )
    assert to_jax(declared).tolist() == [1.0, 2.0]


def test_non_finite_complex_moments_on_the_device_are_refused():
    from optstate.converters.torch.live import _check_finite_on_device, device_array
    from optstate.schema.state import OptimizerState, ParamInfo

    moment = torch.tensor([1 + 1j, complex(float("nan"), 0)], dtype=torch.complex64)
    slots = {(slot, ("w",)): device_array(moment, copy=True) for slot in ("first_moment", "second_moment")}
    state = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("w",), (2,), "complex64", 0, 1),), slots)
    with pytest.raises(FormatError, match="w: slot 'first_moment' holds non-finite"):
        _check_finite_on_device(state)
