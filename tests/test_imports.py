"""``import optstate`` needs NumPy only; an adapter without its framework names the extra to install."""

import subprocess
import sys

CHECK = """
import sys
import optstate
heavy = sorted(m for m in ("torch", "jax", "optax", "orbax") if m in sys.modules)
assert not heavy, heavy
"""

BLOCKED = """
import sys
sys.modules["{module}"] = None  # as if not installed
import optstate
try:
    optstate.{function}
except optstate.MissingDependencyError as exc:
    print(exc)
else:
    raise SystemExit("no error")
"""


def _run(code):
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_import_optstate_imports_no_framework():
    _run(CHECK)


def test_missing_torch_names_the_extra():
    assert "pip install 'optstate[torch]'" in _run(BLOCKED.format(module="torch", function="from_torch"))


def test_missing_jax_names_the_extra():
    assert "pip install 'optstate[jax]'" in _run(BLOCKED.format(module="optax", function="optax_transform"))
