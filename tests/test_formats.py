"""The format registry: one row per format, and everything that lists or picks formats reads the rows."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest

import optstate
from optstate import api
from optstate.cli import main
from optstate.converters import formats, import_function
from optstate.converters.formats import Format, ReadOptions, WriteOptions
from optstate.converters.torch import state_dict as torch_dict
from optstate.schema import OptimizerState, ParamInfo, fileformat


def _state() -> OptimizerState:
    return OptimizerState(
        "sgd",
        ({"lr": 0.1, "momentum": 0.9},),
        (ParamInfo(("w",), (2,), "float32", 0, None),),
        {("momentum", ("w",)): np.arange(2, dtype=np.float32)},
    )


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry that a test may add to."""
    monkeypatch.setattr(formats, "_REGISTRY", dict(formats._REGISTRY))


def test_a_name_is_registered_once(registry):
    with pytest.raises(ValueError, match="a format named 'torch' is already registered"):
        formats.register(Format("torch", "another torch", reader="m:read"))
    assert formats.names() == (
        "torch",
        "dcp",
        "hf-trainer",
        "accelerate",
        "deepspeed",
        "lightning",
        "optax",
        "nnx",
        "train-state",
        "optstate",
    )


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(
        optstate.OptstateError,
        match=r"unknown format 'keras' \(known: torch, dcp, hf-trainer, accelerate, deepspeed, lightning, optax, "
        r"nnx, train-state, optstate\)",
    ):
        formats.get("keras")


def test_a_row_names_functions_as_module_colon_function():
    with pytest.raises(ValueError, match="not 'module:function'"):
        Format("npz", "NumPy archive", reader="optstate.npz.read")


@pytest.mark.parametrize("name", ["c.pt", "c.pth", "c.ckpt", "pytorch_model.bin", "dir.d/c.pt"])
def test_torch_files_by_suffix(name):
    assert formats.detect(name) == "torch"


@pytest.mark.parametrize("name", ["s.safetensors", "s.safetensors.index.json"])
def test_canonical_files_by_suffix(name):
    assert formats.detect(name) == "optstate"


def test_directories(tmp_path):
    assert formats.detect(tmp_path) == "optax"
    assert formats.detect(f"{tmp_path}/not-yet/") == "optax"  # a directory still to be written
    (tmp_path / "c.pt").mkdir()
    assert formats.detect(tmp_path / "c.pt") == "optax"  # a directory is not a file, whatever its name
    (tmp_path / ".metadata").write_bytes(b"")
    assert formats.detect(tmp_path) == "dcp"  # a marker file outranks "any directory"
    for trainers_file in ("latest", "optimizer.bin", "trainer_state.json"):
        (tmp_path / trainers_file).write_bytes(b"")
    assert formats.detect(tmp_path) == "dcp"  # DCP inside a trainer's directory is DCP, as before trainers
    (tmp_path / ".metadata").unlink()
    assert formats.detect(tmp_path) == "hf-trainer"  # then the first trainer row that recognises it


def test_a_name_that_says_nothing_is_refused_naming_the_formats(tmp_path):
    for name in ("weights.txt", ".pt", tmp_path / "no-such-thing"):
        with pytest.raises(
            optstate.OptstateError,
            match=r"cannot tell its format from the name; "
            r"name it \(--from/--to torch\|dcp\|hf-trainer\|accelerate\|deepspeed\|lightning\|optax\|nnx\|"
            r"train-state\|optstate\)",
        ):
            formats.detect(name)


@pytest.mark.parametrize("name", formats.names())
def test_every_row_names_real_functions_of_the_uniform_signature(name):
    fmt = formats.get(name)
    if fmt.framework is not None:
        pytest.importorskip(fmt.framework.module)
    assert list(inspect.signature(import_function(fmt.reader)).parameters) == ["path", "options"]
    if fmt.writer is not None:
        assert list(inspect.signature(import_function(fmt.writer)).parameters) == ["state", "path", "options"]
    for hook in (fmt.process_setup, fmt.inspector):
        if hook is not None:
            assert callable(import_function(hook))


