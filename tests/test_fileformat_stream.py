"""The canonical file streams: lazy entries one at a time, file-to-file copies of memory-mapped arrays,
big-endian input in chunks, fsync optional, and sharding into safetensors files plus an index."""

from __future__ import annotations

import errno
import json
import mmap
import os
import tracemalloc
import weakref
from typing import ClassVar

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import optstate
from optstate.errors import FormatError, OptstateError
from optstate.schema import OptimizerState, ParamInfo, mapped
from optstate.schema import fileformat as ff

from helpers import states


def _sgd(arrays: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None = None) -> OptimizerState:
    params = tuple(ParamInfo((name,), a.shape, str(a.dtype), 0) for name, a in arrays.items())
    return OptimizerState(
        "sgd",
        ({"lr": 0.1, "momentum": 0.9},),
        params,
        {("momentum", (name,)): a for name, a in arrays.items()},
        weights=None if weights is None else {(n,): w for n, w in weights.items()},
    )


def _assert_same_state(a: OptimizerState, b: OptimizerState) -> None:
    assert (a.optimizer, a.params, a.param_groups) == (b.optimizer, b.params, b.param_groups)
    for mine, theirs in ((a.slots, b.slots), (a.weights or {}, b.weights or {})):
        assert mine.keys() == theirs.keys()
        for key, array in mine.items():
            assert theirs[key].dtype == array.dtype and theirs[key].shape == array.shape, key
            assert theirs[key].tobytes() == np.ascontiguousarray(array).tobytes(), key


def _mapped(tmp_path, arrays: dict[str, np.ndarray]) -> dict[str, np.memmap]:
    """The arrays written one after another to a file (at odd offsets), then memory-mapped back."""
    path = tmp_path / "source.bin"
    offsets, offset = {}, 12  # not a multiple of the mapping granularity, nor of 8
    with open(path, "wb") as f:
        f.write(b"x" * offset)
        for name, a in arrays.items():
            offsets[name] = offset
            f.write(a.tobytes())
            offset += a.nbytes
    return {
        name: np.memmap(path, dtype=a.dtype, mode="r", offset=offsets[name], shape=a.shape)
        for name, a in arrays.items()
    }


def _rng_arrays(sizes: dict[str, tuple[int, ...]], dtype="<f4") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in sizes.items()}


