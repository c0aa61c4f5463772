"""The layout move from the command line: convert --target-params, map, --mapping, and the way back."""

from __future__ import annotations

import contextlib
import io
import json

import flax.linen as fnn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

import optstate
from optstate.cli import main


class TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class FlaxConvNet(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.BatchNorm(use_running_average=False, name="bn")(fnn.Conv(4, (3, 3), padding="VALID", name="conv")(x))
        return fnn.Dense(4, name="head")(h.mean((1, 2)))


def flax_variables():
    return FlaxConvNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TorchConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


def _targets(tmp_path):
    variables = jax.tree.map(np.asarray, flax_variables())
    msgpack = tmp_path / "target.msgpack"
    msgpack.write_bytes(flax.serialization.to_bytes(variables))
    orbax_dir = tmp_path / "target-orbax"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(orbax_dir.absolute(), variables)
    checkpointer.wait_until_finished()
    return {"msgpack": str(msgpack), "orbax": str(orbax_dir), "function": "test_layout_cli:flax_variables"}


@pytest.mark.parametrize("kind", ["msgpack", "orbax", "function"])
def test_convert_to_flax_layout_and_back_is_bit_exact(tmp_path, checkpoint, kind, monkeypatch):
    target = _targets(tmp_path)[kind]
    code, out = run(
        "convert", "--from", "torch", "--to", "optax", str(checkpoint), str(tmp_path / "out"), "--target-params", target
    )
    assert code == 0, out
    jax.config.update("jax_enable_x64", True)
    variables, _opt_state, _tx = optstate.load_flax(tmp_path / "out")
    original = torch.load(checkpoint, weights_only=True)
    np.testing.assert_array_equal(
        variables["params"]["conv"]["kernel"], original["model"]["conv.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], original["model"]["bn.running_var"].numpy())
    assert set(variables["params"]) == {"conv", "bn", "head"}  # statistics are not parameters
    code, out = run("convert", "--from", "optax", "--to", "torch", str(tmp_path / "out"), str(tmp_path / "back.pt"))
    assert code == 0, out
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for name, tensor in original["model"].items():
        assert torch.equal(back["model"][name], tensor), name
    names = back["optimizer"]["param_groups"][0]["param_names"]
    registered = [n for n in original["model"] if "running" not in n and "num_batches" not in n]
    for i, name in enumerate(registered):
        j = names.index(name)
        assert torch.equal(
            back["optimizer"]["state"][j]["momentum_buffer"], original["optimizer"]["state"][i]["momentum_buffer"]
        ), name


def test_flax_layout_goes_back_to_torch_layout_in_dcp(tmp_path, checkpoint):
    """DCP is a torch format: a state in a Flax layout is moved back on the way there, as for .pt."""
    target = _targets(tmp_path)["msgpack"]
    code, out = run("convert", str(checkpoint), str(tmp_path / "flax.safetensors"), "--target-params", target)
    assert code == 0, out
    code, out = run("convert", "--to", "dcp", str(tmp_path / "flax.safetensors"), str(tmp_path / "dcp"))
    assert code == 0, out
    back = optstate.api.read(tmp_path / "dcp")
    original = optstate.api.read(checkpoint)
    assert back.weights.keys() == original.weights.keys() and back.slots.keys() == original.slots.keys()
    for key, array in [*original.weights.items(), *original.slots.items()]:
        np.testing.assert_array_equal(back.weights[key] if key in back.weights else back.slots[key], array)


def test_map_prints_saves_and_reads_an_edited_mapping(tmp_path, checkpoint):
    target = _targets(tmp_path)["msgpack"]
    code, out = run("map", str(checkpoint), "--target-params", target, "-o", str(tmp_path / "map.json"))
    assert code == 0, out
    assert "conv.weight" in out and "transpose (2, 3, 1, 0)" in out and "bn.num_batches_tracked" in out
    mapping = json.loads((tmp_path / "map.json").read_text())
    # An edit: the head's kernel read as is instead of transposed is the silent error a reshape makes; square
    # layers pass shape checks, so the file is taken at its word, and the move is visible in the output.
    for move in mapping["moves"]:
        if move["source"] == ["head", "weight"]:
            move["axes"] = []
    (tmp_path / "edited.json").write_text(json.dumps(mapping))
    code, out = run(
        "convert", "--to", "optax", str(checkpoint), str(tmp_path / "out"), "--mapping", str(tmp_path / "edited.json")
    )
    assert code == 0, out
    jax.config.update("jax_enable_x64", True)
    params, _, _ = optstate.load_optax(tmp_path / "out")
    w = torch.load(checkpoint, weights_only=True)["model"]["head.weight"].numpy()
    np.testing.assert_array_equal(params["head"]["kernel"], w)


def test_map_refuses_a_model_that_does_not_fit_and_lists_the_names(tmp_path, checkpoint):
    variables = jax.tree.map(np.asarray, flax_variables())
    variables["params"]["head"]["kernel"] = np.zeros((4, 5), np.float32)
    variables["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    (tmp_path / "bad.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    code, out = run(
        "map", str(checkpoint), "--target-params", str(tmp_path / "bad.msgpack"), "-o", str(tmp_path / "partial.json")
    )
    assert code == 1
    assert "head.weight [4, 4]: target head/kernel has shape [4, 5], expected [4, 4]" in out
    assert "extra/kernel [2, 2]: no torch tensor" in out
    assert "incomplete" in out and (tmp_path / "partial.json").exists()
    code, out = run(
        "convert",
        "--to",
        "optax",
        str(checkpoint),
        str(tmp_path / "out"),
        "--target-params",
        str(tmp_path / "bad.msgpack"),
    )
    assert code == 1 and not (tmp_path / "out").exists()
