"""Reliability (issue 15): whatever the input and whatever happens during a conversion, optstate writes a
complete, correct output or nothing, and says why in one line naming the file and the tensor, key or offset.

Each test here failed before the change it guards: an input rewritten or truncated during the read, an
output changed before its rename, a sharded save replaced with --force, untrusted bytes (zip bombs, deep
JSON, junk around a zip, FIFOs, unknown globals), states that convert silently wrong (no step, negative
second moments), a signal during a write, the in-kernel copy of a ``.pt`` tensor; and a fuzzer over the
parsers of untrusted bytes.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optstate
from optstate import atomic
from optstate.api import read, refuse_output_that_is_input, write
from optstate.cli import main
from optstate.converters.torch import ptfile
from optstate.errors import FormatError, OptstateError
from optstate.schema import ParamInfo, load, save
from optstate.schema import fileformat as ff
from optstate.schema import state as state_module

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fixtures


def adam_checkpoint(path: Path, width: int = 8, steps: int = 2, dtype=torch.float64, **extra) -> Path:
    """A real torch training checkpoint: Adam on a linear model, ``steps`` steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width).to(dtype)
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, width, dtype=dtype)).pow(2).sum().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path)
    return path


def edited_optimizer(path: Path, edit) -> Path:
    """``path``'s checkpoint with its optimizer state_dict edited by ``edit(sd)``, saved by torch again."""
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["optimizer"])
    torch.save(checkpoint, path)
    return path


def left_behind(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@contextmanager
def no_hang(seconds: int = 20):
    """Fail, instead of hanging the suite, where a call blocks (reading a FIFO)."""

    def hung(*_):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- 1. inputs that change during the read


def rewriting_input(path: Path, rewrite):
    """A ``progress`` for convert that calls ``rewrite(path)`` once, after the first tensor is written."""
    done = []

    def progress(_state):
        def on_tensor(_nbytes):
            if not done:
                done.append(True)
                rewrite(path)

        return on_tensor

    return progress


def test_input_rewritten_in_place_during_the_read_is_refused(tmp_path):
    src = adam_checkpoint(tmp_path / "ckpt.pt")
    other = adam_checkpoint(tmp_path / "next.pt", steps=3)  # the trainer's next save: the same size
    assert other.stat().st_size == src.stat().st_size

    def trainer_saves_again(path: Path) -> None:
        with open(path, "r+b") as f:  # in place, as torch.save to the same name does: same inode
            f.write(other.read_bytes())

    out = tmp_path / "s.safetensors"
    with pytest.raises(FormatError, match=r"ckpt\.pt changed while it was read \(rewritten in place"):
        optstate.convert(src, out, progress=rewriting_input(src, trainer_saves_again))
    assert not out.exists() and left_behind(tmp_path) == []


def test_input_replaced_during_the_read_is_refused(tmp_path):
    src = adam_checkpoint(tmp_path / "ckpt.pt")
    other = adam_checkpoint(tmp_path / "next.pt", steps=3)

    def rsync_finishes(path: Path) -> None:
        os.replace(other, path)  # a new file renamed over the name: another inode

    out = tmp_path / "s.pt"
    with pytest.raises(FormatError, match=r"ckpt\.pt changed while it was read \(replaced by another file\)"):
        optstate.convert(src, out, dst_format="torch", progress=rewriting_input(src, rsync_finishes))
    assert not out.exists()


def test_input_truncated_while_memory_mapped_names_the_file_and_the_cause(tmp_path):
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=64)  # tensors under 1 MiB: written from the mapping

    def truncate(path: Path) -> None:
        os.truncate(path, 4096)

    out = tmp_path / "s.safetensors"
    with pytest.raises(FormatError) as caught:
        optstate.convert(src, out, progress=rewriting_input(src, truncate))
    message = str(caught.value)
    assert "ckpt.pt changed while it was read (size" in message and "truncated" in message
    # The cause: the write from the mapping (EFAULT), or the moments' check beside it (pread), whichever came first
    assert ("Bad address" in message or "ends before byte" in message) and "Traceback" not in message
    assert not out.exists() and left_behind(tmp_path) == []


TRUNCATED_WHILE_CHECKED = """
import os, sys
from optstate.cli import main
from optstate.schema import state
check_values = state._check_values

def truncated_first(slots, source=None):  # a trainer rewrites the checkpoint while its moments are checked
    os.truncate(sys.argv[1], 4096)
    check_values(slots, source)

state._check_values = truncated_first
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize("width", [64, 512], ids=["written-from-memory", "copied-in-the-kernel"])
def test_an_input_truncated_while_its_moments_are_checked_is_an_error_not_a_sigbus(tmp_path, width):
    """The check of the moments' values reads them with pread, not through the mapping: no SIGBUS."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=width)
    out = tmp_path / "s.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", TRUNCATED_WHILE_CHECKED, str(src), str(out)], capture_output=True, text=True
    )
    assert run.returncode == 1, (run.returncode, run.stderr)  # -7 (SIGBUS) before
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "ckpt.pt changed while it was read (size" in run.stderr, run.stderr
    assert not out.exists() and left_behind(tmp_path) == []


TRUNCATED_WHILE_MOVED = """
import os, sys
import numpy as np
import optstate

def flax_linear():  # the Flax layout of torch's Linear(512, 512): a kernel [in, out]
    return {"params": {"kernel": np.zeros((512, 512)), "bias": np.zeros(512)}}

def progress(_state):
    done = []
    def on_tensor(_nbytes):
        if not done:  # after the first tensor: a trainer rewrites the checkpoint while the others are moved
            done.append(os.truncate(sys.argv[1], 4096))
    return on_tensor

sys.modules["target"] = sys.modules[__name__]
try:
    optstate.convert(sys.argv[1], sys.argv[2], target_params="target:flax_linear", progress=progress)
except optstate.OptstateError as exc:
    sys.exit(str(exc))
"""


