"""``ptfile.save`` / ``save_torch_file`` write, without torch, what ``torch.save`` wrote before: the same objects,
bit for bit, loadable with ``torch.load(weights_only=True)`` (``mmap=True`` too), one tensor at a time."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import weakref
import zipfile
from collections import Counter, OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler
from torch.utils.serialization import config as serialization_config

import optstate
from optstate.converters.torch import ptfile
from optstate.converters.torch.live import numpy_to_tensor
from optstate.converters.torch.state_dict import from_torch_file, save_torch_file
from optstate.errors import FormatError, OptstateError, UnsupportedError
from optstate.schema import OptimizerState, ParamInfo, fileformat
from optstate.schema.state import Deferred, path_to_name

# ----------------------------------------------------------------------------- comparing what torch.load returns


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got, want, where="checkpoint", ordered=True):
    """Equal key by key (in the same order, if ``ordered``), type by type, tensors bit for bit with the same
    dtype, shape and strides."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert got.stride() == want.stride() or not want.numel(), where  # an empty tensor's strides mean nothing
        assert not got.requires_grad and torch.equal(_bits(got), _bits(want)), where
    elif isinstance(want, dict):
        assert list(got) == list(want) if ordered else sorted(got, key=str) == sorted(want, key=str), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]", ordered)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]", ordered)
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), where
    else:
        assert got == want, where


def load_both_ways(path):
    """``torch.load`` with and without ``mmap``, which must agree; the zip's CRCs must check."""
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    loaded = torch.load(path, weights_only=True)
    assert_same(torch.load(path, weights_only=True, mmap=True), loaded)
    return loaded


def old_save_checkpoint(state, path):
    """What ``save_checkpoint`` did before it streamed: ``torch.save`` of tensors made from the arrays."""
    ckpt = {"optimizer": optstate.to_torch_state_dict(state)}
    if state.weights is not None:
        ckpt["model"] = {path_to_name(p): numpy_to_tensor(a) for p, a in state.weights.items()}
    if state.metadata.lr_scheduler is not None:
        ckpt["lr_scheduler"] = dict(state.metadata.lr_scheduler)
    torch.save(ckpt, path)


# ----------------------------------------------------------------------------- real torch checkpoints


class Net(torch.nn.Module):
    def __init__(self, dtype, big=False, empty=True):
        super().__init__()
        torch.manual_seed(0)
        width = 512 if big else 4  # a 512 x 512 float32 weight is 1 MiB: its CRC is computed in a thread
        self.fc1 = torch.nn.Linear(3, width, dtype=dtype)
        self.norm = torch.nn.BatchNorm1d(width, dtype=dtype)  # num_batches_tracked: an int64 0-d buffer
        self.fc2 = torch.nn.Linear(width, width, dtype=dtype)
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=dtype))  # 0-d
        self.empty = torch.nn.Parameter(torch.zeros(0 if empty else 1, 3, dtype=dtype))

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) * self.scale + self.empty.sum()


def _two_groups(model, **kw):
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("weight")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], **kw)


CASES = {
    "sgd": (torch.float32, lambda m: torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9)),
    "adam-float64": (torch.float64, lambda m: torch.optim.Adam(m.named_parameters(), lr=0.01, amsgrad=True)),
    "adamw-two-groups": (torch.float32, lambda m: _two_groups(m, lr=0.01)),
    "nadam": (torch.float32, lambda m: torch.optim.NAdam(m.named_parameters(), lr=0.01)),
    "adafactor": (torch.float32, lambda m: torch.optim.Adafactor(m.named_parameters(), lr=0.01)),  # empty: 1/0
    "adam-bfloat16": (torch.bfloat16, lambda m: torch.optim.Adam(m.named_parameters(), lr=0.01)),
}


def torch_checkpoint(case, path, big=False):
    """Train a few steps with torch, ``torch.save`` a training checkpoint (MultiStepLR: a Counter) to ``path``."""
    dtype, make = CASES[case]
    model = Net(dtype, big, empty=case != "adafactor")
    opt = make(model)
    sched = lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3, dtype=dtype)).square().sum().backward()
        opt.step()
        sched.step()
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict(), "lr_scheduler": sched.state_dict()}, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_writes_what_torch_save_wrote_and_round_trips_bit_exact(case, tmp_path):
    original = torch_checkpoint(case, tmp_path / "a.pt")
    state = from_torch_file(tmp_path / "a.pt")
    save_torch_file(state, tmp_path / "new.pt")
    old_save_checkpoint(state, tmp_path / "old.pt")
    new = load_both_ways(tmp_path / "new.pt")
    assert_same(new, torch.load(tmp_path / "old.pt", weights_only=True))
    # and what torch itself saved comes back: every tensor, every group value, the weights
    assert_same(new["optimizer"]["state"], original["optimizer"]["state"], "state", ordered=False)  # NAdam's keys
    for got, want in zip(new["optimizer"]["param_groups"], original["optimizer"]["param_groups"], strict=True):
        assert_same({k: got[k] for k in want}, want, "param_groups")
    assert_same(new["model"], dict(original["model"]), "model")
    assert new["lr_scheduler"]["milestones"] == original["lr_scheduler"]["milestones"] == Counter({1: 1, 3: 1})
    assert_same(ptfile.load(tmp_path / "new.pt")["optimizer"]["param_groups"], new["optimizer"]["param_groups"])


