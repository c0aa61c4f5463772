"""Flax's numbered module names (``Dense_0``, ``Block_0/Dense_1``, ``layers_0``) against a torch model's (``fc1``):
paired by order of definition and shape where that is unambiguous, refused with every problem where not.

A linen model trained with optax.adamw in float64 is saved as an Orbax checkpoint of ``{"params", "opt_state"}``,
converted on the command line to the torch model's names and layout (``--target-params module:function``),
loaded with ``load_state_dict`` into the torch model and its optimizer, and continued there; the continued run
must agree with continuing in JAX to 1e-12.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import warnings

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

import optstate
from optstate.cli import main
from optstate.converters.layout.targets import plan, relayout

jax.config.update("jax_enable_x64", True)
# Each checkpoint here is converted against a torch model, which fixes the order: the warning is moot.
pytestmark = pytest.mark.filterwarnings("ignore:parameter order is inferred")

TOL = 1e-12
HP = {"lr": 1e-2, "weight_decay": 0.05, "eps": 1e-6}
READING = ("--optimizer", "adamw", "--hparams", json.dumps(HP))
D = torch.float64


# ----------------------------------------------------------------------------- the models, each side's way


class FlaxMLP(fnn.Module):
    """Dense_0 [8, 32], Dense_1 [32, 4]: linen numbers them in the order they are made."""

    @fnn.compact
    def __call__(self, x):
        h = jnp.tanh(fnn.Dense(32)(x))
        return fnn.Dense(4)(h)


class FlaxSetupList(fnn.Module):
    """layers_0, layers_1: a list in ``setup``."""

    def setup(self):
        self.layers = [fnn.Dense(32), fnn.Dense(4)]

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


class Block(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = jnp.tanh(fnn.Dense(6)(x))  # made first, so Dense_0 (``Dense(8)(Dense(6)(x))`` makes Dense(8) first)
        return x + fnn.Dense(8)(h)


class FlaxDeep(fnn.Module):
    """Dense_0, Block_0 (Dense_0, Dense_1), LayerNorm_0, Block_1, Dense_1: two numbered families interleaved."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.Dense(8)(x)
        x = Block()(x)
        x = fnn.LayerNorm(epsilon=1e-6, use_fast_variance=False)(x)
        x = Block()(x)
        return fnn.Dense(4)(x)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 32, dtype=D)
        self.fc2 = torch.nn.Linear(32, 4, dtype=D)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 6, dtype=D)
        self.fc2 = torch.nn.Linear(6, 8, dtype=D)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class TorchDeep(torch.nn.Module):
    """Defined in another order than the Flax model calls its modules (the blocks together, the norm after):
    each numbered family keeps its own order, which is all the pairing needs."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8, dtype=D)
        self.blocks = torch.nn.ModuleList([TorchBlock(), TorchBlock()])
        self.norm = torch.nn.LayerNorm(8, eps=1e-6, dtype=D)
        self.out = torch.nn.Linear(8, 4, dtype=D)

    def forward(self, x):
        return self.out(self.blocks[1](self.norm(self.blocks[0](self.inp(x)))))


def torch_mlp():
    return TorchMLP()


def torch_deep():
    return TorchDeep()


def _linear(prefix):
    """The torch names of a Linear and the Flax leaves they are: (torch name, Flax path, transposed)."""
    t, f = prefix
    return [(f"{t}.weight", (*f, "kernel"), True), (f"{t}.bias", (*f, "bias"), False)]


# The expected correspondence, written out by hand (independent of the code under test).
CASES = {
    "mlp": (FlaxMLP, torch_mlp, [*_linear(("fc1", ("Dense_0",))), *_linear(("fc2", ("Dense_1",)))]),
    "setup_list": (FlaxSetupList, torch_mlp, [*_linear(("fc1", ("layers_0",))), *_linear(("fc2", ("layers_1",)))]),
    "deep": (
        FlaxDeep,
        torch_deep,
        [
            *_linear(("inp", ("Dense_0",))),
            *[
                pair
                for b in (0, 1)
                for pair in [
                    *_linear((f"blocks.{b}.fc1", (f"Block_{b}", "Dense_0"))),
                    *_linear((f"blocks.{b}.fc2", (f"Block_{b}", "Dense_1"))),
                ]
            ],
            ("norm.weight", ("LayerNorm_0", "scale"), False),
            ("norm.bias", ("LayerNorm_0", "bias"), False),
            *_linear(("out", ("Dense_1",))),
        ],
    ),
}


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _batches(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((5, 8)) for _ in range(n)]


def _stepper(model, tx):
    @jax.jit  # one compilation, not one per operation: the tests stay fast
    def step(params, opt_state, x):
        grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _jax_steps(step, params, opt_state, batches):
    for x in batches:
        params, opt_state = step(params, opt_state, jnp.asarray(x))
    return params, opt_state


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def _init64(model, inputs):
    """linen makes float32 parameters whatever the input's dtype; the runs here are float64 throughout."""
    return jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), jnp.ones((1, inputs))))


