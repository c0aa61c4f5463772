"""Model-level moves: torch modules <-> Flax linen/NNX models, moments moved with their parameters.

Each case trains a real torch layer, converts to the Flax model's layout, continues in Flax with
the converted state, converts back and continues in torch, comparing every step with staying put.
"""

from __future__ import annotations

import copy
import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import optstate
from optstate.converters.jax.flax import from_nnx, to_nnx
from optstate.converters.jax.optax import nest
from optstate.converters.layout.moves import Move
from optstate.converters.layout.rules import match_layout
from optstate.converters.layout.targets import relayout
from optstate.schema.state import name_to_path

jax.config.update("jax_enable_x64", True)
TOL = 1e-12
HP = {"lr": 1e-2, "weight_decay": 0.01, "eps": 1e-4}
D = torch.float64


class TorchNet(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, call=None):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x):
        return self.call(self.layer, x) if self.call else self.layer(x)


class FlaxNet(fnn.Module):
    make: object
    call: object = None

    @fnn.compact
    def __call__(self, x):
        layer = self.make(name="layer")
        return self.call(layer, x) if self.call else layer(x)


def channels_last(x):
    return np.moveaxis(x, 1, -1)


def _mha(layer, x):
    return layer(x, x, x, need_weights=False)[0]


# name: (torch layer, flax layer, input maker, input in Flax's layout)
LAYERS = {
    "linear": (lambda: torch.nn.Linear(4, 3, dtype=D), lambda **k: fnn.Dense(3, **k), (5, 4), None),
    "square_linear": (lambda: torch.nn.Linear(4, 4, dtype=D), lambda **k: fnn.Dense(4, **k), (5, 4), None),
    "conv1d": (
        lambda: torch.nn.Conv1d(2, 3, 3, dtype=D),
        lambda **k: fnn.Conv(3, (3,), padding="VALID", **k),
        (2, 2, 7),
        channels_last,
    ),
    "conv2d": (
        lambda: torch.nn.Conv2d(2, 3, (3, 2), dtype=D),
        lambda **k: fnn.Conv(3, (3, 2), padding="VALID", **k),
        (2, 2, 6, 5),
        channels_last,
    ),
    "conv3d": (
        lambda: torch.nn.Conv3d(2, 2, 2, dtype=D),
        lambda **k: fnn.Conv(2, (2, 2, 2), padding="VALID", **k),
        (2, 2, 4, 3, 3),
        channels_last,
    ),
    "conv_transpose2d": (
        lambda: torch.nn.ConvTranspose2d(2, 3, 2, dtype=D),
        lambda **k: fnn.ConvTranspose(3, (2, 2), padding="VALID", transpose_kernel=True, **k),
        (2, 2, 4, 4),
        channels_last,
    ),
    "embedding": (lambda: torch.nn.Embedding(7, 3, dtype=D), lambda **k: fnn.Embed(7, 3, **k), "tokens", None),
    "layernorm": (lambda: torch.nn.LayerNorm(4, dtype=D), lambda **k: fnn.LayerNorm(epsilon=1e-5, **k), (5, 4), None),
    "rmsnorm": (
        lambda: torch.nn.RMSNorm(4, eps=1e-6, dtype=D),
        lambda **k: fnn.RMSNorm(epsilon=1e-6, **k),
        (5, 4),
        None,
    ),
    "groupnorm": (
        lambda: torch.nn.GroupNorm(2, 4, dtype=D),
        lambda **k: fnn.GroupNorm(2, epsilon=1e-5, **k),
        (3, 4, 5),
        channels_last,
    ),
    "batchnorm": (
        lambda: torch.nn.BatchNorm1d(4, dtype=D),
        lambda **k: fnn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, **k),
        (6, 4),
        None,
    ),
    "attention": (
        lambda: torch.nn.MultiheadAttention(4, 2, batch_first=True, dtype=D),
        lambda **k: fnn.MultiHeadDotProductAttention(num_heads=2, **k),
        (2, 3, 4),
        None,
    ),
}


def _inputs(kind, shape, seed):
    rng = np.random.default_rng(seed)
    if shape == "tokens":
        return rng.integers(0, 7, size=(6,))
    return rng.normal(size=shape)


def _loss_torch(out):
    return ((torch.sin(out) - 0.3) ** 2).mean()


def _loss_jax(out):
    return ((jnp.sin(out) - 0.3) ** 2).mean()


