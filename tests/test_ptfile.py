"""``ptfile.load`` reads what ``torch.load(weights_only=True)`` reads, bit for bit, without torch; and refuses
everything else by name, running nothing."""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pickle
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

import optstate
from optstate.converters.torch import ptfile
from optstate.converters.torch.state_dict import from_torch_file
from optstate.errors import FormatError, OptstateError, UnsupportedError

# ----------------------------------------------------------------------------- fixtures, written with real torch


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32, norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(3, 4, dtype=dtype)
        self.norm = torch.nn.BatchNorm1d(4, dtype=dtype) if norm else torch.nn.Identity()
        self.fc2 = torch.nn.Linear(4, 2, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _trained(make, dtype=torch.float32, steps=2, norm=False, named=True, schedule=None):
    model = Net(dtype, norm)
    opt = make(model.named_parameters() if named else model.parameters())
    sched = schedule and schedule(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3, dtype=dtype)).square().sum().backward()
        opt.step()
        if sched:
            sched.step()
    return model, opt, sched


def _checkpoint(make, **kw):
    model, opt, _ = _trained(make, **kw)
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _training_checkpoint():
    model, opt, sched = _trained(
        lambda p: torch.optim.Adam(p, lr=0.01),
        steps=3,
        norm=True,
        named=False,
        schedule=lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5),
    )
    return {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "note": "run 7",
        "loss": float("nan"),
        "shape": torch.Size([2, 3]),
        "blob": b"\x00\xffab",
        "tags": {"a", "b"},
        "z": 1 + 2j,
        "big": 2**70,
        "neg": -5,
        "none": None,
    }


def _dtypes():
    values = torch.tensor([0.0, -1.5, 2.25, 448.0])
    tensors = {
        str(d).removeprefix("torch."): values.to(d)
        for d in (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
            torch.int64,
            torch.int32,
            torch.int16,
            torch.int8,
            torch.uint8,
            torch.uint16,
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    }
    tensors["conj"] = torch.tensor([1 + 2j, 3 - 4j]).conj()
    return tensors


def _views():
    x = torch.arange(24.0).reshape(4, 6)
    return {
        "base": x,
        "t": x.t(),
        "row": x[2],
        "cols": x[:, 1::2],
        "block": x[1:3, 2:5],
        "flat_tail": x.view(-1)[7:],
        "scalar": x[3, 5],
        "zero_d": torch.tensor(7.0),
        "empty": torch.empty(0, 3),
        "empty_view": x[:, 6:],
        "other": torch.arange(5, dtype=torch.int64)[::2],
        "same_twice": [x[0], x[0]],
    }


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def _tied():
    model = Tied()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _tensor_lr(dtype):
    model, opt, _ = _trained(lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01, dtype=dtype)))
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


FIXTURES = {
    "sgd": lambda: _checkpoint(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    "adam": lambda: _checkpoint(lambda p: torch.optim.Adam(p, lr=0.01), named=False),
    "adamw_f64": lambda: _checkpoint(lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True), dtype=torch.float64),
    "adamw_bf16": lambda: _checkpoint(lambda p: torch.optim.AdamW(p, lr=0.01), dtype=torch.bfloat16),
    "adam_fp16": lambda: _checkpoint(lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-4), dtype=torch.float16),
    "nadam": lambda: _checkpoint(lambda p: torch.optim.NAdam(p, lr=0.01)),
    "adafactor": lambda: _checkpoint(lambda p: torch.optim.Adafactor(p, lr=0.01)),
    "optimizer_only": lambda: _trained(lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5))[1].state_dict(),
    "training": _training_checkpoint,
    "tied": _tied,
    "tensor_lr_f64": lambda: _tensor_lr(torch.float64),
    "tensor_lr_f32": lambda: _tensor_lr(torch.float32),
    "dtypes": _dtypes,
    "views": _views,
    "parameter": lambda: torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)),
    "zero_d": lambda: torch.tensor(3.0),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pt")
    paths = {}
    for name, make in FIXTURES.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(make(), paths[name])
    return paths


# ----------------------------------------------------------------------------- comparing with torch


