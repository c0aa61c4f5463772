"""Without torch and JAX: ``import optstate``, the torch-free ``.pt`` reader, the canonical file and the CLI work.

Each check runs in a fresh interpreter, so it holds in both legs of ``make test``: in the NumPy-only one nothing
else could be imported, and in the full one it proves that these paths leave the installed frameworks alone.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FRAMEWORKS = ("torch", "jax", "optax", "flax", "orbax")

READ_SAVE_LOAD = """
import sys
import numpy as np
import optstate

for name, out in zip(sys.argv[1::2], sys.argv[2::2]):
    state = optstate.from_torch_file(name)
    assert state.optimizer == "adamw", state.optimizer
    assert state.params and state.slots and state.weights, name
    optstate.save(state, out)
    back = optstate.load(out)
    assert (back.optimizer, back.param_groups, back.params) == (state.optimizer, state.param_groups, state.params)
    for arrays, back_arrays in ((state.slots, back.slots), (state.weights, back.weights)):
        assert list(back_arrays) == list(arrays), name
        for key, array in arrays.items():
            array = np.asarray(array)
            assert back_arrays[key].dtype == array.dtype and back_arrays[key].tobytes() == array.tobytes(), key
    print(name, len(state.params), len(state.slots))

loaded = sorted(m for m in sys.modules if m.split(".")[0] in {frameworks!r})
assert not loaded, loaded
"""


def _installed(framework: str) -> bool:
    return importlib.util.find_spec(framework) is not None


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _frameworks_imported(importtime: str) -> list[str]:
    """The frameworks among the modules that ``python -X importtime`` listed (``... | cumulative | name``)."""
    names = [line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")]
    return sorted({name.split(".")[0] for name in names} & set(FRAMEWORKS))


@pytest.mark.parametrize("example", ["mlp_adamw.pt", "gpt_adamw.pt"])
def test_bundled_torch_file_is_read_saved_and_loaded_without_a_framework(example, tmp_path):
    code = READ_SAVE_LOAD.format(frameworks=FRAMEWORKS)
    done = _run(["-c", code, str(EXAMPLES / example), str(tmp_path / "state.safetensors")])
    assert done.stdout.startswith(str(EXAMPLES / example))


def test_cli_inspects_and_converts_a_torch_file_without_torch(tmp_path):
    """Without torch, whatever else is installed. ``inspect`` imports JAX only to tell whether Optax could continue
    the state, and only where JAX is installed: where it is not, that line says so."""
    pt = str(EXAMPLES / "gpt_adamw.pt")
    done = _run(["-X", "importtime", "-m", "optstate", "inspect", pt])
    assert "optimizer: AdamW, 29 parameters" in done.stdout
    assert "torch" not in _frameworks_imported(done.stderr)

    canonical = str(tmp_path / "gpt.safetensors")
    done = _run(["-X", "importtime", "-m", "optstate", "convert", "--from", "torch", "--to", "optstate", pt, canonical])
    assert _frameworks_imported(done.stderr) == []
    done = _run(["-X", "importtime", "-m", "optstate", "inspect", "--json", canonical])
    assert "torch" not in _frameworks_imported(done.stderr)
    report = json.loads(done.stdout)
    assert (report["format"], report["optimizer"], report["weights"]["tensors"]) == ("optstate", "AdamW", 29)
    assert [group["params"] for group in report["param_groups"]] == [9, 20]


def test_cli_needs_no_framework_where_none_is_installed(tmp_path):
    if any(_installed(framework) for framework in FRAMEWORKS):
        pytest.skip("a framework is installed: the NumPy-only leg (make test-numpy) runs this")
    pt = str(EXAMPLES / "mlp_adamw.pt")
    done = _run(["-m", "optstate", "inspect", pt])
    assert "to Optax: not checked (install optstate[jax])" in done.stdout
    done = _run(
        ["-m", "optstate", "convert", "--from", "torch", "--to", "optstate", pt, str(tmp_path / "s.safetensors")]
    )
    assert "AdamW" in done.stdout


def test_importtime_parsing_sees_a_framework_when_one_is_imported():
    """The check above could pass by reading nothing: here it must find the module it is shown."""
    line = "import time:       120 |        340 |   torch._C"
    assert _frameworks_imported("import time: self [us] | cumulative | imported package\n" + line) == ["torch"]
