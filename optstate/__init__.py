"""optstate: move optimizer state between PyTorch and JAX/Optax exactly, or refuse.

>>> import optstate
>>> optstate.OPTIMIZERS["adamw"].slots[0].torch_key
'exp_avg'

The framework functions (``from_torch``, ``to_optax``, ...) load their adapter on first use, so
``import optstate`` imports neither torch nor jax; :func:`optstate.verify` imports each framework
when it runs a checkpoint in it, and ``optstate.testing`` (``assert_continues``, for pytest) loads on
first use.
"""

from __future__ import annotations

from typing import Any

from .api import convert
from .converters.layout.targets import relayout
from .errors import FormatError, MappingError, MissingDependencyError, OptstateError, UnsupportedError
from .report import inspect
from .schema import OPTIMIZERS, OptimizerState, ParamInfo, load, save

# NumPy only, and imported here rather than on first use: the module's name is the function's, and a module
# loaded later would replace the function on the package (the import system sets optstate.verify to it).
from .verify import VerifyReport, verify

__version__ = "0.1.0"

_ADAPTER_OF = {
    "from_torch": "torch",
    "to_torch": "torch",
    "to_torch_state_dict": "torch",
    "optax_transform": "optax",
    "to_optax": "optax",
    "from_optax": "optax",
    "load_optax": "orbax",
    "load_flax": "orbax",
    "to_nnx": "flax",
    "from_nnx": "flax",
}


def __getattr__(name: str) -> Any:
    if name == "testing":  # the pytest helpers: loaded on first use, like a framework's adapter
        import importlib

        return importlib.import_module(f"{__name__}.testing")
    if name == "from_torch_file":  # torch-free: NumPy and the standard library read torch's zip files
        from .converters.torch.state_dict import from_torch_file

        return from_torch_file
    if name in _ADAPTER_OF:
        from .converters import adapter

        return getattr(adapter(_ADAPTER_OF[name]), name)
    raise AttributeError(f"module 'optstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ADAPTER_OF, "from_torch_file", "testing"])


__all__ = [  # noqa: PLE0604 (*_ADAPTER_OF: the lazily loaded names, strings)
    "FormatError",
    "MappingError",
    "MissingDependencyError",
    "OPTIMIZERS",
    "OptimizerState",
    "OptstateError",
    "ParamInfo",
    "UnsupportedError",
    "convert",
    "inspect",
    "load",
    "relayout",
    "save",
    "from_torch_file",
    "verify",
    "VerifyReport",
    *_ADAPTER_OF,
]