def _bytes(t: torch.Tensor) -> bytes:
    return t.resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _mapped_from_file(array: np.ndarray) -> bool:
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return isinstance(base, mmap.mmap)


def _same(ours, theirs, where, tensors):
    """Structure, types and bits equal; tensors collected as (where, ours, theirs)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.shape == tuple(theirs.shape), where
        assert ours.dtype.name == str(theirs.dtype).removeprefix("torch."), where
        assert np.ascontiguousarray(ours).tobytes() == _bytes(theirs), where
        assert not ours.flags.writeable, where
        tensors.append((where, ours, theirs))
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), where
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}[{key!r}]", tensors)
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is (tuple if isinstance(theirs, tuple) else list), where  # torch.Size is a tuple
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _same(a, b, f"{where}[{i}]", tensors)
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert isinstance(ours, float) and math.isnan(ours), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def _storage_start(array: np.ndarray, tensor: torch.Tensor) -> int:
    return array.__array_interface__["data"][0] - tensor.storage_offset() * array.dtype.itemsize


@pytest.mark.parametrize("name", FIXTURES)
def test_load_equals_torch_load(saved, name):
    ours = ptfile.load(saved[name])
    theirs = torch.load(saved[name], weights_only=True)
    tensors = []
    _same(ours, theirs, name, tensors)
    for where, array, tensor in tensors:
        assert _mapped_from_file(array) or tensor.is_conj() or not tensor.numel(), where
    # Views of one storage in torch are views of one region of the file here, at the same offsets.
    mapped = [(w, a, t) for w, a, t in tensors if t.numel() and not t.is_conj()]
    for w1, a1, t1 in mapped:
        for w2, a2, t2 in mapped:
            same_storage = t1.untyped_storage().data_ptr() == t2.untyped_storage().data_ptr()
            assert (_storage_start(a1, t1) == _storage_start(a2, t2)) == same_storage, (w1, w2)


def test_fixtures_cover_shared_storages_counters_and_0d(saved):
    views = ptfile.load(saved["views"])
    assert np.shares_memory(views["base"], views["t"]) and np.shares_memory(views["row"], views["cols"])
    assert views["same_twice"][0] is not views["same_twice"][1]  # two tensors, as torch gives
    assert views["scalar"].shape == () and views["scalar"] == 23.0 and views["empty"].shape == (0, 3)
    training = ptfile.load(saved["training"])
    assert training["lr_scheduler"]["milestones"] == Counter({2: 1, 4: 1})
    assert training["optimizer_state_dict"]["state"][0]["step"].shape == ()
    assert ptfile.load(saved["nadam"])["optimizer"]["state"][0]["mu_product"].dtype == np.float32
    tied = ptfile.load(saved["tied"])["model"]
    assert tied["embed.weight"].__array_interface__ == tied["head.weight"].__array_interface__


# ----------------------------------------------------------------------------- the canonical state, both ways


def _assert_same_state(ours, theirs):
    assert (ours.optimizer, ours.param_groups, ours.params, ours.buffers) == (
        theirs.optimizer,
        theirs.param_groups,
        theirs.params,
        theirs.buffers,
    )
    assert dataclasses.replace(ours.metadata, source=None) == dataclasses.replace(theirs.metadata, source=None)
    for ours_arrays, their_arrays in ((ours.slots, theirs.slots), (ours.weights or {}, theirs.weights or {})):
        assert list(ours_arrays) == list(their_arrays)
        for key, array in their_arrays.items():
            mine = ours_arrays[key]
            assert (mine.shape, mine.dtype) == (array.shape, array.dtype), key
            assert np.ascontiguousarray(mine).tobytes() == np.ascontiguousarray(array).tobytes(), key


def _outcome(read, path):
    try:
        return read(path)
    except OptstateError as exc:
        return exc


@pytest.mark.parametrize("name", FIXTURES)
def test_from_torch_file_equals_from_torch(saved, name, recwarn):
    ours = _outcome(from_torch_file, saved[name])
    theirs = _outcome(optstate.from_torch, saved[name])
    if isinstance(theirs, Exception):
        assert (type(ours), str(ours)) == (type(theirs), str(theirs))
    else:
        _assert_same_state(ours, theirs)
        assert all(_mapped_from_file(a) for a in ours.slots.values())


def test_fixtures_cover_the_refusals(saved):
    tied = from_torch_file(saved["tied"])  # one tensor under two names: one parameter, named once
    assert [p.path for p in tied.params] == [("embed", "weight")] and ("head", "weight") not in tied.weights
    with pytest.raises(UnsupportedError, match="a float32 tensor hyperparameter"):
        from_torch_file(saved["tensor_lr_f32"])
    assert from_torch_file(saved["tensor_lr_f64"]).param_groups[0]["lr"] == 0.01
    with pytest.raises(FormatError, match="holds a tensor, not a state_dict"):
        from_torch_file(saved["parameter"])
    assert from_torch_file(saved["training"]).metadata.lr_scheduler["milestones"] == Counter({2: 1, 4: 1})


def test_optimizer_is_named_when_asked(saved):
    assert from_torch_file(saved["adam"], optimizer="adam").optimizer == "adam"
    with pytest.raises(UnsupportedError, match="optimizer='sgd' but the param groups are Adam's"):
        from_torch_file(saved["adam"], optimizer="sgd")


BLOCKED = """
import sys
sys.modules["torch"] = None  # any import of torch fails
import optstate
from optstate.converters.torch.state_dict import from_torch_file
state = from_torch_file(sys.argv[1])
optstate.save(state, sys.argv[2])
assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
print(state.optimizer, state.common_step())
"""


def test_reads_and_saves_without_torch(saved, tmp_path):
    out = tmp_path / "state.safetensors"
    run = subprocess.run([sys.executable, "-c", BLOCKED, saved["training"], out], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["adam", "3"]
    _assert_same_state(optstate.load(out), optstate.from_torch(saved["training"]))


# ----------------------------------------------------------------------------- byte order


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.bfloat16,
        torch.float16,
        torch.int64,
        torch.int16,
        torch.complex64,
        torch.bool,
        torch.uint8,
    ],
)
def test_big_endian_file(tmp_path, dtype):
    tensor = torch.tensor([[1.5, -2.0, 3.25], [0.0, 7.0, 1.0]]).to(dtype)
    torch.save({"t": tensor, "row": tensor[1]}, tmp_path / "little.pt")
    part = tensor.element_size() // (2 if tensor.is_complex() else 1)
    _rewrite(
        tmp_path / "little.pt",
        tmp_path / "big.pt",
        lambda name, data: (
            b"big"
            if name.endswith("/byteorder")
            else np.frombuffer(data, f"u{part}").byteswap().tobytes()
            if "/data/" in name
            else data
        ),
    )
    ours = ptfile.load(tmp_path / "big.pt")
    theirs = torch.load(tmp_path / "big.pt", weights_only=True)  # torch swaps a big-endian file's bytes too
    _same(ours, theirs, "big", [])
    assert np.ascontiguousarray(ours["t"]).tobytes() == _bytes(tensor)
    assert np.shares_memory(ours["t"], ours["row"])


# ----------------------------------------------------------------------------- refusals


def _rewrite(src, dst, edit, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(
                info.filename,
                edit(info.filename, zin.read(info)),
                compress_type=compress if "/data/" in info.filename else zipfile.ZIP_STORED,
            )


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {Boom.marker}",))


def test_code_in_the_file_is_refused_by_name_and_not_run(tmp_path):
    Boom.marker = tmp_path / "pwned"
    torch.save({"optimizer": {"state": Boom(), "param_groups": []}}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match=r"evil\.pt: refused: .*unsupported global posix\.system"):
        ptfile.load(tmp_path / "evil.pt")
    with pytest.raises(FormatError, match=r"unsupported global posix\.system"):
        from_torch_file(tmp_path / "evil.pt")
    assert not Boom.marker.exists()


def test_records_mode_keeps_other_libraries_objects_inert(tmp_path):
    """A trainer's file pickles its own classes: with records=True they are read as records, their module
    never imported and nothing in them called, a call to os.system included."""
    Boom.marker = tmp_path / "pwned"
    module = "optstate_never_imported_trainer"
    ops = [
        _global(module, "Arguments"),
        pickle.EMPTY_TUPLE,
        pickle.NEWOBJ,
        pickle.EMPTY_DICT,
        _s("warmup_steps"),
        pickle.BININT1,
        b"\x03",
        pickle.SETITEM,
        pickle.BUILD,
    ]
    path = _archive(tmp_path / "args.bin", *ops)
    args = ptfile.load(path, records=True)
    assert (args.module, args.name, args.get("warmup_steps")) == (module, "Arguments", 3)
    assert module not in sys.modules
    with pytest.raises(FormatError, match=rf"unsupported global {module}\.Arguments"):
        ptfile.load(path)  # a plain state_dict reader still refuses it
    torch.save({"scaler": Boom()}, tmp_path / "evil.pt")
    scaler = ptfile.load(tmp_path / "evil.pt", records=True)["scaler"]
    assert (scaler.name, scaler.args) == ("system", (f"touch {Boom.marker}",))
    assert not Boom.marker.exists()


class Tagged(torch.Tensor):
    """A tensor subclass of another library, as DeepSpeed's ZeRO-3 parameters are."""