def _trained(flax_model, tmp_path):
    """A linen model trained 3 AdamW steps in float64, saved by Orbax as {params, opt_state}."""
    model = flax_model()
    params = _init64(model, 8)["params"]
    tx = optax.adamw(HP["lr"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    step = _stepper(model, tx)
    params, opt_state = _jax_steps(step, params, tx.init(params), _batches(3, seed=1))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "jax").absolute(), {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()
    return step, params, opt_state


# ----------------------------------------------------------------------------- JAX -> torch, continued in torch


@pytest.mark.parametrize("case", list(CASES))
def test_numbered_flax_modules_continue_in_torch(tmp_path, case):
    flax_model, torch_model, expected = CASES[case]
    step, params, opt_state = _trained(flax_model, tmp_path)
    code, out = run(
        "convert", "--to", "torch", str(tmp_path / "jax"), str(tmp_path / "out.pt"), *READING,
        "--target-params", f"test_layout_autonames:{torch_model.__name__}",
    )  # fmt: skip
    assert code == 0, out
    # Block_0 and Block_1 have the same shapes: only linen's order of construction says which is which.
    assert ("optstate: warning: Block_0 and Block_1 have the same shapes" in out) == (case == "deep"), out
    assert out.count("have the same shapes") == (case == "deep"), out
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    net = torch_model()
    net.load_state_dict(ckpt["model"])  # strict: every name the torch model's
    for name, path, transposed in expected:
        weight = _leaf(params, path)
        np.testing.assert_array_equal(ckpt["model"][name].numpy(), weight.T if transposed else weight, err_msg=name)
    opt = torch.optim.AdamW(net.parameters(), **HP)
    opt.load_state_dict(ckpt["optimizer"])

    batches = _batches(3, seed=2)
    params, _ = _jax_steps(step, params, opt_state, batches)
    for x in batches:
        opt.zero_grad()
        net(torch.from_numpy(x)).square().mean().backward()
        opt.step()
    torch_params = dict(net.named_parameters())
    for name, path, transposed in expected:
        ours = torch_params[name].detach().numpy()
        np.testing.assert_allclose(ours.T if transposed else ours, _leaf(params, path), rtol=0, atol=TOL, err_msg=name)


def test_map_shows_the_pairing_and_its_file_converts_the_same(tmp_path):
    _trained(FlaxMLP, tmp_path)
    target = "test_layout_autonames:torch_mlp"
    code, out = run("map", str(tmp_path / "jax"), *READING, "--target-params", target, "-o", str(tmp_path / "m.json"))
    assert code == 0, out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "fc1.weight [32, 8] -> Dense_0/kernel [8, 32] transpose (1, 0)" in lines, out
    assert "fc1.bias [32] -> Dense_0/bias [32] as is" in lines, out
    assert "fc2.weight [4, 32] -> Dense_1/kernel [32, 4] transpose (1, 0)" in lines, out
    mapping = json.loads((tmp_path / "m.json").read_text())
    assert [(m["source"], m["target"]) for m in mapping["moves"]] == [
        (["fc1", "weight"], ["Dense_0", "kernel"]),
        (["fc1", "bias"], ["Dense_0", "bias"]),
        (["fc2", "weight"], ["Dense_1", "kernel"]),
        (["fc2", "bias"], ["Dense_1", "bias"]),
    ]
    for how, extra in (("named", ("--target-params", target)), ("mapped", ("--mapping", str(tmp_path / "m.json")))):
        code, out = run(
            "convert", "--to", "torch", str(tmp_path / "jax"), str(tmp_path / f"{how}.pt"), *READING, *extra
        )
        assert code == 0, out
    named, mapped = (torch.load(tmp_path / f"{how}.pt", weights_only=True) for how in ("named", "mapped"))
    assert named["model"].keys() == mapped["model"].keys() == TorchMLP().state_dict().keys()
    for key, tensor in named["model"].items():
        assert torch.equal(tensor, mapped["model"][key]), key
    for index, slots in named["optimizer"]["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, mapped["optimizer"]["state"][index][key]), (index, key)


# ----------------------------------------------------------------------------- what is refused, and what is not


class FlaxTwoKinds(fnn.Module):
    """Dense_0 and DenseGeneral_0 of one shape: nothing says which of fc1, fc2 each is."""

    @fnn.compact
    def __call__(self, x):
        h = jnp.tanh(fnn.Dense(8)(x))
        return fnn.DenseGeneral(8)(h)


class FlaxNamedAndNumbered(fnn.Module):
    """``fc1`` by name, the other one numbered (Dense_0)."""

    @fnn.compact
    def __call__(self, x):
        h = jnp.tanh(fnn.Dense(8, name="fc1")(x))
        return fnn.Dense(8)(h)


def _torch_linears(*sizes):
    """A torch model of Linears fc1, fc2, ... between ``sizes``."""
    net = torch.nn.Module()
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        net.add_module(f"fc{i + 1}", torch.nn.Linear(a, b, dtype=D))
    return net


def _flax_state(flax_model):
    """The canonical state of a real Optax AdamW state of ``flax_model`` (only the names and shapes matter here)."""
    params = _init64(flax_model(), 8)["params"]
    tx = optax.adamw(HP["lr"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    return optstate.from_optax(tx.init(params), params, optimizer="adamw", hyperparams=HP, order_warning=False)


@pytest.mark.parametrize(
    ("flax_model", "sizes", "why"),
    [
        (FlaxTwoKinds, (8, 8, 8), r"more than one order fits \(fc1 -> Dense_0, fc2 -> DenseGeneral_0; or "),
        (FlaxMLP, (8, 32, 4, 4), r"3 against 2, so no order pairs them"),
        (FlaxMLP, (8, 32, 5), r"in order of definition, the tensors of fc2 -> Dense_1 do not fit"),
    ],
    ids=["ambiguous", "counts_differ", "shapes_differ"],
)
def test_refused_with_every_problem(flax_model, sizes, why):
    state = _flax_state(flax_model)
    net = _torch_linears(*sizes)
    with pytest.raises(optstate.MappingError) as caught:
        relayout(state, target=net)
    message = str(caught.value)
    assert re.search(why, message), message
    for name, tensor in net.state_dict().items():  # every torch tensor is named ...
        assert f"{name} {list(tensor.shape)}: no target leaf" in message, name
    for info in state.params:  # ... and every Flax leaf
        assert f"{'/'.join(info.path)} {list(info.shape)}: no torch tensor" in message, info.path
    layout, problems = plan(state, net)
    assert not layout.moves and len(problems) == 1 + len(net.state_dict()) + len(state.params)


def test_a_refused_conversion_writes_nothing(tmp_path):
    _trained(FlaxMLP, tmp_path)
    code, out = run(
        "convert", "--to", "torch", str(tmp_path / "jax"), str(tmp_path / "out.pt"), *READING,
        "--target-params", "test_layout_autonames:torch_mlp_wrong",
    )  # fmt: skip
    assert code == 1 and not (tmp_path / "out.pt").exists()
    assert "fc2 -> Dense_1 do not fit" in out and "Dense_1/kernel [32, 4]: no torch tensor" in out, out


def torch_mlp_wrong():
    return _torch_linears(8, 32, 5)


def torch_square():
    return _torch_linears(8, 8, 8)


def test_an_ambiguous_pairing_is_settled_in_the_mapping_file(tmp_path):
    _step, params, opt_state = _trained(FlaxTwoKinds, tmp_path)
    mapping_file = tmp_path / "m.json"
    code, out = run(
        "map", str(tmp_path / "jax"), *READING, "--target-params", "test_layout_autonames:torch_square",
        "-o", str(mapping_file),
    )  # fmt: skip
    assert code == 1 and "more than one order fits" in out and "incomplete" in out, out
    mapping = json.loads(mapping_file.read_text())
    assert mapping["moves"] == []
    for torch_name, flax_name in (("fc1", "Dense_0"), ("fc2", "DenseGeneral_0")):  # what the user knows
        mapping["moves"] += [
            {"source": [torch_name, "weight"], "target": [flax_name, "kernel"], "source_shape": [8, 8],
             "shape": [8, 8], "axes": [1, 0]},
            {"source": [torch_name, "bias"], "target": [flax_name, "bias"], "source_shape": [8], "shape": [8]},
        ]  # fmt: skip
    mapping_file.write_text(json.dumps(mapping))
    code, out = run(
        "convert", "--to", "torch", str(tmp_path / "jax"), str(tmp_path / "out.pt"), *READING,
        "--mapping", str(mapping_file),
    )  # fmt: skip
    assert code == 0, out
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    torch_square().load_state_dict(ckpt["model"])
    mu = jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))[0].mu
    for i, (torch_name, flax_name) in enumerate((("fc1", "Dense_0"), ("fc2", "DenseGeneral_0"))):
        kernel = _leaf(params, (flax_name, "kernel"))
        np.testing.assert_array_equal(ckpt["model"][f"{torch_name}.weight"].numpy(), kernel.T)
        exp_avg = ckpt["optimizer"]["state"][2 * i]["exp_avg"].numpy()
        np.testing.assert_array_equal(exp_avg, _leaf(mu, (flax_name, "kernel")).T)


def test_names_match_first_and_the_numbered_rest_by_order():
    state = _flax_state(FlaxNamedAndNumbered)
    layout, problems = plan(state, _torch_linears(8, 8, 8))
    assert problems == []
    assert {(".".join(m.source), "/".join(m.target)) for m in layout.moves} == {
        ("fc1.weight", "fc1/kernel"),
        ("fc1.bias", "fc1/bias"),
        ("fc2.weight", "Dense_0/kernel"),
        ("fc2.bias", "Dense_0/bias"),
    }


class FlaxFlatTransformer(fnn.Module):
    """Every layer numbered in one place (LayerNorm_0..3, MultiHeadDotProductAttention_0..1, Dense_0..2)."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.Embed(10, 8)(x)
        for _ in range(2):
            h = fnn.LayerNorm()(x)
            x = x + fnn.MultiHeadDotProductAttention(num_heads=2)(h, h)
            x = x + fnn.Dense(8)(fnn.LayerNorm()(x))
        return fnn.Dense(10)(x)


class TorchBlockedTransformer(torch.nn.Module):
    """The same layers grouped in blocks, which hold no tensor of their own."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8, dtype=D)
        self.blocks = torch.nn.ModuleList()
        for _ in range(2):
            block = torch.nn.Module()
            block.ln1 = torch.nn.LayerNorm(8, dtype=D)
            block.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=D)
            block.ln2 = torch.nn.LayerNorm(8, dtype=D)
            block.mlp = torch.nn.Linear(8, 8, dtype=D)
            self.blocks.append(block)
        self.head = torch.nn.Linear(8, 10, dtype=D)


def test_blocks_holding_no_tensor_are_looked_into():
    params = jax.tree.map(
        lambda a: a.astype(jnp.float64),
        FlaxFlatTransformer().init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"],
    )
    tx = optax.adamw(HP["lr"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    state = optstate.from_optax(tx.init(params), params, optimizer="adamw", hyperparams=HP, order_warning=False)
    net = TorchBlockedTransformer()
    with pytest.warns(UserWarning) as caught:
        layout, problems = plan(state, net)
    assert sorted(str(w.message).split(" have the same shapes")[0] for w in caught) == [
        "Dense_0 and Dense_1",  # Dense_2 (the head) is [8, 10]
        "LayerNorm_0, LayerNorm_1, LayerNorm_2 and LayerNorm_3",
        "MultiHeadDotProductAttention_0 and MultiHeadDotProductAttention_1",
    ]
    assert problems == []
    moves = {(".".join(m.source), "/".join(m.target)): m.describe for m in layout.moves}
    for b in (0, 1):
        assert moves[(f"blocks.{b}.ln1.weight", f"LayerNorm_{2 * b}/scale")] == "as is"
        assert moves[(f"blocks.{b}.ln2.weight", f"LayerNorm_{2 * b + 1}/scale")] == "as is"
        assert (f"blocks.{b}.attn.in_proj_weight", f"MultiHeadDotProductAttention_{b}/key/kernel") in moves
        assert (f"blocks.{b}.attn.out_proj.weight", f"MultiHeadDotProductAttention_{b}/out/kernel") in moves
        assert moves[(f"blocks.{b}.mlp.weight", f"Dense_{b}/kernel")] == "transpose (1, 0)"
    assert moves[("head.weight", "Dense_2/kernel")] == "transpose (1, 0)"
    assert moves[("emb.weight", "Embed_0/embedding")] == "as is"
    with pytest.warns(UserWarning) as converting:
        back = relayout(state, target=net)
    assert [str(w.message) for w in converting] == [str(w.message) for w in caught]  # convert warns as map does
    assert [".".join(p.path) for p in back.params] == list(net.state_dict())
    net.load_state_dict({".".join(p): torch.from_numpy(np.array(a)) for p, a in back.weights.items()})
    np.testing.assert_array_equal(
        net.state_dict()["blocks.1.mlp.weight"].numpy(), np.asarray(params["Dense_1"]["kernel"]).T
    )


class FlaxTwoBlocks(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        return Block()(Block()(x))


def test_flax_blocks_holding_no_leaf_are_looked_into():
    """The other way round: Block_0/Dense_0, Block_0/Dense_1, Block_1/... against a torch Sequential of Linears."""
    state = _flax_state(FlaxTwoBlocks)
    net = torch.nn.Sequential(*(torch.nn.Linear(a, b, dtype=D) for a, b in ((8, 6), (6, 8), (8, 6), (6, 8))))
    with pytest.warns(UserWarning) as caught:
        layout, problems = plan(state, net)
    assert [str(w.message).split(" by order")[0] for w in caught] == [
        "Block_0/Dense_0 and Block_1/Dense_0 have the same shapes: paired with 0, 2",
        "Block_0/Dense_1 and Block_1/Dense_1 have the same shapes: paired with 1, 3",
    ]
    assert problems == []
    assert [(".".join(m.source), "/".join(m.target)) for m in layout.moves if m.source[-1] == "weight"] == [
        ("0.weight", "Block_0/Dense_0/kernel"),
        ("1.weight", "Block_0/Dense_1/kernel"),
        ("2.weight", "Block_1/Dense_0/kernel"),
        ("3.weight", "Block_1/Dense_1/kernel"),
    ]


# ----------------------------------------------------------------------------- same shapes: paired by order, named


class FlaxInsideOut(fnn.Module):
    """Two Dense(8) written inside out: Python evaluates the outer ``fnn.Dense(8)`` before its argument, so linen
    constructs it first and names it Dense_0, though it is applied last."""

    @fnn.compact
    def __call__(self, x):
        return fnn.Dense(8)(jnp.tanh(fnn.Dense(8)(x)))


SAME_SHAPES = (
    "Dense_0 and Dense_1 have the same shapes: paired with fc1, fc2 by order of definition; "
    "check that linen constructed them in that order (optstate map)"
)


def test_same_shapes_paired_by_order_are_named_on_convert():
    """The shapes cannot tell Dense_0 from Dense_1: the conversion pairs them by order and warns. Here the order
    is in fact wrong (Dense_0 is the outer layer), which is why the warning is needed."""
    params = _init64(FlaxInsideOut(), 8)["params"]
    state = _flax_state(FlaxInsideOut)
    net = _torch_linears(8, 8, 8)
    with pytest.warns(UserWarning) as caught:
        back = relayout(state, target=net)
    assert [str(w.message) for w in caught if "same shapes" in str(w.message)] == [SAME_SHAPES]
    net.load_state_dict({".".join(p): torch.from_numpy(np.array(a)) for p, a in back.weights.items()})
    np.testing.assert_array_equal(net.fc1.weight.detach().numpy(), np.asarray(params["Dense_0"]["kernel"]).T)
    x = _batches(1, seed=4)[0]
    with torch.no_grad():
        ours = net.fc2(torch.tanh(net.fc1(torch.from_numpy(x)))).numpy()
    assert not np.allclose(ours, FlaxInsideOut().apply({"params": params}, x))  # swapped: the warning was due


def test_different_shapes_paired_by_order_warn_nothing():
    state = _flax_state(FlaxMLP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relayout(state, target=_torch_linears(8, 32, 4))
    assert not [w for w in caught if "same shapes" in str(w.message)]


def test_map_prints_the_same_shapes_note(tmp_path):
    _trained(FlaxInsideOut, tmp_path)
    code, out = run("map", str(tmp_path / "jax"), *READING, "--target-params", "test_layout_autonames:torch_square")
    assert code == 0, out
    assert f"optstate: warning: {SAME_SHAPES}" in out.splitlines(), out
    assert "fc1.weight [8, 8] -> Dense_0/kernel [8, 8] transpose (1, 0)" in [
        " ".join(x.split()) for x in out.splitlines()
    ]


# ----------------------------------------------------------------------------- torch -> numbered Flax modules


def flax_mlp_variables():
    return _init64(FlaxMLP(), 8)


def test_torch_names_onto_numbered_flax_modules(tmp_path):
    torch.manual_seed(0)
    net = TorchMLP()
    opt = torch.optim.AdamW(net.parameters(), **HP)
    for x in _batches(2, seed=3):
        opt.zero_grad()
        net(torch.from_numpy(x)).square().mean().backward()
        opt.step()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    code, out = run(
        "convert", "--to", "optax", str(tmp_path / "ckpt.pt"), str(tmp_path / "flax"),
        "--target-params", "test_layout_autonames:flax_mlp_variables",
    )  # fmt: skip
    assert code == 0, out
    params, opt_state, _tx = optstate.load_optax(tmp_path / "flax")
    adam = opt.state_dict()["state"]
    for i, (name, path, transposed) in enumerate(CASES["mlp"][2]):
        tensor = net.state_dict()[name].numpy()
        np.testing.assert_array_equal(_leaf(params, path), tensor.T if transposed else tensor, err_msg=name)
        mu = adam[i]["exp_avg"].numpy()
        np.testing.assert_array_equal(
            _leaf(jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))[0].mu, path),
            mu.T if transposed else mu,
            err_msg=name,
        )


def test_verify_follows_the_pairing_the_conversion_made(tmp_path):
    _trained(FlaxMLP, tmp_path)
    src, out_pt, target = str(tmp_path / "jax"), str(tmp_path / "out.pt"), "test_layout_autonames:torch_mlp"
    code, out = run("convert", "--to", "torch", src, out_pt, *READING, "--target-params", target, "--verify")
    assert code == 0 and "agrees: 4 parameter(s) of AdamW" in out, out
    code, out = run("map", src, *READING, "--target-params", target, "-o", str(tmp_path / "m.json"))
    assert code == 0, out
    code, out = run("verify", src, out_pt, *READING, "--mapping", str(tmp_path / "m.json"), "--quiet")
    assert code == 0 and "agrees" in out, out
    # Without the pairing the two name different parameters: refused, not compared.
    code, out = run("verify", src, out_pt, *READING, "--quiet")
    assert code == 1 and "Dense_0" in out, out