TRUNCATED_BETWEEN_WRITE_AND_HASH = """
import os, sys
from optstate.cli import main
from optstate.converters.torch import ptfile
from optstate.schema import fileformat
writer = {"canonical": fileformat, "torch": ptfile}[sys.argv[1]]
write_all = writer.write_all

def truncating(fd, data):  # a small tensor written, not yet hashed: a trainer rewrites the input meanwhile
    write_all(fd, data)
    if data.nbytes == 64 * 64 * 8:
        os.truncate(sys.argv[2], 0)

writer.write_all = truncating
sys.exit(main(["convert", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("writer", ["canonical", "torch"])
def test_an_input_truncated_between_a_small_tensor_s_write_and_its_hash_is_an_error_not_a_sigbus(tmp_path, writer):
    """A mapped tensor too small for the in-kernel copy is read with pread before it is written and hashed."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=64)  # 32 KiB a matrix: written from memory
    if writer == "torch":
        optstate.convert(src, tmp_path / "s.safetensors")
        src = tmp_path / "s.safetensors"
    out = tmp_path / ("out.pt" if writer == "torch" else "out.safetensors")
    args = [str(src), str(out), *(["--to", "torch"] if writer == "torch" else [])]
    run = subprocess.run(
        [sys.executable, "-c", TRUNCATED_BETWEEN_WRITE_AND_HASH, writer, *args], capture_output=True, text=True
    )
    assert run.returncode == 1, (run.returncode, run.stderr)  # -7 (SIGBUS) before
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert src.name in run.stderr, run.stderr
    assert not out.exists() and left_behind(tmp_path) == [], sorted(p.name for p in tmp_path.iterdir())