def test_round_trip_through_the_canonical_file_is_bit_exact(tmp_path):
    original = torch_checkpoint("adamw-two-groups", tmp_path / "a.pt", big=True)
    fileformat.save(from_torch_file(tmp_path / "a.pt"), tmp_path / "s.safetensors")
    state = fileformat.load(tmp_path / "s.safetensors")  # memory-mapped
    save_torch_file(state, tmp_path / "b.pt", fsync=False)
    back = load_both_ways(tmp_path / "b.pt")
    assert_same(back["optimizer"]["state"], original["optimizer"]["state"], "state", ordered=False)
    assert_same(back["model"], dict(original["model"]), "model")


# ----------------------------------------------------------------------------- the pickle and the zip


def test_plain_values_load_as_torch_save_writes_them(tmp_path):
    values = {
        "none": None,
        "flags": [True, False],
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": (0.1, -0.0, math.inf, math.nan, 1e308),
        "text": "héllo ∂",
        "tuples": ((), (1,), (1, 2, 3, 4)),
        "counter": Counter({2: 1, 4: 3}),
        "ordered": OrderedDict(b=1, a=2),
        7: {"nested": [[]]},
    }
    ptfile.save(values, tmp_path / "ours.pt")
    torch.save(values, tmp_path / "torch.pt")
    assert_same(load_both_ways(tmp_path / "ours.pt"), torch.load(tmp_path / "torch.pt", weights_only=True))


