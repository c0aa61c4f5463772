"""Shared pytest set-up, and how tests that need a framework skip where it is not installed.

A file is collected (its tests, or its doctests with ``--doctest-modules``) only where every framework it imports
at module level is importable; otherwise it is reported as one skip: ``SKIPPED [1] tests/test_dcp.py: needs torch``.
What a file imports is read from its source with ``ast``, following the imports of the tests' shared modules
(``frameworks``, ``test_continuation``, ...) and of optstate's own modules, which import what their folder
allows (tests/test_layers.py holds them to it): ``optstate/converters/torch/live.py`` and ``dcp.py`` need torch,
``optstate/converters/jax/*`` JAX, the rest of the package NumPy only. So a test file keeps its imports plain, at
the top, and a new test file that imports torch skips without torch with nobody writing a skip line in it.

What this cannot see, a test states itself: one whose framework is used only in a subprocess or inside a test
function calls ``pytest.importorskip("torch")`` (at the top of the module, or in the test).

``OPTSTATE_TEST_FRAMEWORKS`` (set by ``make test``) turns a skip into an error: ``all`` (the main leg) fails at once
where a framework is missing, so a broken install cannot pass by skipping its tests; ``none`` (the NumPy-only
leg) fails where one is installed, so that leg proves what it says.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import optstate

# The frameworks, then the trainers whose checkpoints the tests produce (the trainers extra).
FRAMEWORKS = ("torch", "jax", "optax", "flax", "orbax", "lightning", "transformers", "accelerate", "deepspeed")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(optstate=optstate, np=np)


def installed(framework: str) -> bool:
    if framework in sys.modules:
        return sys.modules[framework] is not None
    try:
        return importlib.util.find_spec(framework) is not None
    except (ImportError, ValueError):
        return False


def pytest_configure(config):
    config.pluginmanager.register(FrameworkSkips(), "optstate-framework-skips")
    wanted = os.environ.get("OPTSTATE_TEST_FRAMEWORKS", "")
    # The parts of a framework that some tests need by their own name: a torch built without distributed,
    # or orbax without orbax-checkpoint, is a broken install here, not a reason to skip.
    needed = (*FRAMEWORKS, "torch.distributed.checkpoint", "orbax.checkpoint")
    if wanted == "all" and (missing := [f for f in needed if not installed(f)]):
        raise pytest.UsageError(f"OPTSTATE_TEST_FRAMEWORKS=all, but not installed: {', '.join(missing)}")
    if wanted == "none" and (present := [f for f in FRAMEWORKS if installed(f)]):
        raise pytest.UsageError(f"OPTSTATE_TEST_FRAMEWORKS=none, but installed: {', '.join(present)}")
    if wanted not in ("", "all", "none"):
        raise pytest.UsageError(f"OPTSTATE_TEST_FRAMEWORKS={wanted!r}: expected 'all' or 'none'")


# ----------------------------------------------------------------------------- what a file needs


def _module_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: not those in functions or classes, not under
    ``if TYPE_CHECKING:``, not those in a ``try`` that catches ImportError (optional by design)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if "ImportError" not in caught and "ModuleNotFoundError" not in caught:
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
            yield from _module_level_imports(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)


def _names_in(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if node.module and not node.level else []


def _package_of(path: Path) -> str:
    """The dotted package a file is imported in: '' for the tests' top-level modules."""
    try:
        parts = path.relative_to(ROOT / "optstate").parent.parts
    except ValueError:
        return ""
    return ".".join(("optstate", *parts))


def _imported_names(path: Path) -> set[str]:
    """The absolute dotted names a file imports at module level, parents included, and ``pkg.name`` for
    ``from pkg import name`` (it may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = _package_of(path)
    names: set[str] = set()
    for node in _module_level_imports(tree.body):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            modules = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        for module in modules:
            parts = module.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _source_of(module: str) -> Path | None:
    """The file of one of this repository's modules (optstate's, or a test's shared module), else None."""
    parts = module.split(".")
    base = ROOT if parts[0] == "optstate" else TESTS
    if base is TESTS and len(parts) > 1:
        return None
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def frameworks_needed(path: Path) -> frozenset[str]:
    """The frameworks a file imports at module level, itself or through this repository's modules it imports."""
    needed: set[str] = set()
    seen = {path}
    todo = [path]
    while todo:
        for name in _imported_names(todo.pop()):
            if name in FRAMEWORKS:
                needed.add(name)
            elif (source := _source_of(name)) is not None and source not in seen:
                seen.add(source)
                todo.append(source)
    return frozenset(needed)


class _NeedsFramework(pytest.File):
    """Stands in for a file whose framework is missing: collecting it is one skip that says which."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def collect(self):
        pytest.skip(self.reason)


class FrameworkSkips:
    """A plugin, not hooks of this conftest: a conftest's hooks see only the files under its folder, and these
    must see optstate/'s too (its doctests)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_collect_file(self, file_path: Path, parent):
        collectors = yield
        if not collectors or file_path.suffix != ".py" or file_path.name == "conftest.py":
            return collectors
        missing = sorted(f for f in frameworks_needed(file_path.resolve()) if not installed(f))
        if not missing:
            return collectors
        return [_NeedsFramework.from_parent(parent, path=file_path, reason=f"needs {', '.join(missing)}")]

    def pytest_collection_modifyitems(self, items):
        """A doctest of a NumPy-only module may show the module at work beside torch (``>>> import torch``):
        that one example skips, the module's others run."""
        for item in items:
            if isinstance(item, pytest.DoctestItem) and item.dtest is not None:
                needed = set()
                for example in item.dtest.examples:
                    try:
                        tree = ast.parse(example.source)
                    except SyntaxError:
                        continue
                    needed |= {
                        name.split(".")[0] for node in _module_level_imports(tree.body) for name in _names_in(node)
                    } & set(FRAMEWORKS)
                if missing := sorted(f for f in needed if not installed(f)):
                    item.add_marker(pytest.mark.skip(reason=f"doctest needs {', '.join(missing)}"))

    @pytest.hookimpl(tryfirst=True)
    def pytest_make_collect_report(self, collector):
        if isinstance(collector, _NeedsFramework):  # reported at the file, not at the line above that skips
            return pytest.CollectReport(collector.nodeid, "skipped", (str(collector.path), None, collector.reason), [])
        return None
