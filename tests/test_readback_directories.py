"""Directory outputs are read back before their rename (issue 15): DCP, Orbax (optax, nnx, train-state) and the
trainer directories (hf-trainer, accelerate, deepspeed). A file of the temporary directory changed after the write
and before the rename (by another process, a bad disk) is refused in one line naming the file, the tensor or
array, and the checksums written and read; the output does not appear, and a previous output stays as it was.

The damage is done where the existing reliability tests do theirs: in a check registered with
``atomic.checked_before_commit`` around the conversion, which runs before the writer's own read-back, just
before the rename. Each test here converts with exit 0 and a damaged output without the read-back.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import torch

import optstate
from optstate import atomic
from optstate.errors import FormatError


@dataclass(frozen=True)
class Output:
    """A directory format under test: the conversion's options, a file its writer writes after the file holding
    the first moment of 'weight' (the directory is then whole), how its refusal names that tensor, and the
    options that read the output back."""

    options: dict
    marker: str
    refusal: str
    read: dict = field(default_factory=dict)
    dtype: str = "float64"


CHANGED = r"reads back with checksum [0-9a-f]{16}, written with [0-9a-f]{16} "
OUTPUTS: dict[str, Output] = {
    "dcp": Output(
        {"dst_format": "dcp"}, ".metadata", rf"out/__0_0\.distcp: tensor optimizer\.state\.weight\.exp_avg {CHANGED}"
    ),
    "optax": Output({"dst_format": "optax"}, "optstate.json", rf"out: array opt_state\.\S+\.mu\.weight {CHANGED}"),
    "optax-step": Output(
        {"dst_format": "optax", "step": 2},
        "optstate.json",
        rf"out/2/default: array opt_state\.\S+\.mu\.weight {CHANGED}",
        {"step": 2},
    ),
    "nnx": Output(
        {"dst_format": "nnx"}, "optstate.json", rf"out: array optimizer\.opt_state\.\S+\.mu\.weight\.value {CHANGED}"
    ),
    "train-state": Output(
        {"dst_format": "train-state"}, "optstate.json", rf"out: array opt_state\.\S+\.mu\.weight {CHANGED}"
    ),
    "hf-trainer": Output(
        {"dst_format": "hf-trainer", "model": "test_readback_directories:linear"},
        "trainer_state.json",
        rf"out/optimizer\.pt: record archive/data/\d+ {CHANGED}",
        {"model": "test_readback_directories:linear"},
    ),
    "accelerate": Output(
        {"dst_format": "accelerate"}, "optimizer.bin", rf"out/optimizer\.bin: record archive/data/\d+ {CHANGED}"
    ),
    "deepspeed": Output(
        {"dst_format": "deepspeed", "world_size": 2},
        "latest",
        rf"out/global_step2/zero_pp_rank_\d_mp_rank_00_optim_states\.pt: record archive/data/\d+ {CHANGED}",
        dtype="float32",  # ZeRO keeps fp32 optimizer state
    ),
}


def linear(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The model the Trainer resumes with (``--model``): the Linear of :func:`adamw_checkpoint`."""
    return torch.nn.Linear(8, 8).to(dtype)


def adamw_checkpoint(path: Path, dtype: torch.dtype) -> Path:
    """A real torch checkpoint: AdamW on a Linear, two steps, in the Trainer's two param groups (decay on the
    weight, none on the bias)."""
    torch.manual_seed(0)
    model = linear(dtype)
    groups = [
        {"params": [("weight", model.weight)], "weight_decay": 0.01},
        {"params": [("bias", model.bias)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 8, dtype=dtype)).pow(2).sum().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, bytes]]:
    """By dtype, the checkpoint and the first bytes of its first moment of 'weight' (found as they are in every
    output but Orbax's, which compresses them)."""
    found = {}
    for dtype in (torch.float64, torch.float32):
        path = adamw_checkpoint(tmp_path_factory.mktemp("src") / "ckpt.pt", dtype)
        exp_avg = torch.load(path, weights_only=True)["optimizer"]["state"][0]["exp_avg"]
        found[str(dtype).removeprefix("torch.")] = path, exp_avg.numpy().tobytes()[:64]  # within one ZeRO partition
    return found