def test_an_input_truncated_while_its_tensors_are_transposed_is_an_error_not_a_sigbus(tmp_path):
    """A layout move's transpose reads its mapped source with pread first: no SIGBUS mid-transpose."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512)
    out = tmp_path / "flax.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", TRUNCATED_WHILE_MOVED, str(src), str(out)], capture_output=True, text=True
    )
    assert run.returncode == 1, (run.returncode, run.stderr)  # -7 (SIGBUS) before
    assert "ckpt.pt changed while it was read (size" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not out.exists() and left_behind(tmp_path) == []


def test_unchanged_input_converts(tmp_path):
    src = adam_checkpoint(tmp_path / "ckpt.pt")
    optstate.convert(src, tmp_path / "s.safetensors")
    assert load(tmp_path / "s.safetensors").common_step() == 2


# ----------------------------------------------------------------------------- 2. read-back and checksums


def test_every_tensor_has_a_checksum_in_the_canonical_file(tmp_path):
    src = adam_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "s.safetensors"
    optstate.convert(src, out)
    arrays, metadata = ff.read_safetensors(out)
    recorded = json.loads(metadata[ff.CHECKSUM_KEY])
    assert set(recorded) == set(arrays) and len(arrays) == 6
    for key, array in arrays.items():
        assert recorded[key] == xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).tobytes())


def test_a_changed_tensor_is_refused_on_reading_naming_it(tmp_path):
    out = tmp_path / "s.safetensors"
    optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), out)
    arrays, _ = ff.read_safetensors(out)
    data_start = out.stat().st_size - sum(a.nbytes for a in arrays.values())
    with open(out, "r+b") as f:  # a bad disk: one bit of the last tensor's data
        f.seek(out.stat().st_size - 1)
        last = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([last[0] ^ 1]))
    assert data_start > 0
    with pytest.raises(FormatError, match=r"s\.safetensors: tensor '[a-z_]+/[a-z]+' has checksum [0-9a-f]{16}, "):
        load(out)
    assert main(["convert", str(out), str(tmp_path / "back.pt")]) == 1
    assert not (tmp_path / "back.pt").exists() and left_behind(tmp_path) == []


def traced_beside_writing(monkeypatch, check, writer, label: str) -> tuple[list[str], threading.Event]:
    """Patch ``check`` (an ``(owner, name)`` pair) to wait until ``writer`` starts, then note ``label`` in the
    order returned, where the writer notes ``"writing"`` as it starts: a check run before the writing times out."""
    order, writing = [], threading.Event()
    checked, written = getattr(*check), getattr(*writer)

    def slow_check(*args):
        assert writing.wait(30)  # runs beside the writer: waits for it to start
        order.append(label)
        return checked(*args)

    def traced_writer(*args, **kwargs):
        if not writing.is_set():
            order.append("writing")
            writing.set()
        return written(*args, **kwargs)

    monkeypatch.setattr(*check, slow_check)
    monkeypatch.setattr(*writer, traced_writer)
    return order, writing


def test_a_conversion_checks_its_input_while_it_writes_and_before_the_rename(tmp_path, monkeypatch):
    """The input's checksums are read beside the writing, not before it (a whole pass over the input saved),
    and the output is renamed into place only once they passed."""
    src = tmp_path / "s.safetensors"
    optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), src)
    order, _ = traced_beside_writing(monkeypatch, (ff, "check_checksums"), (ptfile, "save"), "input checked")
    with atomic.checked_before_commit(lambda: order.append("renamed")):
        optstate.convert(src, tmp_path / "back.pt", dst_format="torch")
    assert order == ["writing", "input checked", "renamed"]
    order.clear()
    load(src)  # outside a conversion: checked before load returns
    assert order == ["input checked"]


def test_a_torch_input_s_moments_are_checked_beside_the_writing_and_before_the_rename(tmp_path, monkeypatch):
    """The pass over every moment (finite; second moments not negative) runs beside the writing, not before it;
    a diverged state is refused at the rename, naming the file and the parameter, and nothing appears."""
    checked, written = (state_module, "_check_values"), (ff, "_write_tensor")
    order, writing = traced_beside_writing(monkeypatch, checked, written, "moments checked")
    src = adam_checkpoint(tmp_path / "ckpt.pt")
    with atomic.checked_before_commit(lambda: order.append("renamed")):
        optstate.convert(src, tmp_path / "s.safetensors")
    assert order == ["writing", "moments checked", "renamed"]

    def diverged(sd):
        sd["state"][0]["exp_avg"][0, 0] = float("nan")

    order.clear()
    writing.clear()
    edited_optimizer(src, diverged)
    with pytest.raises(FormatError, match=r"ckpt\.pt: weight: slot 'first_moment' holds non-finite values"):
        optstate.convert(src, tmp_path / "d.safetensors")
    assert order == ["writing", "moments checked"]
    assert not (tmp_path / "d.safetensors").exists() and left_behind(tmp_path) == []


def test_an_output_changed_before_its_rename_is_refused(tmp_path, monkeypatch):
    write_tensor = ff._write_tensor

    def and_then_corrupted(fd, *args):  # another process scribbles on the temporary file
        digest = write_tensor(fd, *args)
        position = os.lseek(fd, 0, os.SEEK_CUR)
        os.pwrite(fd, b"\xff", position - 1)
        return digest

    monkeypatch.setattr(ff, "_write_tensor", and_then_corrupted)
    out = tmp_path / "s.safetensors"
    with pytest.raises(FormatError, match=r"s\.safetensors: tensor '.+' reads back with checksum [0-9a-f]{16}, "):
        optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), out)
    assert not out.exists() and left_behind(tmp_path) == []


def test_an_output_whose_header_was_damaged_before_its_rename_is_refused(tmp_path, monkeypatch):
    pwrite = os.pwrite

    def damaged_header(fd, data, offset):
        return pwrite(fd, data[:-3] + b"}}}" if offset == 0 else data, offset)

    monkeypatch.setattr(ff.os, "pwrite", damaged_header)
    out = tmp_path / "s.safetensors"
    with pytest.raises(FormatError, match=r"s\.safetensors: the file written does not read back"):
        optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), out)
    assert not out.exists()


def test_a_torch_output_changed_before_its_rename_is_refused(tmp_path, monkeypatch):
    write_array = ptfile._ZipWriter._write_array

    def and_then_corrupted(self, array, *args):  # another process flips the array's last byte, once written
        digests = write_array(self, array, *args)
        if array.nbytes:
            at = os.lseek(self.fd, 0, os.SEEK_CUR) - 1
            os.pwrite(self.fd, bytes([os.pread(self.fd, 1, at)[0] ^ 0xFF]), at)
        return digests

    monkeypatch.setattr(ptfile._ZipWriter, "_write_array", and_then_corrupted)
    out = tmp_path / "out.pt"
    with pytest.raises(
        FormatError, match=r"out\.pt: record archive/data/\d+ reads back with checksum [0-9a-f]{16}, "
    ) as e:
        optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), out, dst_format="torch")
    assert "\n" not in str(e.value)
    assert not out.exists() and left_behind(tmp_path) == []


def test_a_torch_output_losing_a_record_before_its_rename_is_refused(tmp_path, monkeypatch):
    central_entry = ptfile._ZipWriter._central_entry

    def with_a_record_dropped(self, record, crc):  # the directory written without its last entry
        return b"" if record.name.endswith(b"serialization_id") else central_entry(self, record, crc)

    monkeypatch.setattr(ptfile._ZipWriter, "_central_entry", with_a_record_dropped)
    out = tmp_path / "out.pt"
    with pytest.raises(
        FormatError, match=r"out\.pt: the file written (reads back with other records|does not read back)"
    ):
        ptfile.save({"w": np.arange(3.0)}, out)
    assert not out.exists() and left_behind(tmp_path) == []


# ----------------------------------------------------------------------------- 3. --force over a sharded output


def sharded_state(tmp_path: Path, steps: int) -> optstate.OptimizerState:
    return read(adam_checkpoint(tmp_path / f"c{steps}.pt", steps=steps))


def test_force_over_a_sharded_output_keeps_the_old_one_readable_until_the_new_is_whole(tmp_path, monkeypatch):
    index = tmp_path / "s.safetensors.index.json"
    old = sharded_state(tmp_path, 2)
    save(old, index, max_shard_bytes=600)
    old_files = sorted(p.name for p in tmp_path.glob("s-*.safetensors"))
    assert len(old_files) > 1
    replace = atomic._replace

    def crash_before_the_index(tmp, path):  # the machine dies after the shards are in place
        if Path(path) == index:
            raise OSError("crash")
        replace(tmp, path)

    monkeypatch.setattr(atomic, "_replace", crash_before_the_index)
    with pytest.raises(OSError, match="crash"):
        save(sharded_state(tmp_path, 3), index, max_shard_bytes=600, force=True)
    monkeypatch.undo()
    assert load(index).common_step() == 2  # the old save, whole


def test_force_over_a_sharded_output_replaces_it_and_removes_the_old_shards(tmp_path):
    index = tmp_path / "s.safetensors.index.json"
    for steps in (2, 3, 4):  # the names alternate: Hugging Face's, then with the save's id, then Hugging Face's
        save(sharded_state(tmp_path, steps), index, max_shard_bytes=600, force=True)
        assert load(index).common_step() == steps
        listed = set(json.loads(index.read_text())["weight_map"].values())
        assert {p.name for p in tmp_path.glob("s-*.safetensors")} == listed


# ----------------------------------------------------------------------------- 4. untrusted bytes


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    path = adam_checkpoint(tmp_path / "ckpt.pt")
    with zipfile.ZipFile(path) as zf:
        records = {info.filename: zf.read(info) for info in zf.infolist()}
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w") as zf:
        for name, data in records.items():
            if name.endswith("data.pkl"):  # a valid pickle, then 8 MiB of padding, deflated to a few KiB
                zf.writestr(name, data + b"\0" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                zf.writestr(name, data)
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(ptfile, "MAX_RECORD_BYTES", 1 << 20)
    with pytest.raises(FormatError, match=r"bomb\.pt: record .*data\.pkl declares 838\d+ bytes \(stored in \d+\)"):
        ptfile.load(bomb)


@pytest.mark.parametrize("where", ["header", "metadata", "index"])
def test_json_nested_deeply_is_refused_clearly(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "index":
        path = tmp_path / "s.safetensors.index.json"
        path.write_text('{"metadata": {}, "weight_map": ' + deep + "}")
    else:
        if where == "header":
            header = ('{"__metadata__": {}, "x": ' + deep + "}").encode()
        else:
            header = json.dumps({"__metadata__": {"optstate": deep}}).encode()
        header += b" " * (-len(header) % 8)
        path = tmp_path / "s.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FormatError, match="JSON nested deeper than 64 levels"):
        load(path)
    # The refusal that convert makes before reading (output vs input) parses the index too.
    assert main(["convert", str(path), str(tmp_path / "out.pt")]) == 1


@pytest.mark.parametrize("junk", ["prepended", "appended"])
def test_junk_around_a_torch_zip_is_refused_naming_the_offset(tmp_path, junk):
    path = adam_checkpoint(tmp_path / "ckpt.pt")
    data = path.read_bytes()
    path.write_bytes(b"JUNK" * 25 + data if junk == "prepended" else data + b"JUNK" * 25)
    expected = (
        r"100 bytes before the zip's first record \(offset 0 to 100\)"
        if junk == "prepended"
        else rf"100 bytes after the zip's end record \(offset {len(data)} to {len(data) + 100}\)"
    )
    with pytest.raises(FormatError, match=r"ckpt\.pt: " + expected):
        read(path)


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_fifo_as_input_is_refused_before_opening(tmp_path, capsys, command):
    fifo = tmp_path / "f.pt"
    os.mkfifo(fifo)
    argv = [command, str(fifo)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    with no_hang():
        assert main(argv) == 1
    assert "f.pt: a named pipe (FIFO), not a regular file or a directory" in capsys.readouterr().err
    with no_hang(), pytest.raises(FormatError, match="named pipe"):
        read(fifo)


def test_a_symlink_to_a_regular_file_is_followed(tmp_path):
    src = adam_checkpoint(tmp_path / "blob")
    link = tmp_path / "ckpt.pt"
    link.symlink_to(src)  # as a Hugging Face hub cache links a snapshot's file to its blob
    optstate.convert(link, tmp_path / "s.safetensors")
    assert load(tmp_path / "s.safetensors").common_step() == 2


def test_every_unknown_global_of_a_pickle_is_named(tmp_path):
    pickled = (
        (pickle.PROTO + b"\x02" + b"cos\nsystem\n" + b"csubprocess\nPopen\n" + pickle.TUPLE2 + b"cos\nsystem\n")
        + pickle.TUPLE2
        + pickle.STOP
    )
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
    with pytest.raises(FormatError) as caught:
        ptfile.load(path)
    assert "unsupported global os.system; also unsupported: subprocess.Popen)" in str(caught.value)


# ----------------------------------------------------------------------------- 5. states that converted silently wrong


def without_step(sd):
    for entry in sd["state"].values():
        del entry["step"]


def test_adam_state_without_step_is_refused_naming_the_parameter(tmp_path):
    path = edited_optimizer(adam_checkpoint(tmp_path / "ckpt.pt"), without_step)
    with pytest.raises(FormatError, match=r"ckpt\.pt: weight: Adam state without 'step' .*--assume-step N"):
        read(path)


def test_assume_step_supplies_the_missing_step(tmp_path):
    path = edited_optimizer(adam_checkpoint(tmp_path / "ckpt.pt"), without_step)
    out = tmp_path / "s.safetensors"
    optstate.convert(path, out, assume_step=2)
    assert load(out).common_step() == 2
    assert main(["convert", str(path), str(tmp_path / "t.safetensors"), "--assume-step", "7"]) == 0
    assert load(tmp_path / "t.safetensors").common_step() == 7


def test_a_float32_step_above_2_24_warns(tmp_path):
    def far(sd):
        for entry in sd["state"].values():
            entry["step"] = torch.tensor(float(2**24 + 2), dtype=torch.float32)

    path = edited_optimizer(adam_checkpoint(tmp_path / "ckpt.pt"), far)
    with pytest.warns(UserWarning, match=r"step 16777218 is a float32 above 2\^24"):
        read(path)


def negative_second_moment(sd):
    sd["state"][0]["exp_avg_sq"][0, 0] = -1e-12


def test_a_negative_second_moment_is_refused_naming_the_parameter(tmp_path):
    path = edited_optimizer(adam_checkpoint(tmp_path / "ckpt.pt"), negative_second_moment)
    with pytest.raises(FormatError, match=r"ckpt\.pt: weight: slot 'second_moment' holds negative values"):
        read(path)


def test_allow_nonfinite_converts_a_diverged_run_and_records_it(tmp_path):
    def diverged(sd):
        negative_second_moment(sd)
        sd["state"][1]["exp_avg"][0] = float("nan")

    path = edited_optimizer(adam_checkpoint(tmp_path / "ckpt.pt"), diverged)
    out = tmp_path / "s.safetensors"
    optstate.convert(path, out, allow_nonfinite=True)
    state = load(out)
    assert state.metadata.nonfinite and "allow_nonfinite" in state.metadata.nonfinite
    assert state.slots[("second_moment", ("weight",))][0, 0] == -1e-12
    assert np.isnan(state.slots[("first_moment", ("bias",))][0])
    assert main(["convert", str(path), str(tmp_path / "t.safetensors"), "--allow-nonfinite"]) == 0
    assert state.metadata.nonfinite in optstate.inspect(out).notes  # what the file records, inspect shows


def test_a_state_that_never_stepped_says_the_output_is_fresh(tmp_path):
    path = adam_checkpoint(tmp_path / "ckpt.pt", steps=0)
    with pytest.warns(UserWarning, match="never stepped.*the output is a fresh state"):
        optstate.convert(path, tmp_path / "s.safetensors")


def test_float16_second_moments_warn(tmp_path):
    path = adam_checkpoint(tmp_path / "ckpt.pt", dtype=torch.float16)
    with pytest.warns(UserWarning, match="second moments are float16.*65504"):
        optstate.convert(path, tmp_path / "s.safetensors")


def test_a_healthy_state_converts_without_warnings(tmp_path):
    path = adam_checkpoint(tmp_path / "ckpt.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optstate.convert(path, tmp_path / "s.safetensors")


# ----------------------------------------------------------------------------- 6. signals during a write

OUTPUT_NAMES = {"optstate": "s.safetensors", "sharded": "s.safetensors.index.json", "torch": "s.pt"}


def write_sgd(fmt: str, out: Path, lr: float, progress=None) -> None:
    params = tuple(ParamInfo((f"p{i}",), (1000,), "float64", 0) for i in range(3))
    slots = {("momentum", p.path): np.full(1000, lr) for p in params}
    state = optstate.OptimizerState("sgd", ({"lr": lr, "momentum": 0.9},), params, slots)
    write(
        state,
        out,
        "torch" if fmt == "torch" else "optstate",
        force=True,
        progress=progress,
        max_shard_bytes=8000 if fmt == "sharded" else None,
    )


def paused_writer(fmt: str, point: str, out: Path, ready) -> None:
    """A child (forked: no imports to wait for) that writes, and sleeps at ``point`` until it is signalled."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a forked child inherits the test runner's handlers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def pause(*_):
        ready.set()
        time.sleep(60)

    with atomic.checked_before_commit(pause if point == "commit" else lambda: None):
        write_sgd(fmt, out, 0.25, progress=pause if point == "tensor" else None)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.endswith(".tmp")}