def test_records_mode_reads_tensors_pickled_with_their_attributes(tmp_path):
    """DeepSpeed's ZeRO-3 flat groups carry Python attributes (``ds_id``), so torch pickles them through
    _rebuild_from_type_v2: records mode reads the array, a subclass's as a record; the strict mode refuses."""
    flat = torch.arange(4.0)
    flat.ds_id = "0_2"
    torch.save({"flat": flat, "tagged": torch.ones(2).as_subclass(Tagged)}, tmp_path / "zero3.pt")
    read = ptfile.load(tmp_path / "zero3.pt", records=True)
    assert read["flat"].tolist() == [0.0, 1.0, 2.0, 3.0] and not read["flat"].flags.writeable
    assert (read["tagged"].name, read["tagged"].args[0].tolist()) == ("Tagged", [1.0, 1.0])
    with pytest.raises(FormatError, match=r"unsupported global torch\._tensor\._rebuild_from_type_v2"):
        ptfile.load(tmp_path / "zero3.pt")
    # Records mode rebuilds tensors only: another function in their place is refused, never called.
    ops = [_global("torch._tensor", "_rebuild_from_type_v2"), _global("posix", "system"), _global("torch", "Tensor")]
    ops += [_s("touch pwned"), pickle.TUPLE1, pickle.EMPTY_DICT, pickle.TUPLE, pickle.REDUCE]
    path = _archive(tmp_path / "evil.pt", ops[0], pickle.MARK, *ops[1:])
    with pytest.raises(FormatError, match=r"_rebuild_from_type_v2 of .*system.*, not of a tensor"):
        ptfile.load(path, records=True)


