"""optstate's own JSON documents refuse a repeated key (plain json.loads keeps the last one silently): the
safetensors header, the optstate metadata in it, a sharded index, the Orbax directory's optstate.json.
Each test writes a real file with optstate, then edits its bytes to repeat one key."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from optstate.errors import FormatError
from optstate.schema import OptimizerState, ParamInfo, load, save


@pytest.fixture
def state() -> OptimizerState:
    params = (ParamInfo(("w1",), (2,), "float32", 0), ParamInfo(("w2",), (2,), "float32", 0))
    slots = {("momentum", ("w1",)): np.ones(2, np.float32), ("momentum", ("w2",)): np.full(2, 2, np.float32)}
    return OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), params, slots)


def edit_header(path: Path, edit: Callable[[str], str]) -> None:
    """Rewrite a safetensors file's JSON header through ``edit``, fixing the length prefix; data stays as is."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8 : 8 + n].decode(), blob[8 + n :]
    edited = edit(header)
    assert edited != header
    path.write_bytes(struct.pack("<Q", len(edited.encode())) + edited.encode() + data)


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def test_strict_json_loads_refuses_nested_repeats():
    from optstate.schema.fileformat import strict_json_loads

    assert strict_json_loads('{"a": [{"b": 1}, {"b": 2}]}', "f") == {"a": [{"b": 1}, {"b": 2}]}
    with pytest.raises(FormatError, match=r"^f: key 'b' appears twice"):
        strict_json_loads('{"a": [{"b": 1, "b": 2}]}', "f")


def test_tensor_name_twice_in_the_header(state, tmp_path):
    path = save(state, tmp_path / "s.safetensors")
    edit_header(path, lambda h: h.replace('"momentum/w2":', '"momentum/w1":'))
    with pytest.raises(FormatError, match=re.escape(f"{path}: header: key 'momentum/w1' appears twice")):
        load(path)


def test_key_twice_in_the_optstate_metadata(state, tmp_path):
    path = save(state, tmp_path / "s.safetensors")
    repeated = r"\"optimizer\": \"sgd\", \"optimizer\": \"adam\""
    edit_header(path, lambda h: h.replace(r"\"optimizer\": \"sgd\"", repeated))
    with pytest.raises(FormatError, match=re.escape(f"{path}: optstate metadata: key 'optimizer' appears twice")):
        load(path)


def test_weight_map_entry_twice_in_a_sharded_index(state, tmp_path):
    index = save(state, tmp_path / "s.safetensors", max_shard_bytes=8)
    assert index.name == "s.safetensors.index.json"
    edit_text(index, '"momentum/w2": "s-00002', '"momentum/w1": "s-00002')
    with pytest.raises(FormatError, match=re.escape(f"{index}: key 'momentum/w1' appears twice")):
        load(index)


def test_key_twice_in_the_orbax_sidecar(state, tmp_path):
    orbax = pytest.importorskip("optstate.converters.jax.orbax")
    out = tmp_path / "out"
    orbax.save_optax_dir(state, out)
    sidecar = out / orbax.SIDECAR
    edit_text(sidecar, '"optimizer": "sgd"', '"optimizer": "sgd", "optimizer": "adam"')
    with pytest.raises(FormatError, match=re.escape(f"{sidecar}: key 'optimizer' appears twice")):
        orbax.read_optax_dir(out)
