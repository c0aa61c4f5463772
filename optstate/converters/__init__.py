"""Framework adapters, one module each; each imports its framework at the top.

``import optstate`` imports none of them: they load on first use, and a missing framework raises
:class:`optstate.errors.MissingDependencyError` naming the ``pip install`` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

# adapter name -> (its module under this package, the framework it imports, the pip extra that installs it)
_ADAPTERS = {"torch": ("torch.live", "torch", "torch"), "optax": ("jax.optax", "optax", "jax"),
             "orbax": ("jax.orbax", "orbax.checkpoint", "jax"), "flax": ("jax.flax", "flax", "jax"),
             "dcp": ("torch.dcp", "torch.distributed.checkpoint", "torch")}


def adapter(name: str) -> ModuleType:
    """Import the adapter module ``optstate.converters.<name>``, naming the extra if its framework is missing.

    >>> adapter("torch").__name__  # doctest: +SKIP
    'optstate.converters.torch.live'
    """
    module, framework, extra = _ADAPTERS[name]
    try:
        importlib.import_module(framework)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {name} adapter needs {framework}, which is not installed: pip install 'optstate[{extra}]'"
        ) from exc
    return importlib.import_module(f"{__name__}.{module}")
