"""A file's folder says what it may import, checked on every file the folders hold.

* NumPy only: optstate/*.py (the API, the CLI, the report, ...), optstate/schema/, optstate/converters/formats.py,
  optstate/converters/readback.py, converters/schedules/, converters/layout/, and of converters/torch/ the torch-free
  state_dict.py and ptfile.py.
  Each is imported in an interpreter where torch, JAX, Optax, Flax and Orbax cannot be imported.
* converters/torch/ (the rest) may import torch, never JAX; converters/jax/ may import JAX, never torch, nor
  the torch side's modules that import it. Read from the source: imports at module level, the ones that run when
  the module is imported (a function may import what it needs when it runs).

The modules are found by walking the folders, so a new file is held to its folder's rule without editing this test.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "optstate"
FRAMEWORKS = ("torch", "jax", "optax", "flax", "orbax")
JAX_SIDE = ("jax", "optax", "flax", "orbax")
# The torch side's readers that work without torch: the .pt format and the trainers' directories.
TORCH_FREE_TORCH_MODULES = ("state_dict.py", "ptfile.py", "hf_trainer.py", "accelerate.py", "deepspeed.py")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def files_in(folder: str, *, recursive: bool = True) -> list[Path]:
    base = PACKAGE / folder
    return sorted(base.rglob("*.py") if recursive else base.glob("*.py"))


def numpy_only_files() -> list[Path]:
    files = [p for p in files_in(".", recursive=False) if p.name != "__main__.py"]  # __main__ runs the CLI
    files += files_in("schema") + files_in("converters/schedules") + files_in("converters/layout")
    files += [PACKAGE / "converters" / "__init__.py", PACKAGE / "converters" / "torch" / "__init__.py"]
    files += [PACKAGE / "converters" / "torch" / name for name in TORCH_FREE_TORCH_MODULES]
    files.append(PACKAGE / "converters" / "formats.py")  # the format registry
    files.append(PACKAGE / "converters" / "readback.py")  # the read-back of directory outputs, both sides
    return sorted(set(files))


NUMPY_ONLY = [module_name(p) for p in numpy_only_files()]

IMPORT_ALL = """
import importlib, json, sys, traceback
for framework in {frameworks!r}:
    sys.modules[framework] = None  # as if not installed: importing it raises ImportError
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was not blocked")
failed = {{}}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    """Every NumPy-only module imported in one interpreter that has no framework: what failed, and how."""
    code = IMPORT_ALL.format(frameworks=FRAMEWORKS)
    done = subprocess.run(
        [sys.executable, "-c", code, *NUMPY_ONLY], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_numpy_only_folders_are_found():
    assert {
        "optstate",
        "optstate.api",
        "optstate.cli",
        "optstate.report",
        "optstate.schema.state",
        "optstate.converters.torch.state_dict",
        "optstate.converters.torch.ptfile",
        "optstate.converters.layout.moves",
        "optstate.converters.schedules.torch_schedulers",
    } <= set(NUMPY_ONLY)


@pytest.mark.parametrize("module", NUMPY_ONLY)
def test_imports_without_any_framework(module, import_failures):
    assert module not in import_failures, import_failures[module]


# ----------------------------------------------------------------------------- torch and JAX sides, from the source


def module_level_imports(body: list[ast.stmt]):
    """The import statements that run on import: also under a module-level ``if``, ``try`` or ``with``, but not
    under ``if TYPE_CHECKING:`` and not in a function or class."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from module_level_imports(node.body)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The absolute names a file imports at module level; ``pkg.name`` too for ``from pkg import name``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def torch_side_modules_that_import_torch() -> set[str]:
    return {module_name(p) for p in files_in("converters/torch") if p.name not in TORCH_FREE_TORCH_MODULES}


def forbidden(name: str, frameworks: tuple[str, ...], modules: set[str]) -> bool:
    return name.split(".")[0] in frameworks or any(name == m or name.startswith(m + ".") for m in modules)


TORCH_SIDE = [p for p in files_in("converters/torch") if p.name not in TORCH_FREE_TORCH_MODULES]
JAX_SIDE_FILES = files_in("converters/jax")


@pytest.mark.parametrize("path", TORCH_SIDE, ids=lambda p: module_name(p))
def test_the_torch_side_never_imports_jax(path):
    jax_modules = {module_name(p) for p in JAX_SIDE_FILES if p.name != "__init__.py"}
    bad = sorted(n for n in imported_modules(path) if forbidden(n, JAX_SIDE, jax_modules))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level"


@pytest.mark.parametrize("path", JAX_SIDE_FILES, ids=lambda p: module_name(p))
def test_the_jax_side_never_imports_torch(path):
    torch_modules = torch_side_modules_that_import_torch() - {"optstate.converters.torch"}
    bad = sorted(n for n in imported_modules(path) if forbidden(n, ("torch",), torch_modules))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level"


def test_the_source_check_sees_a_forbidden_import(tmp_path):
    """The checks above could pass by reading nothing: they must catch an import under ``try`` and a relative one."""
    side = tmp_path / "optstate" / "converters" / "jax"
    side.mkdir(parents=True)
    (side / "bad.py").write_text("try:\n    import torch.nn\nexcept ImportError:\n    pass\nfrom ..torch import live\n")
    names = imported_modules(side / "bad.py", root=tmp_path)
    assert {"torch.nn", "optstate.converters.torch.live"} <= names
    assert forbidden("torch.nn", ("torch",), set())
    assert forbidden("optstate.converters.torch.live", ("torch",), {"optstate.converters.torch.live"})