class Case:
    def __init__(self, kind, optimizer=torch.optim.Adam, **hp):
        make_t, make_f, shape, to_flax = LAYERS[kind]
        torch.manual_seed(0)
        self.torch_model = TorchNet(make_t(), _mha if kind == "attention" else None)
        self.flax_model = FlaxNet(make_f)
        self.inputs = [_inputs(kind, shape, s) for s in range(12)]
        self.to_flax = to_flax or (lambda x: x)
        self.opt = optimizer(self.torch_model.parameters(), **hp)
        self.stateful = kind == "batchnorm"

    def torch_steps(self, model, opt, batches):
        losses = []
        for x in batches:
            opt.zero_grad()
            loss = _loss_torch(model(torch.from_numpy(x)))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def flax_steps(self, tx, params, opt_state, batches, extra):
        losses = []
        for x in batches:
            loss, grads = self.value_and_grad(params, extra, jnp.asarray(self.to_flax(x)))
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
        return params, opt_state, losses

    @functools.cached_property
    def value_and_grad(self):
        def loss(params, extra, x):
            variables = {"params": params, **extra}
            out = (
                self.flax_model.apply(variables, x, mutable=["batch_stats"])[0]
                if self.stateful
                else self.flax_model.apply(variables, x)
            )
            return _loss_jax(out)

        return jax.jit(jax.value_and_grad(loss))

    def target(self):
        x = jnp.asarray(self.to_flax(self.inputs[0]))
        return jax.tree.map(np.asarray, self.flax_model.init(jax.random.key(0), x))


def _flax_params(state):
    return nest({p.path: jnp.asarray(np.asarray(state.weights[p.path])) for p in state.params})


def _extra(state):
    stats = {p[1:]: jnp.asarray(np.asarray(state.weights[p])) for p in state.buffers if p[0] == "batch_stats"}
    return {"batch_stats": nest(stats)} if stats else {}


def _torch_named(model):
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_continuation_torch_to_flax_and_back(kind):
    # eps 1e-4, not 1e-8: attention's key bias has a zero gradient that each framework computes as
    # different rounding noise (1e-17), which Adam divides by about eps.
    case = Case(kind, torch.optim.Adam, **HP)
    case.torch_steps(case.torch_model, case.opt, case.inputs[:3])
    ckpt = copy.deepcopy({"model": case.torch_model.state_dict(), "optimizer": case.opt.state_dict()})
    stay = case.torch_steps(case.torch_model, case.opt, case.inputs[3:6])

    fstate = relayout(optstate.from_torch(ckpt), target=case.target())
    tx = optstate.optax_transform(fstate)
    params = _flax_params(fstate)
    params, opt_state, moved = case.flax_steps(
        tx, params, optstate.to_optax(fstate, tx, params), case.inputs[3:6], _extra(fstate)
    )
    assert np.max(np.abs(np.subtract(stay, moved))) < TOL
    layout = fstate.metadata.layout
    for m in layout["moves"]:  # parameters too, each at its place in the Flax tree
        torch_value = dict(case.torch_model.named_parameters()).get(".".join(m["source"]))
        if torch_value is not None:
            expected = Move.from_json(m).apply(torch_value.detach().numpy())
            assert np.max(np.abs(_leaf(params, m["target"]) - expected)) < TOL, m

    # ... and back: the Flax state after 3 more steps, into a fresh torch optimizer, 3 more steps each.
    back = optstate.from_optax(opt_state, params, optimizer="adam", hyperparams=HP)
    back = relayout(back, target=case.torch_model)
    model2 = copy.deepcopy(case.torch_model)
    opt2 = torch.optim.Adam(model2.parameters(), **HP)
    with torch.no_grad():
        for name, p in model2.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(back.weights[name_to_path(name)])))
    optstate.to_torch(back, opt2, model=model2)
    torch_after = case.torch_steps(model2, opt2, case.inputs[6:9])
    _, _, flax_after = case.flax_steps(tx, params, opt_state, case.inputs[6:9], _extra(fstate))
    assert np.max(np.abs(np.subtract(torch_after, flax_after))) < TOL


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def test_adafactor_statistics_follow_the_transpose():
    case = Case("linear", torch.optim.Adafactor, lr=1e-2)
    case.torch_steps(case.torch_model, case.opt, case.inputs[:3])
    ckpt = copy.deepcopy({"model": case.torch_model.state_dict(), "optimizer": case.opt.state_dict()})
    stay = case.torch_steps(case.torch_model, case.opt, case.inputs[3:6])
    state = optstate.from_torch(ckpt)
    fstate = relayout(state, target=case.target())
    rows = np.asarray(fstate.slots[("row_variance", ("layer", "kernel"))])
    assert rows.shape == (4, 1)  # the kernel is [in, out]: its rows are torch's columns
    np.testing.assert_array_equal(rows.T, state.slots[("column_variance", ("layer", "weight"))])
    tx = optstate.optax_transform(fstate)
    params = _flax_params(fstate)
    *_, moved = case.flax_steps(tx, params, optstate.to_optax(fstate, tx, params), case.inputs[3:6], {})
    assert np.max(np.abs(np.subtract(stay, moved))) < TOL


@pytest.mark.parametrize(
    "kind, optimizer, hp, feature",
    [
        ("conv2d", torch.optim.Adafactor, {"lr": 1e-2}, "factored"),
        ("attention", torch.optim.Adafactor, {"lr": 1e-2}, "factored"),
    ],
)
def test_moves_that_change_the_update_are_refused(kind, optimizer, hp, feature):
    case = Case(kind, optimizer, **hp)
    case.torch_steps(case.torch_model, case.opt, case.inputs[:1])
    state = optstate.from_torch({"model": case.torch_model.state_dict(), "optimizer": case.opt.state_dict()})
    with pytest.raises(optstate.UnsupportedError, match=feature):
        relayout(state, target=case.target())


