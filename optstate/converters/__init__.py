"""Framework adapters, one module each; each imports its framework at the top.

``import optstate`` imports none of them: they load on first use, and a missing framework raises
:class:`optstate.errors.MissingDependencyError` naming the ``pip install`` extra. The frameworks
are declared once, here (:class:`Framework`); the adapters (:func:`adapter`) and the checkpoint
formats (:mod:`optstate.converters.formats`) name the one they need.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import FormatError, MissingDependencyError


@dataclass(frozen=True)
class Framework:
    """A module optstate imports only on demand, and the pip extra of optstate that installs it."""

    module: str
    extra: str

    def require(self, user: str) -> None:
        """Import the module, or raise :class:`MissingDependencyError` saying that ``user`` needs it and how to
        install it.

        >>> Framework("numpy", "numpy").require("it")
        >>> Framework("absent", "x").require("it")
        Traceback (most recent call last):
        optstate.errors.MissingDependencyError: it needs absent, which is not installed: pip install 'optstate[x]'
        """
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            raise MissingDependencyError(
                f"{user} needs {self.module}, which is not installed: pip install 'optstate[{self.extra}]'"
            ) from exc


TORCH = Framework("torch", "torch")
TORCH_DCP = Framework("torch.distributed.checkpoint", "torch")
OPTAX = Framework("optax", "jax")
ORBAX = Framework("orbax.checkpoint", "jax")
FLAX = Framework("flax", "jax")

# adapter name -> (its module under this package, the framework it imports)
_ADAPTERS = {
    "torch": ("torch.live", TORCH),
    "optax": ("jax.optax", OPTAX),
    "orbax": ("jax.orbax", ORBAX),
    "flax": ("jax.flax", FLAX),
    "dcp": ("torch.dcp", TORCH_DCP),
}


def adapter(name: str) -> ModuleType:
    """Import the adapter module ``name`` names (``"torch"``: ``optstate.converters.torch.live``), naming the
    extra if its framework is missing.

    >>> adapter("torch").__name__  # doctest: +SKIP
    'optstate.converters.torch.live'
    """
    module, framework = _ADAPTERS[name]
    framework.require(f"the {name} adapter")
    return importlib.import_module(f"{__name__}.{module}")


def import_function(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names, its module imported now; an error that names the
    string where either is missing.

    >>> import_function("os.path:join")("a", "b")
    'a/b'
    >>> import_function("os.path:nothing")
    Traceback (most recent call last):
    optstate.errors.FormatError: os.path:nothing: module os.path has no function 'nothing'
    """
    module, _, function = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), function, None)
    except ImportError as exc:
        raise FormatError(f"{target}: cannot import module {module} ({exc})") from None
    if not callable(found):
        raise FormatError(f"{target}: module {module} has no function {function!r}")
    return found


def call_user_function(spec: str) -> Any:
    """Call the function a ``module:function`` string names, the working directory importable (it is the
    user's own code, named on the command line; never a checkpoint's).

    >>> call_user_function("builtins:dict")
    {}
    """
    sys.path.insert(0, os.getcwd())
    try:
        function = import_function(spec)
    finally:
        sys.path.remove(os.getcwd())
    return function()