def test_kill_and_signal_matrix_leaves_the_previous_output_or_nothing(tmp_path):
    """SIGKILL, SIGTERM and SIGINT, after the first tensor and just before the rename, of every writer of
    optstate's own (canonical, sharded canonical, torch), fresh and over a previous output with --force: the
    destination is always absent or the previous output, byte for byte; SIGTERM and SIGINT leave no
    temporary file (SIGKILL may: ``.<name>.*.tmp``, which docs/reliability.md says how to recognise)."""
    fork = multiprocessing.get_context("fork")
    runs = []
    for fmt, point, signum, previous in itertools.product(
        OUTPUT_NAMES, ("tensor", "commit"), (signal.SIGKILL, signal.SIGTERM, signal.SIGINT), (False, True)
    ):
        d = tmp_path / f"{fmt}-{point}-{signum.name}-{'over' if previous else 'fresh'}"
        d.mkdir()
        out = d / OUTPUT_NAMES[fmt]
        if previous:
            write_sgd(fmt, out, 0.5)
        ready = fork.Event()
        child = fork.Process(target=paused_writer, args=(fmt, point, out, ready))
        child.start()
        runs.append((d, files_of(d), signum, child, ready))
    for d, _, signum, child, ready in runs:
        assert ready.wait(30), d.name
        assert any(p.name.endswith(".tmp") for p in d.iterdir()), d.name  # the write is under way
        os.kill(child.pid, signum)
    for d, before, signum, child, _ in runs:
        child.join(30)
        assert child.exitcode in (-signum, 1), (d.name, child.exitcode)
        assert files_of(d) == before, d.name
        if signum != signal.SIGKILL:
            assert left_behind(d) == [], d.name