def test_square_linear_is_transposed_not_reshaped():
    layout = match_layout({("fc", "weight"): (3, 3)}, {("fc", "kernel"): (3, 3)})
    w = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(layout.moves[0].apply(w), w.T)


def test_wrong_or_ambiguous_target_is_refused_with_the_names():
    sources = {("enc", "weight"): (4, 3), ("enc", "bias"): (4,), ("head", "weight"): (2, 4)}
    targets = {("enc", "kernel"): (4, 3), ("enc", "bias"): (4,), ("decoder", "kernel"): (4, 2)}
    with pytest.raises(optstate.MappingError) as err:
        match_layout(sources, targets)
    message = str(err.value)
    assert "enc.weight [4, 3]: target enc/kernel has shape [4, 3], expected [3, 4]" in message
    assert "head.weight [2, 4]: no target leaf" in message
    assert "decoder/kernel [4, 2]: no torch tensor" in message
    with pytest.raises(optstate.MappingError, match="ambiguous, fits norm/scale, norm/embedding"):
        match_layout({("norm", "weight"): (4,)}, {("norm", "scale"): (4,), ("norm", "embedding"): (4,)})


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List(
            [nnx.Linear(4, 5, rngs=rngs, param_dtype=jnp.float64), nnx.Linear(5, 3, rngs=rngs, param_dtype=jnp.float64)]
        )
        self.norm = nnx.LayerNorm(3, epsilon=1e-5, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.norm(self.layers[1](jnp.tanh(self.layers[0](x))))


class TorchTwin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5, dtype=D), torch.nn.Linear(5, 3, dtype=D)])
        self.norm = torch.nn.LayerNorm(3, dtype=D)

    def forward(self, x):
        return self.norm(self.layers[1](torch.tanh(self.layers[0](x))))


def test_nnx_model_and_optimizer_both_ways():
    torch.manual_seed(1)
    model = TorchTwin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    xs = [np.random.default_rng(s).normal(size=(6, 4)) for s in range(9)]

    def torch_steps(batches):
        for x in batches:
            opt.zero_grad()
            _loss_torch(model(torch.from_numpy(x))).backward()
            opt.step()

    torch_steps(xs[:3])
    ckpt = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    torch_steps(xs[3:6])

    net = NnxNet(nnx.Rngs(0))
    state = relayout(optstate.from_torch(ckpt), target=net)
    assert ("layers", "0", "kernel") in {p.path for p in state.params}
    nopt = nnx.Optimizer(net, optstate.optax_transform(state), wrt=nnx.Param)
    to_nnx(state, net, nopt)
    for x in xs[3:6]:
        grads = nnx.grad(lambda m, x=x: _loss_jax(m(jnp.asarray(x))))(net)
        nopt.update(net, grads)
    np.testing.assert_allclose(
        np.asarray(net.layers[0].kernel[...]), model.layers[0].weight.detach().numpy().T, rtol=0, atol=TOL
    )

    back = relayout(
        from_nnx(net, nopt, optimizer="adamw", hyperparams={"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-6}), target=model
    )
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    optstate.to_torch(back, opt2, model=model)
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(
            opt2.state[model.layers[0].weight][key].numpy(),
            np.asarray(nopt.opt_state[0].mu["layers"][0]["kernel"][...]).T
            if key == "exp_avg"
            else np.asarray(nopt.opt_state[0].nu["layers"][0]["kernel"][...]).T,
            rtol=0,
            atol=0,
        )


def test_names_that_meet_from_two_modules_are_ambiguous():
    targets = {("a_b", "c", "kernel"): (3, 2), ("a", "b_c", "kernel"): (3, 2)}
    with pytest.raises(optstate.MappingError, match="ambiguous, fits a_b/c/kernel, a/b_c/kernel"):
        match_layout({("a", "b", "c", "weight"): (2, 3)}, targets)


def test_the_way_back_refuses_what_the_way_there_would():
    sources = {("layer", "weight"): (3, 2, 2, 2)}
    layout = match_layout(sources, {("layer", "kernel"): (2, 2, 2, 3)})
    flax_side = optstate.OptimizerState(
        "adafactor",
        ({"lr": 1e-2},),
        (optstate.ParamInfo(("layer", "kernel"), (2, 2, 2, 3), "float64", 0, 1),),
        {
            ("row_variance", ("layer", "kernel")): np.ones((2, 2, 2, 1)),
            ("column_variance", ("layer", "kernel")): np.ones((2, 2, 1, 3)),
        },
    )
    with pytest.raises(optstate.UnsupportedError, match="factored"):
        from optstate.converters.layout.moves import revert_layout

        revert_layout(flax_side, layout)


def test_a_moved_array_copied_is_a_copy():
    from optstate.schema.state import Deferred

    source = np.arange(4.0)
    moved = Deferred((4,), source.dtype, lambda: source)  # a move that keeps the source's memory
    copied = np.array(moved, copy=True)  # what numpy_to_tensor does before torch writes into it
    copied[0] = 7.0
    assert source[0] == 0.0