def _archive(path, *ops, storages=None):
    """A torch-style zip whose data.pkl is the pickle opcodes ``ops`` (bytes), with ``storages`` by key."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", pickle.PROTO + b"\x02" + b"".join(ops) + pickle.STOP)
        for key, data in (storages or {}).items():
            z.writestr(f"a/data/{key}", data)
    return path


def _s(text):
    data = text.encode()
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def _global(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tensor_ops(numel, size, storage_class="FloatStorage", key="0"):
    return b"".join(
        [
            _global("torch._utils", "_rebuild_tensor_v2"),
            pickle.MARK,
            pickle.MARK,
            _s("storage"),
            _global("torch", storage_class),
            _s(key),
            _s("cpu"),
            pickle.BININT1,
            bytes([numel]),
            pickle.TUPLE,
            pickle.BINPERSID,
            pickle.BININT1,
            b"\x00",
            pickle.BININT1,
            bytes([size]),
            pickle.TUPLE1,
            pickle.BININT1,
            b"\x01",
            pickle.TUPLE1,
            pickle.NEWFALSE,
            pickle.EMPTY_DICT,
            pickle.TUPLE,
            pickle.REDUCE,
        ]
    )


def test_hand_written_tensor_reads(tmp_path):
    path = _archive(tmp_path / "ok.pt", _tensor_ops(2, 2), storages={"0": np.float32([1.5, 2]).tobytes()})
    assert ptfile.load(path).tolist() == [1.5, 2.0]


@pytest.mark.parametrize(
    "ops, storages, message",
    [
        (
            [_global("builtins", "eval"), _s("1"), pickle.TUPLE1, pickle.REDUCE],
            None,
            "unsupported global builtins.eval",
        ),
        ([_global("numpy.core.multiarray", "_reconstruct")], None, "unsupported global numpy.core.multiarray"),
        ([_global("torch", "FloatStorage"), pickle.EMPTY_TUPLE, pickle.REDUCE], None, "calls a _StorageType"),
        ([pickle.EMPTY_DICT, pickle.EMPTY_DICT, pickle.BUILD], None, "sets attributes of a dict"),
        (
            [
                _global("collections", "OrderedDict"),
                pickle.EMPTY_TUPLE,
                pickle.REDUCE,
                pickle.MARK,
                _s("items"),
                pickle.BININT1,
                b"\x05",
                pickle.TUPLE,
                pickle.EMPTY_DICT,
                pickle.NONE,
                pickle.TUPLE2,
                pickle.BUILD,
            ],
            None,
            "only a state_dict's _metadata",
        ),
        ([pickle.EMPTY_TUPLE, pickle.NONE, pickle.APPEND], None, "appends to a tuple"),
        ([pickle.EMPTY_LIST, _s("x"), pickle.NONE, pickle.SETITEM], None, "sets items of a list"),
        ([_s("x"), pickle.BINPERSID], None, "persistent id 'x' is not a tensor storage"),
        ([pickle.FRAME + bytes(8)], None, "opcode FRAME"),
        ([pickle.NONE, pickle.POP], None, "opcode POP"),
        ([_tensor_ops(2, 5)], {"0": bytes(8)}, "the view reaches element 4, the storage holds 2"),
        ([_tensor_ops(3, 3)], {"0": bytes(8)}, "8 bytes stored, the storage says 3 float32"),
        ([_tensor_ops(2, 2, key="9")], {"0": bytes(8)}, "record a/data/9 is missing"),
        ([pickle.TUPLE2], None, "malformed data.pkl"),
        ([pickle.BINUNICODE, b"\xff\x00\x00\x00ab"], None, "data.pkl is truncated"),
    ],
)
def test_pickles_outside_a_state_dict_are_refused(tmp_path, ops, storages, message):
    with pytest.raises(FormatError, match=message):
        ptfile.load(_archive(tmp_path / "bad.pt", *ops, storages=storages))


def test_compressed_member_is_refused(saved, tmp_path):
    _rewrite(saved["sgd"], tmp_path / "zipped.pt", lambda name, data: data, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match=r"record .*/data/0 is compressed"):
        ptfile.load(tmp_path / "zipped.pt")


def test_legacy_format_names_the_way_out(tmp_path):
    torch.save({"t": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match=r"legacy format.*re-save it with a newer torch or install torch"):
        ptfile.load(tmp_path / "old.pt")


@pytest.mark.parametrize("keep", [0, 7, 200, -30])
def test_truncated_file(saved, tmp_path, keep):
    data = saved["adam"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:keep])
    with pytest.raises(FormatError, match=r"cut\.pt: not a readable torch checkpoint"):
        ptfile.load(tmp_path / "cut.pt")
    with pytest.raises(FormatError, match=r"cut\.pt: not a readable torch checkpoint"):
        optstate.from_torch(tmp_path / "cut.pt")


def test_garbage_and_other_zips(saved, tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FormatError, match=r"noise\.pt: not a readable torch checkpoint .*not a zip"):
        ptfile.load(tmp_path / "noise.pt")
    data = bytearray(saved["adam"].read_bytes())
    data[100] ^= 0xFF  # inside data.pkl (after its 64-byte header), which the zip's CRC covers
    (tmp_path / "flipped.pt").write_bytes(data)
    with pytest.raises(FormatError, match=r"flipped\.pt: not a readable torch checkpoint .*CRC"):
        ptfile.load(tmp_path / "flipped.pt")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(FormatError, match=r"not one torch.save writes"):
        ptfile.load(tmp_path / "other.pt")
    with pytest.raises(FormatError, match="no such file"):
        ptfile.load(tmp_path / "missing.pt")