# ----------------------------------------------------------------------------- speed: the in-kernel copy


def spied_copies(monkeypatch, module) -> list[int]:
    """The byte counts ``module``'s writer copies inside the kernel, one per tensor."""
    copied: list[int] = []
    copy_span = module.copy_span

    def spy(span, out, nbytes, sources):
        copied.append(copy_span(span, out, nbytes, sources))
        return copied[-1]

    monkeypatch.setattr(module, "copy_span", spy)
    return copied


def test_pt_tensors_are_copied_inside_the_kernel(tmp_path, monkeypatch):
    copied = spied_copies(monkeypatch, ff)
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)  # 2 MiB a matrix: above COPY_MIN_BYTES
    optstate.convert(src, tmp_path / "s.safetensors")
    assert copied.count(512 * 512 * 8) == 3  # exp_avg, exp_avg_sq and the weight: file to file
    assert load(tmp_path / "s.safetensors").common_step() == 1


def test_tensors_of_a_canonical_file_are_copied_inside_the_kernel_to_torch(tmp_path, monkeypatch):
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    optstate.convert(src, tmp_path / "s.safetensors")
    copied = spied_copies(monkeypatch, ptfile)
    optstate.convert(tmp_path / "s.safetensors", tmp_path / "back.pt", dst_format="torch")
    assert copied.count(512 * 512 * 8) == 3
    assert zipfile.ZipFile(tmp_path / "back.pt").testzip() is None  # every record's CRC-32, from the source's bytes
    before, after = read(src).slots, read(tmp_path / "back.pt").slots
    assert before.keys() == after.keys()
    for key, array in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(array))


def big_record(path: Path) -> tuple[zipfile.ZipInfo, int]:
    """The first tensor record of a torch zip of at least 1 MiB (copied in the kernel), and where its bytes start."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 1 << 20)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info, info.header_offset + 30 + name_length + extra_length


def test_a_pt_record_damaged_at_rest_is_refused_by_the_crc_its_zip_records(tmp_path, capsys):
    """A bit of a tensor flipped after torch.save wrote it (bit rot, a bad copy): torch.load reads it without a
    word, and optstate converted it with exit 0. A record copied whole is checked against the zip's CRC-32."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    info, start = big_record(src)
    with open(src, "r+b") as f:
        f.seek(start + 1000)
        byte = f.read(1)[0]
        f.seek(start + 1000)
        f.write(bytes([byte ^ 1]))
    torch.load(src, weights_only=True)  # torch does not check
    out = tmp_path / "s.safetensors"
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "ckpt.pt: tensor" in err and f"the input's zip records {info.CRC:08x} for its bytes" in err, err
    assert not out.exists() and left_behind(tmp_path) == []