def test_every_dtype_shape_and_layout_loads_as_torch_save_writes_it(tmp_path):
    values = np.array([0.0, -1.5, 2.25, 448.0])
    arrays = {
        np.dtype(d).name: values.astype(d)
        for d in (
            np.float64,
            np.float32,
            np.float16,
            ml_dtypes.bfloat16,
            ml_dtypes.float8_e4m3fn,
            ml_dtypes.float8_e5m2,
            np.int64,
            np.int32,
            np.int16,
            np.int8,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.bool_,
            np.complex64,
            np.complex128,
        )
    }
    arrays |= {
        "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
        "transposed": np.arange(6.0).reshape(2, 3).T,
        "zero_d": np.array(7, np.int64),
        "empty": np.zeros((2, 0, 3), np.float32),
        "strided": np.arange(10.0)[::3],
    }
    ptfile.save({"arrays": arrays}, tmp_path / "ours.pt")
    native = {k: a.astype(a.dtype.newbyteorder("="), copy=False) for k, a in arrays.items()}
    torch.save({"arrays": {k: numpy_to_tensor(a) for k, a in native.items()}}, tmp_path / "torch.pt")
    ours = load_both_ways(tmp_path / "ours.pt")
    assert_same(ours, torch.load(tmp_path / "torch.pt", weights_only=True))
    assert ours["arrays"]["empty"].stride() == torch.zeros(2, 0, 3).stride()
    back = ptfile.load(tmp_path / "ours.pt")["arrays"]
    assert all(
        np.array_equal(
            back[k].reshape(-1).view(np.uint8), a.astype(a.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        )
        for k, a in arrays.items()
    )


def test_storage_offsets_are_where_torch_computes_them(tmp_path, monkeypatch):
    # every length modulo the alignment, so that a header or descriptor a few bytes off shows
    arrays = {f"u{n}": np.arange(n, dtype=np.uint8) for n in range(70)}
    arrays |= {"b": np.arange(3, dtype=ml_dtypes.float8_e5m2), "c": np.ones((7, 3), np.int16)}
    ptfile.save(arrays, tmp_path / "t.pt")
    # torch.load asserts that each storage lies where torch's writer would have put it (the layout of its
    # local headers and data descriptors), and uses those offsets on the meta device
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    with serialization_config.patch({"load.calculate_storage_offsets": True}):
        assert_same(torch.load(tmp_path / "t.pt", weights_only=True, mmap=True), load_both_ways(tmp_path / "t.pt"))
    meta = torch.load(tmp_path / "t.pt", weights_only=True, map_location="meta")
    assert [t.untyped_storage()._checkpoint_offset % 64 for t in meta.values()] == [0] * len(arrays)


def test_zip64_records_load(tmp_path, monkeypatch):
    # Members and offsets past 4 GiB need zip64 fields; lower the threshold to write them into a small file.
    monkeypatch.setattr(ptfile, "_ZIP64_LIMIT", 100)
    arrays = {"small": np.arange(3.0), "large": np.arange(100.0), "empty": np.zeros(0), "last": np.arange(5)}
    ptfile.save(arrays, tmp_path / "t.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as zf:
        large = zf.getinfo("archive/data/1")
        assert large.extra[:2] == b"\x01\x00" and large.file_size == 800  # sizes and offset in a zip64 field
    loaded = load_both_ways(tmp_path / "t.pt")
    assert all(np.array_equal(loaded[k].numpy(), a) for k, a in arrays.items())
    assert all(np.array_equal(ptfile.load(tmp_path / "t.pt")[k], a) for k, a in arrays.items())


# ----------------------------------------------------------------------------- streaming


def _lazy_state(calls, refs, fail_at=None):
    """An Adam state whose slots are lazy; each checks, when made, that the one made before is gone."""

    def lazy(i, shape):
        def compute():
            if i == fail_at:
                raise RuntimeError("made to fail")
            assert all(ref() is None for ref in refs), f"array {len(refs) - 1} still alive when {i} is made"
            calls[i] = calls.get(i, 0) + 1
            array = np.full(shape, i, np.float32)
            refs.append(weakref.ref(array))
            return array

        return Deferred(shape, np.dtype(np.float32), compute)

    shapes = {("w",): (64, 32), ("b",): (32,)}
    params = tuple(ParamInfo(p, s, "float32", 0, 5) for p, s in shapes.items())
    slots = {
        (slot, p): lazy(2 * k + j, s)
        for k, (p, s) in enumerate(shapes.items())
        for j, slot in enumerate(("first_moment", "second_moment"))
    }
    return OptimizerState(
        "adam", ({"lr": 1e-3},), params, slots, weights={p: lazy(4 + k, s) for k, (p, s) in enumerate(shapes.items())}
    )


def test_lazy_arrays_are_made_once_each_and_released_before_the_next(tmp_path):
    calls, refs, sizes = {}, [], []
    save_torch_file(_lazy_state(calls, refs), tmp_path / "c.pt", progress=sizes.append)
    assert calls == dict.fromkeys(range(6), 1) and all(ref() is None for ref in refs)
    assert sizes == [4, 64 * 32 * 4, 64 * 32 * 4, 4, 32 * 4, 32 * 4, 64 * 32 * 4, 32 * 4]  # a step: 0-d float32
    loaded = load_both_ways(tmp_path / "c.pt")
    assert loaded["optimizer"]["state"][1]["exp_avg_sq"].eq(3).all() and loaded["model"]["b"].eq(5).all()


def test_an_error_mid_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="made to fail"):
        save_torch_file(_lazy_state({}, [], fail_at=3), tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_unless_forced(tmp_path):
    torch_checkpoint("sgd", tmp_path / "a.pt")
    state = from_torch_file(tmp_path / "a.pt")
    (tmp_path / "c.pt").write_bytes(b"keep")
    with pytest.raises(OptstateError, match="exists"):
        save_torch_file(state, tmp_path / "c.pt")
    assert (tmp_path / "c.pt").read_bytes() == b"keep"
    save_torch_file(state, tmp_path / "c.pt", force=True)
    assert load_both_ways(tmp_path / "c.pt")["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_what_a_torch_file_cannot_hold_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedError, match=r"the checkpoint\['tags'\]: a set cannot be written"):
        ptfile.save({"tags": {"a"}}, tmp_path / "t.pt")
    with pytest.raises(UnsupportedError, match=r"\['when'\]: an array of dtype datetime64\[s\]"):
        ptfile.save({"when": np.zeros(2, "datetime64[s]")}, tmp_path / "t.pt")
    lying = Deferred((2,), np.dtype(np.float32), lambda: np.zeros(3, np.float32))
    with pytest.raises(FormatError, match=r"computed as \[3\] float32, declared \[2\] float32"):
        ptfile.save({"w": lying}, tmp_path / "t.pt")
    assert list(tmp_path.iterdir()) == []


def test_writes_without_torch(tmp_path):
    torch_checkpoint("nadam", tmp_path / "a.pt")
    state = from_torch_file(tmp_path / "a.pt")
    fileformat.save(state, tmp_path / "s.safetensors")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from optstate.schema import fileformat\n"
        "from optstate.converters.torch.state_dict import save_torch_file\n"
        "save_torch_file(fileformat.load(sys.argv[1]), sys.argv[2])\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", script, tmp_path / "s.safetensors", tmp_path / "b.pt"], check=True)
    old_save_checkpoint(state, tmp_path / "old.pt")
    assert_same(load_both_ways(tmp_path / "b.pt"), torch.load(tmp_path / "old.pt", weights_only=True))