def test_formats_read_and_write_through_their_rows(tmp_path):
    for name, path in (("optstate", tmp_path / "s.safetensors"), ("torch", tmp_path / "c.pt")):
        formats.get(name).write(_state(), path, WriteOptions(fsync=False))
        back = formats.get(name).read(path, ReadOptions())
        assert back.slots[("momentum", ("w",))].tolist() == [0.0, 1.0]


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _choices(text: str, option: str) -> list[str]:
    found = re.search(option + r" \{([^}]*)\}", text)
    assert found is not None, text
    return found.group(1).split(",")


def test_convert_help_lists_exactly_the_registered_formats(capsys):
    text = _help(capsys)
    assert _choices(text, "--from") == list(formats.names())
    assert _choices(text, "--to") == list(formats.writable())
    for name in formats.names():
        assert f"{name} ({formats.get(name).description})" in " ".join(text.split())


def test_a_new_format_is_one_row(registry, tmp_path, capsys):
    """A format registered from outside is detected, read, written, converted and offered by the command line."""
    formats.register(
        Format(
            "renamed",
            "the canonical file under another name",
            suffixes=(".state",),
            reader="test_formats:read_renamed",
            writer="test_formats:write_renamed",
        )
    )
    fileformat.save(_state(), tmp_path / "s.safetensors")
    assert api.detect_format(tmp_path / "s.state") == "renamed" and "renamed" in api.FORMATS
    optstate.convert(tmp_path / "s.safetensors", tmp_path / "s.state")
    assert optstate.convert(tmp_path / "s.state", tmp_path / "back.safetensors").optimizer == "sgd"
    assert "renamed" in _choices(_help(capsys), "--to")


def read_renamed(path, options: ReadOptions) -> OptimizerState:
    return fileformat.read(path, options)


def write_renamed(state: OptimizerState, path, options: WriteOptions) -> None:
    fileformat.write(state, path, options)


def test_a_read_only_format_is_not_offered_for_writing(registry, tmp_path, capsys):
    formats.register(Format("readonly", "read only", reader="test_formats:read_renamed"))
    assert "readonly" in formats.names() and "readonly" not in formats.writable()
    with pytest.raises(optstate.OptstateError, match="the readonly format is read only"):
        api.write(_state(), tmp_path / "x", "readonly")
    assert "readonly" not in _choices(_help(capsys), "--to")


def test_inspect_reads_a_torch_file_once(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    torch_dict.save_torch_file(_state(), path)
    reads = []
    read = torch_dict.read_torch_file

    def counted(p):
        reads.append(p)
        return read(p)

    monkeypatch.setattr(torch_dict, "read_torch_file", counted)
    assert optstate.inspect(path).optimizer == "SGD"
    assert reads == [str(path)]


BLOCKED = """
import sys
sys.modules["{module}"] = None  # as if not installed
from optstate import api, MissingDependencyError
try:
    api.read("{path}", "{fmt}")
except MissingDependencyError as exc:
    print(exc)
else:
    raise SystemExit("no error")
"""


@pytest.mark.parametrize("fmt, module, extra", [("dcp", "torch", "torch"), ("optax", "orbax", "jax")])
def test_a_missing_framework_names_the_extra(fmt, module, extra, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", BLOCKED.format(module=module, path=tmp_path, fmt=fmt)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert f"the {fmt} format needs" in run.stdout and f"pip install 'optstate[{extra}]'" in run.stdout


def test_the_optax_format_sets_a_converting_process_up_for_float64():
    pytest.importorskip("orbax.checkpoint")
    code = (
        "import jax; from optstate.converters import formats; formats.get('optax').set_up_process(); "
        "assert jax.config.jax_enable_x64"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