def source_hashes(monkeypatch) -> list[str]:
    """The files the canonical writer hashes as sources (``file_checksums`` given a source's descriptor)."""
    hashed: list[str] = []
    file_checksums = ff.file_checksums

    def spy(path, spans, fd=None):
        if fd is not None:
            hashed.append(Path(path).name)
        return file_checksums(path, spans, fd)

    monkeypatch.setattr(ff, "file_checksums", spy)
    return hashed


def test_a_pt_record_copied_whole_is_checked_by_its_crc_not_read_twice(tmp_path, monkeypatch):
    """The read-back checks it against the CRC-32 its zip records: the source is not read again to hash it."""
    hashed = source_hashes(monkeypatch)
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    optstate.convert(src, tmp_path / "s.safetensors")
    assert hashed == []
    assert load(tmp_path / "s.safetensors").common_step() == 1  # every recorded checksum holds


def test_a_canonical_tensor_copied_whole_is_checked_by_its_recorded_checksum(tmp_path, monkeypatch):
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    optstate.convert(src, tmp_path / "s.safetensors")
    hashed = source_hashes(monkeypatch)
    optstate.convert(tmp_path / "s.safetensors", tmp_path / "sharded.safetensors", max_shard_bytes=3 << 20)
    assert hashed == []
    assert load(tmp_path / "sharded.safetensors.index.json").common_step() == 1


def test_a_pt_saved_without_crcs_has_its_source_hashed_beside_the_copy(tmp_path, monkeypatch):
    hashed = source_hashes(monkeypatch)
    torch.serialization.set_crc32_options(False)  # the zip then records 0 for every CRC-32
    try:
        src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    finally:
        torch.serialization.set_crc32_options(True)
    assert big_record(src)[0].CRC == 0
    optstate.convert(src, tmp_path / "s.safetensors")
    assert hashed == ["ckpt.pt"] * 3  # exp_avg, exp_avg_sq and the weight
    assert load(tmp_path / "s.safetensors").common_step() == 1


def torch_writer_source_reads(monkeypatch) -> list[str]:
    """The files the torch writer hashes as sources beside its copies."""
    hashed: list[str] = []
    file_crc32_xxh3 = ptfile.file_crc32_xxh3

    def spy(path, offset, nbytes, what, fd=None):
        if fd is not None:
            hashed.append(Path(path).name)
        return file_crc32_xxh3(path, offset, nbytes, what, fd)

    monkeypatch.setattr(ptfile, "file_crc32_xxh3", spy)
    return hashed


@pytest.mark.parametrize("source", ["s.safetensors", "ckpt.pt"])
def test_a_tensor_copied_whole_to_torch_is_checked_by_what_its_input_records(tmp_path, monkeypatch, source):
    """Canonical -> torch: the read-back must match the checksum the input records; .pt -> torch: its CRC-32.
    The source is not read a second time, and the output's CRC-32s are the ones read back."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    optstate.convert(src, tmp_path / "s.safetensors")
    hashed = torch_writer_source_reads(monkeypatch)
    optstate.convert(tmp_path / source, tmp_path / "back.pt", dst_format="torch")
    assert hashed == []
    assert zipfile.ZipFile(tmp_path / "back.pt").testzip() is None
    before, after = read(src).slots, read(tmp_path / "back.pt").slots
    for key, array in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(array))


def test_a_canonical_tensor_that_differs_from_its_checksum_is_refused_by_the_torch_writer(tmp_path, monkeypatch):
    """With the input's own check of its checksums out of the way, the torch writer's read-back still finds a
    tensor whose bytes differ from the checksum its file records."""
    src = adam_checkpoint(tmp_path / "ckpt.pt", width=512, steps=1)
    canonical = tmp_path / "s.safetensors"
    optstate.convert(src, canonical)
    layout, _, data_start = ff._read_layout(canonical)
    begin = next(begin for *_, begin, end in layout.values() if end - begin >= 1 << 20)
    with open(canonical, "r+b") as f:
        f.seek(data_start + begin + 100)
        byte = f.read(1)[0]
        f.seek(data_start + begin + 100)
        f.write(bytes([byte ^ 1]))
    monkeypatch.setattr(ff, "check_checksums", lambda *_args: None)
    with pytest.raises(FormatError, match=r"s.safetensors: record .* reads back with .* the input records checksum"):
        optstate.convert(canonical, tmp_path / "back.pt", dst_format="torch")
    assert not (tmp_path / "back.pt").exists() and left_behind(tmp_path) == []


# ----------------------------------------------------------------------------- 7. fuzzing the untrusted-bytes parsers

# A short, repeatable run in the suite; OPTSTATE_FUZZ_EXAMPLES=20000 for a long, random one (make fuzz).
LONG_FUZZ = int(os.environ.get("OPTSTATE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=LONG_FUZZ or 60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not LONG_FUZZ
)


def only_our_errors(parse, path: Path) -> None:
    """Any outcome but an exception that is not optstate's own: a traceback is a bug."""
    with suppress(OptstateError):
        parse(path)


@pytest.fixture(scope="module")
def valid_pt(tmp_path_factory) -> bytes:
    return adam_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt.pt", width=2).read_bytes()


def mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(edits=edits, cut=st.integers(0, 1 << 20))
def test_fuzz_the_torch_zip_reader(tmp_path_factory, valid_pt, edits, cut):
    path = tmp_path_factory.mktemp("z") / "f.pt"
    data = mutated(valid_pt, edits)
    path.write_bytes(data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data)
    only_our_errors(ptfile.load, path)
    only_our_errors(read, path)  # and what the torch reader makes of what it decoded


