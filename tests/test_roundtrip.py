"""Round trips are bit-exact: torch -> canonical -> torch, torch -> Optax -> torch, and the canonical file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings

import optstate
from optstate.schema.fileformat import METADATA_KEY, state_metadata, tensor_key

from frameworks import TinyNet, torch_train
from helpers import states


def _trained(make, steps=3):
    model = TinyNet()
    opt = make(model)
    torch_train(model, opt, range(steps))
    return model, opt


def _assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        assert entry.keys() == b["state"][index].keys()
        for key, tensor in entry.items():
            other = b["state"][index][key]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (index, key)


MAKERS = {
    "adamw-groups": lambda m: torch.optim.AdamW(
        [
            {"params": [("fc1.weight", m.fc1.weight), ("fc2.weight", m.fc2.weight)], "weight_decay": 0.1},
            {"params": [("fc1.bias", m.fc1.bias), ("fc2.bias", m.fc2.bias)], "weight_decay": 0.0},
        ],
        lr=0.01,
    ),
    "sgd-momentum": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.named_parameters(), lr=0.1),
}


@pytest.mark.parametrize("case", sorted(MAKERS))
@pytest.mark.parametrize("via", ["optstate", "optax"])
def test_torch_round_trip_is_bit_exact(case, via, tmp_path):
    model, opt = _trained(MAKERS[case])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    middle = tmp_path / ("s.safetensors" if via == "optstate" else "s")
    optstate.convert(tmp_path / "a.pt", middle, src_format="torch", dst_format=via)
    optstate.convert(middle, tmp_path / "b.pt", src_format=via, dst_format="torch")
    before = torch.load(tmp_path / "a.pt", weights_only=True)
    after = torch.load(tmp_path / "b.pt", weights_only=True)
    _assert_state_dicts_equal(before["optimizer"], after["optimizer"])
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_bfloat16_state_survives_the_canonical_file(tmp_path):
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    state = optstate.from_torch(opt)
    optstate.save(state, tmp_path / "s.safetensors")
    back = optstate.to_torch_state_dict(optstate.load(tmp_path / "s.safetensors"))
    for index, entry in opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert back["state"][index][key].dtype == torch.bfloat16
            assert torch.equal(back["state"][index][key].view(torch.int16), entry[key].view(torch.int16))


# ----------------------------------------------------------------------------- the canonical file (property-based)


@settings(max_examples=60, deadline=None)
@given(state=states())
def test_canonical_file_round_trip_is_bit_exact(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("p") / "s.safetensors"
    optstate.save(state, path)
    back = optstate.load(path)
    assert back.optimizer == state.optimizer and back.params == state.params
    assert back.param_groups == state.param_groups
    assert back.slots.keys() == state.slots.keys()
    for key, array in state.slots.items():
        assert back.slots[key].dtype == array.dtype
        assert back.slots[key].tobytes() == array.tobytes()


def test_official_safetensors_reads_our_file(tmp_path):
    model, opt = _trained(MAKERS["adamw-groups"])
    state = optstate.from_torch({"model": model.state_dict(), "optimizer": opt.state_dict()})
    optstate.save(state, tmp_path / "s.safetensors")
    tensors = safetensors.numpy.load_file(tmp_path / "s.safetensors")
    for (slot, path), array in state.slots.items():
        np.testing.assert_array_equal(tensors[tensor_key(slot, path)], array)
    with open(tmp_path / "s.safetensors", "rb") as f:
        from safetensors import safe_open
    with safe_open(tmp_path / "s.safetensors", framework="numpy") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["optimizer"] == "adamw"


def test_we_read_a_file_the_official_writer_wrote(tmp_path):
    _model, opt = _trained(MAKERS["adam"])
    state = optstate.from_torch(opt)
    tensors = {tensor_key(slot, path): np.ascontiguousarray(a) for (slot, path), a in state.slots.items()}
    safetensors.numpy.save_file(
        tensors, tmp_path / "s.safetensors", metadata={METADATA_KEY: json.dumps(state_metadata(state))}
    )
    back = optstate.load(tmp_path / "s.safetensors")
    assert back.params == state.params
    for key, array in state.slots.items():
        assert back.slots[key].tobytes() == np.ascontiguousarray(array).tobytes()