class Spy:
    """Counts calls of a real function and calls it."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=40, deadline=None)
@given(state=states(), shard_bytes=st.one_of(st.none(), st.integers(1, 64)))
def test_round_trip_is_bit_exact_plain_and_sharded(tmp_path_factory, state, shard_bytes):
    d = tmp_path_factory.mktemp("p")
    path = optstate.save(state, d / "s.safetensors", max_shard_bytes=shard_bytes)
    _assert_same_state(state, optstate.load(path))
    # Saved again from the memory-mapped load: every array goes file to file.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ff, "COPY_MIN_BYTES", 1)
        again = optstate.save(optstate.load(path), d / "t.safetensors", max_shard_bytes=shard_bytes)
    _assert_same_state(state, optstate.load(again))
    if shard_bytes is None:
        assert again.read_bytes() == path.read_bytes()


def test_sharded_files_are_cut_by_size_and_each_is_a_safetensors_file(tmp_path):
    # momentum: 400 B, 400 B, 4000 B (bigger than a shard); weights: 400 B, 40 B
    arrays = _rng_arrays({"a": (100,), "b": (10, 10), "c": (1000,)})
    weights = _rng_arrays({"a": (100,), "d": (10,)}, "<f4")
    state = _sgd(arrays, weights)
    expected = {
        1: [["a"], ["b"], ["c"], ["wa"], ["wd"]],
        800: [["a", "b"], ["c"], ["wa", "wd"]],
        1000: [["a", "b"], ["c"], ["wa", "wd"]],
        5240: [["a", "b", "c", "wa", "wd"]],
    }
    key = {"a": "momentum/a", "b": "momentum/b", "c": "momentum/c", "wa": "model/a", "wd": "model/d"}
    for shard_bytes, cut in expected.items():
        d = tmp_path / str(shard_bytes)
        index = optstate.save(state, d / "opt.safetensors.index.json", max_shard_bytes=shard_bytes)
        n = len(cut)
        names = [f"opt-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        assert sorted(p.name for p in d.iterdir()) == sorted([*names, "opt.safetensors.index.json"])
        document = json.loads(index.read_text())
        assert document["weight_map"] == {key[k]: name for name, keys in zip(names, cut, strict=True) for k in keys}
        assert document["metadata"]["total_size"] == 5240
        assert document["metadata"]["optstate"]["format_version"] == 1
        for k, (name, keys) in enumerate(zip(names, cut, strict=True), 1):
            tensors = safetensors.numpy.load_file(d / name)
            assert sorted(tensors) == sorted(key[k] for k in keys)
            for short in keys:
                source = weights[short[1:]] if short.startswith("w") else arrays[short]
                np.testing.assert_array_equal(tensors[key[short]], source)
            with safetensors.safe_open(d / name, framework="numpy") as f:
                assert f.metadata()["optstate_shard"] == f"{k}/{n}"
        _assert_same_state(state, optstate.load(index))


def test_sharding_a_plain_name_writes_the_index_beside_it(tmp_path):
    state = _sgd(_rng_arrays({"a": (4,)}))
    index = optstate.save(state, tmp_path / "run.safetensors", max_shard_bytes=10**9)
    assert index == tmp_path / "run.safetensors.index.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-00001-of-00001.safetensors", index.name]
    with pytest.raises(FormatError, match=r"shard 1/1 of a sharded save; load its \.safetensors\.index\.json"):
        optstate.load(tmp_path / "run-00001-of-00001.safetensors")


def test_force_replaces_a_sharded_save_whole(tmp_path):
    index = tmp_path / "s.safetensors.index.json"
    optstate.save(_sgd(_rng_arrays({"a": (100,), "b": (100,), "c": (100,)})), index, max_shard_bytes=400)
    with pytest.raises(OptstateError, match="exists; pass --force"):
        optstate.save(_sgd(_rng_arrays({"a": (3,)})), index, max_shard_bytes=400)
    document = json.loads(index.read_text())
    document["weight_map"]["momentum/z"] = "keep.txt"  # only files named as our shards are removed
    index.write_text(json.dumps(document))
    (tmp_path / "keep.txt").write_text("mine")
    smaller = _sgd(_rng_arrays({"a": (3,)}))
    optstate.save(smaller, index, max_shard_bytes=400, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "s-00001-of-00001.safetensors", index.name]
    _assert_same_state(smaller, optstate.load(index))


# ----------------------------------------------------------------------------- file_span


def test_file_span_finds_the_bytes_of_memmap_views(tmp_path):
    path = tmp_path / "a.bin"
    np.arange(40_000, dtype="<i4").tofile(path)
    offset = mmap.ALLOCATIONGRANULARITY + 12  # np.memmap maps from the granularity below it
    m = np.memmap(path, dtype="<i4", mode="r", offset=offset, shape=(100, 50))
    data = path.read_bytes()

    views = {
        "whole": m,
        "rows": m[7:9],
        "row": m[3],
        "element": m[5, 6:7],
        "flat": m.reshape(-1)[123:4567],
        "bytes": m.view(np.uint8).reshape(-1)[3:1001],
        "plain ndarray": np.asarray(m[10:]),
        "frombuffer": np.frombuffer(m._mmap, np.uint8)[offset % mmap.ALLOCATIONGRANULARITY :][8:16],
    }
    for name, view in views.items():
        span = ff.file_span(view)
        assert span is not None and span.path == str(path), name
        assert data[span.offset : span.offset + view.nbytes] == view.tobytes(), name
    assert m[7:9].offset == offset  # what a slice of a memmap says: its parent's offset
    assert ff.file_span(m[7:9]).offset == offset + 7 * 50 * 4
    for name, view in {
        "column": m[:, 3],
        "strided": m[::2],
        "transposed": m.T,
        "empty": m[3:3],
        "copy": np.array(m[1]),
        "anonymous": np.arange(10),
    }.items():
        assert ff.file_span(view) is None, name


def test_file_span_refuses_private_and_replaced_mappings(tmp_path):
    path = tmp_path / "a.bin"
    np.arange(1000, dtype="<f8").tofile(path)
    cow = np.memmap(path, dtype="<f8", mode="c")  # copy-on-write: memory may differ from the file
    cow[0] = 42.0
    assert ff.file_span(cow) is None
    m = np.memmap(path, dtype="<f8", mode="r")
    os.rename(path, tmp_path / "b.bin")  # the mapping follows the file
    assert ff.file_span(m).path == str(tmp_path / "b.bin")
    before = ff.shared_file_mappings()
    np.zeros(1000).tofile(tmp_path / "c.bin")
    os.replace(tmp_path / "c.bin", tmp_path / "b.bin")  # the mapped file is gone from every name
    assert ff.file_span(m) is None
    assert ff.file_span(m, before) is None  # b.bin is another file now than the one mapped


# ----------------------------------------------------------------------------- the file-to-file copy


@pytest.fixture
def mapped_state(tmp_path):
    arrays = _rng_arrays({"a": (300_000,), "b": (700, 800), "c": (3,)})
    arrays["d"] = np.arange(600_000, dtype=np.float32).astype(ml_dtypes.bfloat16)
    mapped = _mapped(tmp_path, arrays)
    plain = tmp_path / "plain.safetensors"
    optstate.save(_sgd(arrays), plain)
    return _sgd(mapped), plain.read_bytes()


@pytest.mark.parametrize("refuse", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copied_files_equal_written_ones_on_every_path(tmp_path, monkeypatch, mapped_state, refuse):
    state, expected = mapped_state
    spies = {name: Spy(getattr(os, name)) for name in ("copy_file_range", "sendfile")}
    for name, spy in spies.items():
        monkeypatch.setattr(os, name, spy)

    def unsupported(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in refuse:
        spies[name].function = unsupported
    out = tmp_path / "copied.safetensors"
    optstate.save(state, out)
    assert out.read_bytes() == expected
    assert spies["copy_file_range"].calls == 3  # a, b and d; c is too small to bother
    assert spies["sendfile"].calls == (3 if refuse else 0)


def test_a_copy_that_stops_half_way_is_finished_from_memory(tmp_path, monkeypatch, mapped_state):
    state, expected = mapped_state
    real = os.copy_file_range

    def once_then_refuse(src, dst, count, offset_src):
        if once_then_refuse.done:
            raise OSError(errno.EOPNOTSUPP, "not here")
        once_then_refuse.done = True
        return real(src, dst, count // 3, offset_src)

    once_then_refuse.done = False
    monkeypatch.setattr(os, "copy_file_range", once_then_refuse)
    monkeypatch.setattr(os, "sendfile", once_then_refuse)
    out = tmp_path / "copied.safetensors"
    optstate.save(state, out)
    assert out.read_bytes() == expected


def test_fsync_false_skips_the_fsyncs_only(tmp_path, monkeypatch, mapped_state):
    state, expected = mapped_state
    fsync = Spy(os.fsync)
    monkeypatch.setattr(os, "fsync", fsync)
    optstate.save(state, tmp_path / "durable.safetensors")
    assert fsync.calls == 2  # the file, then its directory after the rename
    optstate.save(state, tmp_path / "fast.safetensors", fsync=False)
    optstate.save(state, tmp_path / "fast.safetensors.index.json", max_shard_bytes=10**6, fsync=False)
    assert fsync.calls == 2
    assert (tmp_path / "fast.safetensors").read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- streaming


class Lazy:
    """An array-like computed on demand; checks that at most one other (the one being written) is alive."""

    live: ClassVar[list] = []

    def __init__(self, array, shape=None, dtype=None):
        self.array = array
        self.shape = array.shape if shape is None else shape
        self.dtype = array.dtype if dtype is None else np.dtype(dtype)
        self.calls = 0

    def __array__(self, dtype=None, copy=None):
        assert sum(ref() is not None for ref in Lazy.live) <= 1, "more than two tensors in memory at once"
        self.calls += 1
        result = self.array.copy()
        Lazy.live.append(weakref.ref(result))
        return result


def test_lazy_entries_are_materialised_once_each_and_two_at_most_at_a_time(tmp_path):
    arrays = _rng_arrays({f"t{i}": (50, 7) for i in range(6)})
    lazies = {k: Lazy(a) for k, a in arrays.items()}
    Lazy.live = []
    done = []
    ff.write_safetensors(tmp_path / "l.safetensors", lazies.items(), {}, progress=done.append)
    assert [lazy.calls for lazy in lazies.values()] == [1] * 6
    assert done == [50 * 7 * 4] * 6
    back = safetensors.numpy.load_file(tmp_path / "l.safetensors")
    assert all(np.array_equal(back[k], a) for k, a in arrays.items())


def test_a_lazy_view_of_a_file_is_copied_file_to_file(tmp_path, monkeypatch):
    arrays = _rng_arrays({"a": (600_000,)})
    mapped = _mapped(tmp_path, arrays)["a"]
    copy = Spy(os.copy_file_range)
    monkeypatch.setattr(os, "copy_file_range", copy)

    class LazyView:
        shape, dtype = mapped.shape, mapped.dtype

        def __array__(self, dtype=None, copy=None):
            return mapped[:]

    ff.write_safetensors(tmp_path / "l.safetensors", [("a", LazyView())], {})
    assert copy.calls == 1
    np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "l.safetensors")["a"], arrays["a"])


@pytest.mark.parametrize("shape, dtype", [((28,), "<f4"), ((4, 7), "<f8"), ((4, 7), ml_dtypes.bfloat16)])
def test_a_lazy_entry_that_is_not_what_it_declared_is_refused(tmp_path, shape, dtype):
    good = Lazy(np.ones(3, np.float32))
    liar = Lazy(np.zeros((4, 7), np.float32), shape=shape, dtype=dtype)
    Lazy.live = []
    with pytest.raises(
        FormatError,
        match=r"tensor 'liar': the array has shape \[4, 7\] and dtype float32, "
        r"the header declared shape \[\d+(, \d+)?\] and dtype",
    ):
        ff.write_safetensors(tmp_path / "l.safetensors", [("good", good), ("liar", liar)], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sharded", [False, True])
def test_an_interrupted_write_leaves_no_file(tmp_path, sharded):
    class Broken:
        shape, dtype = (3,), np.dtype("float32")

        def __array__(self, dtype=None, copy=None):
            raise OSError("disk full")

    tensors = [("a", np.ones(1000, np.float32)), ("b", Broken())]
    with pytest.raises(OSError, match="disk full"):
        if sharded:
            ff.write_sharded(tmp_path / "s.safetensors.index.json", tensors, {}, max_shard_bytes=100)
        else:
            ff.write_safetensors(tmp_path / "s.safetensors", tensors, {})
    assert list(tmp_path.iterdir()) == []


def test_big_endian_arrays_are_swapped_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ff, "_CHUNK_BYTES", 64)  # so every array below takes several chunks
    values = np.arange(3 * 50, dtype=np.float64).reshape(3, 50) / 7
    tensors = {
        "be": values.astype(">f8"),
        "be_transposed": values.astype(">f4").T,
        "be_scalar": np.array(3, ">i2"),
        "le_strided": values[:, ::3],
        "be_broadcast": np.broadcast_to(np.array(2.5, ">f4"), (5, 40)),
    }
    ff.write_safetensors(tmp_path / "b.safetensors", tensors.items(), {})
    back = safetensors.numpy.load_file(tmp_path / "b.safetensors")
    for key, array in tensors.items():
        assert back[key].dtype == array.dtype.newbyteorder("<"), key
        np.testing.assert_array_equal(back[key], array, err_msg=key)


def test_swapping_and_gathering_copy_one_chunk_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(ff, "_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(mapped, "_HASH_CHUNK", 256 << 10)  # the read-back's buffers: not what this measures
    big_endian = np.arange(2 << 20, dtype=">f4")  # 8 MiB
    strided = np.arange(4 << 20, dtype="<f4")[::2]
    tracemalloc.start()
    try:
        ff.write_safetensors(tmp_path / "b.safetensors", [("be", big_endian), ("strided", strided)], {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20
    back = safetensors.numpy.load_file(tmp_path / "b.safetensors")
    assert np.array_equal(back["be"], big_endian) and np.array_equal(back["strided"], strided)


# ----------------------------------------------------------------------------- strict reading of a sharded save


@pytest.fixture
def sharded(tmp_path):
    state = _sgd(_rng_arrays({"a": (10,), "b": (10,), "c": (10,)}))
    index = optstate.save(state, tmp_path / "s.safetensors.index.json", max_shard_bytes=80)
    return index, json.loads(index.read_text())


def _rewrite(index, document):
    index.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "shard, match",
    [
        (
            "../s-00001-of-00002.safetensors",
            r"tensor 'momentum/a': shard '\.\./s-00001-of-00002\.safetensors' is not "
            r"a file name beside the index",
        ),
        ("/etc/passwd", "is not a file name beside the index"),
        ("..", "is not a file name beside the index"),
        ("other.safetensors", r"shard other\.safetensors \(holding 'momentum/a'\) is missing"),
    ],
)
def test_an_index_naming_a_shard_it_may_not_or_that_is_missing_is_refused(sharded, shard, match):
    index, document = sharded
    document["weight_map"]["momentum/a"] = shard
    _rewrite(index, document)
    with pytest.raises(FormatError, match=match):
        optstate.load(index)


def test_a_missing_shard_is_refused(sharded):
    index, _ = sharded
    index.with_name("s-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"shard s-00002-of-00002\.safetensors \(holding 'momentum/c'\) is missing"):
        optstate.load(index)


def test_a_key_in_another_shard_than_the_index_says_is_refused(sharded):
    index, document = sharded
    assert document["weight_map"]["momentum/c"] == "s-00002-of-00002.safetensors"
    document["weight_map"]["momentum/c"] = "s-00001-of-00002.safetensors"
    _rewrite(index, document)
    with pytest.raises(
        FormatError,
        match=r"s-00001-of-00002\.safetensors: tensor 'momentum/c' is missing; the "
        r"index s\.safetensors\.index\.json places it in this shard",
    ):
        optstate.load(index)


def test_a_tensor_the_index_does_not_list_is_refused(sharded):
    index, document = sharded
    del document["weight_map"]["momentum/b"]
    _rewrite(index, document)
    with pytest.raises(
        FormatError,
        match=r"s-00001-of-00002\.safetensors: holds tensor 'momentum/b', which the "
        r"index s\.safetensors\.index\.json does not list",
    ):
        optstate.load(index)


def test_a_shard_of_another_save_is_refused(sharded, tmp_path):
    index, _ = sharded
    other = tmp_path / "other"
    optstate.save(_sgd(_rng_arrays({"a": (10,), "b": (10,), "c": (10,)})), other / index.name, max_shard_bytes=80)
    os.replace(other / "s-00002-of-00002.safetensors", index.with_name("s-00002-of-00002.safetensors"))
    with pytest.raises(FormatError, match=r"s-00002-of-00002\.safetensors: written by another save than"):
        optstate.load(index)


@pytest.mark.parametrize("text", ["[]", "{not json", '{"metadata": {}, "weight_map": {}}'])
def test_a_malformed_index_is_refused(sharded, text):
    index, _ = sharded
    index.write_text(text)
    with pytest.raises(FormatError, match=r"s\.safetensors\.index\.json: "):
        optstate.load(index)