@FUZZ
@given(ops=st.binary(max_size=200), pick=st.data())
def test_fuzz_the_pickle_interpreter(tmp_path_factory, valid_pt, ops, pick):
    with zipfile.ZipFile(io.BytesIO(valid_pt)) as zf:
        pickled = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    at = pick.draw(st.integers(0, len(pickled)))
    body = pickled[:at] + ops + pickled[at:] if pick.draw(st.booleans()) else pickle.PROTO + b"\x02" + ops
    path = tmp_path_factory.mktemp("p") / "f.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", body)
        zf.writestr("archive/byteorder", "little")
    only_our_errors(read, path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(header=json_values | st.binary(max_size=200).map(lambda b: b.decode("latin-1")), data=st.binary(max_size=64))
def test_fuzz_the_safetensors_header(tmp_path_factory, header, data):
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode("utf-8", "surrogatepass")
    path = tmp_path_factory.mktemp("s") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    only_our_errors(load, path)


@FUZZ
@given(document=json_values, weight_map=st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_fuzz_the_index(tmp_path_factory, document, weight_map):
    d = tmp_path_factory.mktemp("i")
    (d / "s.safetensors.index.json").write_text(json.dumps({"metadata": document, "weight_map": weight_map}))
    only_our_errors(load, d / "s.safetensors.index.json")
    only_our_errors(lambda p: refuse_output_that_is_input(p, d / "out.pt"), d / "s.safetensors.index.json")


def test_a_directory_input_may_gain_and_lose_other_files_but_not_change_its_own(tmp_path):
    """A checkpoint directory (DCP here) gaining a file and losing another while it is read is not a change
    to what is read (a manager's next step saved, its oldest removed); a file of it rewritten is."""
    dcp = tmp_path / "dcp"
    optstate.convert(adam_checkpoint(tmp_path / "ckpt.pt"), dcp, dst_format="dcp")
    (dcp / "notes.txt").write_text("old")

    def rotate(path: Path) -> None:
        (path / "notes.txt").unlink()
        (path / "next-step.txt").write_text("new")

    optstate.convert(dcp, tmp_path / "a.safetensors", progress=rewriting_input(dcp, rotate))
    assert load(tmp_path / "a.safetensors").common_step() == 2
    data = next(p for p in dcp.iterdir() if p.suffix == ".distcp")

    def rewrite(path: Path) -> None:
        data.write_bytes(data.read_bytes())

    with pytest.raises(FormatError, match=r"\.distcp changed while it was read"):
        optstate.convert(dcp, tmp_path / "b.safetensors", progress=rewriting_input(dcp, rewrite))


@pytest.fixture(scope="module")
def valid_dcp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dcp")
    optstate.convert(adam_checkpoint(d / "ckpt.pt", width=2), d / "dcp", dst_format="dcp")
    return d / "dcp"


# Found by this fuzzer: a .metadata pickle that BUILDs a Metadata without its fields got past DCP's
# unpickler and failed in optstate/converters/torch/dcp.py's _check_metadata with an AttributeError.
@FUZZ
@given(edits=edits, cut=st.integers(0, 1 << 20))
def test_fuzz_the_dcp_metadata(tmp_path_factory, valid_dcp, edits, cut):
    d = tmp_path_factory.mktemp("d") / "dcp"
    d.mkdir()
    for f in valid_dcp.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    data = mutated((valid_dcp / ".metadata").read_bytes(), edits)
    (d / ".metadata").write_bytes(data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data)
    only_our_errors(lambda p: read(p, "dcp"), d)


@pytest.fixture(scope="module")
def valid_orbax(tmp_path_factory) -> Path:
    pytest.importorskip("orbax.checkpoint")
    d = tmp_path_factory.mktemp("orbax")
    optstate.convert(adam_checkpoint(d / "ckpt.pt", width=2), d / "orbax", dst_format="optax")
    return d / "orbax"


def json_replaced(data: bytes, pick) -> bytes:
    """``data`` (JSON) with one value somewhere in it (the whole document, at the least) replaced by any JSON value."""
    document = json.loads(data)
    parent, key, node = None, None, document
    while isinstance(node, dict | list) and node and pick.draw(st.booleans()):
        parent, key = node, pick.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]
    value = pick.draw(json_values)
    if parent is None:
        return json.dumps(value).encode()
    parent[key] = value
    return json.dumps(document).encode()


# Found by the fuzzer below: each was a traceback (UnicodeDecodeError; AttributeError or TypeError from a field
# of the wrong JSON type; AttributeError from Orbax's parser).
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("optstate.json", b"\x80{}"),
        ("optstate.json", b'{"format_version": 1, "optimizer": null}'),
        ("optstate.json", b'{"format_version": 1, "buffers": [[[]]]}'),
        ("_METADATA", b"null"),
        ("_METADATA", b'{"tree_metadata": null}'),
    ],
)
def test_orbax_metadata_of_the_wrong_shape_is_refused_in_one_line(tmp_path, valid_orbax, name, content):
    d = tmp_path / "orbax"
    shutil.copytree(valid_orbax, d)
    (d / name).write_bytes(content)
    with pytest.raises(FormatError) as e:
        read(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


ORBAX_METADATA = ("optstate.json", "_CHECKPOINT_METADATA", "_METADATA")


@FUZZ
@given(
    name=st.sampled_from(ORBAX_METADATA),
    edits=edits,
    cut=st.integers(0, 1 << 20),
    mode=st.integers(0, 2),
    pick=st.data(),
)
def test_fuzz_the_orbax_metadata(tmp_path_factory, valid_orbax, name, edits, cut, mode, pick):
    d = tmp_path_factory.mktemp("o") / "orbax"
    shutil.copytree(valid_orbax, d)
    data = (valid_orbax / name).read_bytes()
    if mode == 0:
        data = json_replaced(data, pick)
    elif mode == 1:
        data = mutated(data, edits)
    (d / name).write_bytes(data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 or mode == 2 else data)
    only_our_errors(read, d)
    only_our_errors(optstate.inspect, d)


def test_a_durable_output_is_written_back_while_it_is_written(tmp_path, monkeypatch):
    """The fsync before the rename waits for the last part only: the rest went to disk as the file grew."""
    synced = []
    write_back = atomic._write_back
    monkeypatch.setattr(atomic, "_FLUSH_EVERY", 1 << 20)
    monkeypatch.setattr(atomic, "_write_back", lambda fd: synced.append(os.fstat(fd).st_size) or write_back(fd))
    with atomic.atomic_file(tmp_path / "out.bin") as tmp, open(tmp, "wb") as f:
        for _ in range(4):
            f.write(b"\0" * (1 << 20))
            f.flush()
            deadline = time.monotonic() + 10
            while (not synced or synced[-1] < f.tell()) and time.monotonic() < deadline:
                time.sleep(0.01)
    assert synced[:4] == [1 << 20, 2 << 20, 3 << 20, 4 << 20]
    with atomic.atomic_file(tmp_path / "fast.bin", fsync=False) as tmp:
        tmp.write_bytes(b"\0" * (4 << 20))
        time.sleep(0.2)
    assert len(synced) == 4  # --no-fsync: nothing is written back


# ----------------------------------------------------------------------------- found by review (2026-12-07)


def safetensors_with(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_a_checksum_record_that_is_not_json_is_one_line(tmp_path, capsys):
    header = {
        "__metadata__": {ff.CHECKSUM_KEY: "{not json"},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    src = safetensors_with(tmp_path / "in.safetensors", header, bytes(8))
    assert main(["convert", str(src), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in.safetensors: {ff.CHECKSUM_KEY}: not valid JSON" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unknown dtype ['F32']"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "malformed shape [True, 2]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [False, True]}, "malformed data_offsets [False, True]"),
    ],
)
def test_a_header_entry_of_the_wrong_json_type_is_refused_naming_it(tmp_path, entry, named):
    """A list where a dtype name belongs was looked up in a dict (TypeError); true and false passed as ints."""
    src = safetensors_with(tmp_path / "in.safetensors", {"w": entry}, bytes(8 if entry["dtype"] != "U8" else 1))
    with pytest.raises(FormatError, match=rf"in.safetensors: tensor 'w': {__import__('re').escape(named)}"):
        optstate.inspect(src)


def test_a_mapped_input_that_ends_inside_a_value_is_an_error(tmp_path):
    from optstate.schema.mapped import shared_file_mappings, values_read

    f = tmp_path / "v.bin"
    np.arange(4.0).tofile(f)
    mapped = np.memmap(f, dtype="<f8", mode="r")
    mappings = shared_file_mappings()
    os.truncate(f, 20)  # another process cuts it two and a half values in
    with pytest.raises(FormatError, match=r"v.bin: ends before byte 32 of w's exp_avg"):
        list(values_read(mapped, mappings, "w's exp_avg"))


def test_ctrl_c_while_waiting_for_the_checks_stops_them(tmp_path):
    """A write that failed waits for the input's checks (their failure is the cause); Ctrl-C then must not wait
    for the rest of the input to be hashed."""

    def slow_check():  # a long hash of the input: stops early only when cancelled
        for _ in range(100):
            if atomic.cancelled():
                raise OptstateError("cancelled")
            time.sleep(0.05)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), atomic.checks_in_background():
        atomic.check_soon(slow_check)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        raise OptstateError("the write failed (disk full)")
    assert time.monotonic() - started < 2.5  # the check alone runs 5 s


SWAPPED_BY_TWO_RENAMES = """
import os, signal, sys
from optstate import atomic
atomic._exchanged = lambda a, b: False  # a file system without RENAME_EXCHANGE
rename = os.rename
def signalled_rename(a, b):
    os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM while the previous output is moved aside
    return rename(a, b)
atomic.os.rename = signalled_rename
with atomic.atomic_directory(sys.argv[1], force=True, fsync=False) as tmp:
    tmp.mkdir(); (tmp / "new").write_text("new output")
"""


def test_a_signal_between_the_two_renames_of_a_directory_leaves_nothing_aside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous output")
    done = subprocess.run([sys.executable, "-c", SWAPPED_BY_TWO_RENAMES, str(out)], timeout=60)
    assert done.returncode == -signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* holding the previous output
    assert [p.name for p in out.iterdir()] == ["new"]


def test_a_failed_second_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous output")
    monkeypatch.setattr(atomic, "_exchanged", lambda a, b: False)
    rename = os.rename

    def failing(a, b):
        if Path(a).parent.name.endswith(".tmp"):  # the new output, from its temporary directory
            raise OSError(5, "Input/output error")
        return rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"), atomic.atomic_directory(out, force=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old").read_text() == "previous output"


def test_shards_renamed_before_a_failure_are_removed_with_it(tmp_path, monkeypatch):
    """The shards are renamed before the index: a failure in between must not leave shards that no index names
    (a later run would find their names taken, and nothing would ever remove them)."""

    def failing_fsync_dir(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "_fsync_dir", failing_fsync_dir)
    tensors = [("a", np.zeros(4)), ("b", np.ones(4))]
    with pytest.raises(OSError, match="Input/output error"):
        ff.write_sharded(tmp_path / "w.safetensors", tensors, {}, max_shard_bytes=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["0", "0.1B", "-5GB", "inf"])
def test_a_shard_size_that_is_not_positive_is_refused_as_a_usage_error(tmp_path, capsys, size):
    """It ended in a ValueError traceback from the shard planner."""
    with pytest.raises(SystemExit) as exited:
        main(["convert", f"--max-shard-size={size}", str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors")])
    assert exited.value.code == 2
    assert f"--max-shard-size: not a size: '{size}'" in capsys.readouterr().err