def convert(src: Path, out: Path, **options) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the writers' advice (torch layout, TrainingArguments, no scheduler)
        optstate.convert(src, out, **options)


def temporary_outputs(root: Path) -> Iterator[Path]:
    """The temporary directories of outputs being written under ``root`` (atomic_directory's
    ``.<name>.*.tmp/<name>``; a CheckpointManager's step too, inside its root)."""
    for holder in sorted(root.rglob(".*.tmp")):
        if holder.is_dir():
            yield from (p for p in holder.iterdir() if p.is_dir())


def flip_a_byte_of(directory: Path, needle: bytes) -> Path | None:
    """Flip one byte in the middle of ``needle`` in the file under ``directory`` that holds it; that file."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = bytearray(path.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at + len(needle) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            return path
    return None


@contextmanager
def changed_before_the_rename(out: Path, change: Callable[[Path], Path | None]) -> Iterator[list[Path]]:
    """Run ``change(temporary directory)`` once, at the first commit of an atomic write in the block where it
    finds what it changes (the directory's: the files inside it are written, and committed, before it is whole);
    yields the files changed."""
    changed: list[Path] = []

    def check() -> None:
        for tmp in temporary_outputs(out.parent):
            if not changed and (path := change(tmp)) is not None:
                changed.append(path)

    with atomic.checked_before_commit(check):
        yield changed


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def rewrite_in_orbax(tmp: Path) -> Path | None:
    """Another process rewrites an array of an Orbax checkpoint: the first moment of 'weight', one element negated,
    through TensorStore as Orbax reads it (the arrays are compressed: their bytes are not in the files as such)."""
    item = next((p.parent for p in tmp.rglob("_METADATA")), None)
    if item is None or not (item / "optstate.json").is_file():
        return None
    names = [leaf.name for leaf in jax.tree_util.tree_leaves(ocp.PyTreeCheckpointHandler().metadata(item).tree)]
    name = next(n for n in names if re.search(r"mu\.weight(\.value)?$", n))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=item, use_zarr3=False, ts_context=context)
    store = ts.open(
        ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True), context=context, read=True, write=True
    ).result()
    array = store.read().result()
    array[0, 0] = -array[0, 0]
    store.write(array).result()
    return item / name


def the_moment_once_whole(needle: bytes, marker: str) -> Callable[[Path], Path | None]:
    """Change the first moment's bytes, once the directory holds ``marker`` (a file written after the tensors)."""
    if marker == "optstate.json":  # an Orbax checkpoint
        return rewrite_in_orbax
    return lambda tmp: flip_a_byte_of(tmp, needle) if any(tmp.rglob(marker)) else None


def refused(output: Output, source: Path, out: Path, change: Callable[[Path], Path | None], **force) -> str:
    """Convert with ``change`` made to the temporary directory before the rename; the refusal's message."""
    with changed_before_the_rename(out, change) as changed, pytest.raises(FormatError, match=output.refusal) as error:
        convert(source, out, **output.options, **force)
    assert changed, "the test changed nothing: the first moment was not found in the output"
    return str(error.value)


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_a_tensor_changed_before_the_rename_is_refused_and_no_output_appears(sources, tmp_path, fmt):
    output = OUTPUTS[fmt]
    src, moment = sources[output.dtype]
    out = tmp_path / "out"
    message = refused(output, src, out, the_moment_once_whole(moment, output.marker))
    assert "\n" not in message and ".tmp" not in message and str(out) in message  # one line, naming the output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["dcp", "optax", "nnx", "hf-trainer"])
def test_a_previous_output_stays_as_it_was(sources, tmp_path, fmt):
    """--force over a good output: the same conversion, not damaged, reads back; damaged, it is refused and the
    good output is untouched."""
    output = OUTPUTS[fmt]
    src, moment = sources[output.dtype]
    out = tmp_path / "out"
    convert(src, out, **output.options)  # not refused: the read-back of an intact output passes
    before = files_of(out)
    refused(output, src, out, the_moment_once_whole(moment, output.marker), force=True)
    assert files_of(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def _edit_json(name: str, key: str) -> Callable[[Path], Path | None]:
    """Change one value of a JSON file the writer wrote beside the tensors, keeping it valid JSON."""

    def edit(tmp: Path) -> Path | None:
        path = next(tmp.rglob(name), None)
        if path is None:
            return None
        document = json.loads(path.read_text())
        document[key] = "edited"
        path.write_text(json.dumps(document))
        return path

    return edit


@pytest.mark.parametrize(
    ("fmt", "name", "key"), [("hf-trainer", "trainer_state.json", "global_step"), ("nnx", "optstate.json", "source")]
)
def test_a_json_file_changed_before_the_rename_is_refused(sources, tmp_path, fmt, name, key):
    output = OUTPUTS[fmt]
    edited = Output(output.options, name, rf"out/{name}: reads back with (checksum [0-9a-f]{{16}}|\d+ bytes), written ")
    out = tmp_path / "out"
    refused(edited, sources[output.dtype][0], out, _edit_json(name, key))
    assert not out.exists()


def test_a_file_added_to_a_trainer_directory_before_the_rename_is_refused(sources, tmp_path):
    def add(tmp: Path) -> Path | None:
        if not (tmp / "trainer_state.json").is_file():
            return None
        (tmp / "stray.bin").write_bytes(b"x")
        return tmp / "stray.bin"

    output = OUTPUTS["hf-trainer"]
    added = Output(output.options, "", r"out: the directory written reads back with other files .*stray\.bin added")
    refused(added, sources["float64"][0], tmp_path / "out", add)
    assert not (tmp_path / "out").exists()


def test_orbax_data_files_damaged_before_the_rename_are_refused(sources, tmp_path):
    """A bad disk: one byte of each of Orbax's (compressed) data files flipped; refused, in TensorStore's words."""

    def flip(tmp: Path) -> Path | None:
        if not (tmp / "optstate.json").is_file():
            return None
        for path in tmp.glob("**/d/*"):  # the merged store's and the process's: which one is read is Orbax's affair
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            path.write_bytes(bytes(blob))
        return tmp

    output = OUTPUTS["optax"]
    unreadable = (
        r"out: (array \S+ does not read back|array \S+ reads back with checksum|the checkpoint written does not)"
    )
    refused(Output(output.options, "", unreadable), sources["float64"][0], tmp_path / "out", flip)
    assert not (tmp_path / "out").exists()


def test_a_dcp_blob_whose_pickle_changed_is_refused(sources, tmp_path):
    """The tensors' bytes intact, one blob's pickle (what dcp.load unpickles to rebuild the tensor) damaged."""

    def damage_a_pickle(tmp: Path) -> Path | None:
        return flip_a_byte_of(tmp, b"_rebuild_tensor_v2") if (tmp / ".metadata").is_file() else None

    output = OUTPUTS["dcp"]
    damaged = Output(output.options, "", r"out/__0_0\.distcp: \S+ \(bytes \d+\.\.\d+\): Bad CRC-32 for file")
    refused(damaged, sources["float64"][0], tmp_path / "out", damage_a_pickle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_an_intact_output_reads_back_as_the_source(sources, tmp_path, fmt):
    """The read-back refuses nothing that is whole: the output converts, and reads back the source's moments."""
    output = OUTPUTS[fmt]
    src, _ = sources[output.dtype]
    convert(src, tmp_path / "out", **output.options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' advice (DeepSpeed's gradient clipping)
        back, want = optstate.api.read(tmp_path / "out", **output.read), optstate.api.read(src)
    moment = ("first_moment", ("weight",))
    np.testing.assert_array_equal(np.asarray(back.slots[moment]), np.asarray(want.slots[moment]))
