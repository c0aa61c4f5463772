"""The README's command-line and library examples run as written."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from optstate.cli import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_examples_run(tmp_path, monkeypatch):
    for framework in ("torch", "jax", "optax", "flax", "orbax"):  # the examples use them all
        pytest.importorskip(framework)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    commands = re.findall(r"^\$ optstate (.+)$", README, flags=re.M)
    assert len(commands) >= 4
    for command in commands:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(shlex.split(command, comments=True)) == 0, command
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    assert out.getvalue().strip() == "tensor(30.)"


def test_support_matrix_is_current():
    pytest.importorskip("optax")  # the matrix says what Optax continues: optstate/converters/jax/ knows
    from optstate.support import support_matrix

    assert (ROOT / "docs" / "support.md").read_text() == support_matrix(), (
        "run: python -m optstate.support > docs/support.md"
    )
