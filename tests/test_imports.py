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


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as if not installed: a JAX user's machine
from optstate.cli import main
assert main(["inspect", "{ckpt}"]) == 0
assert main(["convert", "{ckpt}", "{out}"]) == 0
assert main(["convert", "{out}", "{out}.pt"]) == 0  # and back to a torch file
"""


def test_a_torch_checkpoint_is_inspected_and_converted_without_torch(tmp_path):
    from pathlib import Path

    ckpt = Path(__file__).parent.parent / "examples" / "mlp_adamw.pt"
    out = _run(WITHOUT_TORCH.format(ckpt=ckpt, out=tmp_path / "s.safetensors"))
    assert "AdamW" in out and (tmp_path / "s.safetensors.pt").exists()


WITHOUT_ML_DTYPES = """
import sys
import optstate
optstate.convert("{ckpt}", "{out}")
optstate.convert("{out}", "{out}.pt")
assert "ml_dtypes" not in sys.modules  # 0.7 s to import: only a bfloat16 or float8 state needs it
"""


def test_a_float32_conversion_does_not_import_ml_dtypes(tmp_path):
    from pathlib import Path

    ckpt = Path(__file__).parent.parent / "examples" / "mlp_adamw.pt"
    _run(WITHOUT_ML_DTYPES.format(ckpt=ckpt, out=tmp_path / "s.safetensors"))


def test_a_bfloat16_tensor_is_read_in_a_process_that_had_not_imported_ml_dtypes(tmp_path):
    import ml_dtypes
    import numpy as np

    from optstate.converters.torch import ptfile

    ptfile.save({"w": np.arange(3, dtype=ml_dtypes.bfloat16)}, tmp_path / "b.pt")
    read = "from optstate.converters.torch import ptfile; print(ptfile.load({path!r})['w'].dtype)"
    assert _run(read.format(path=str(tmp_path / "b.pt"))).strip() == "bfloat16"
