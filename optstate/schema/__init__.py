"""The canonical model: state record, optimizer table, file format.

Imports NumPy only (ml_dtypes once a bfloat16 or float8 dtype is named).
"""

from .families import OPTIMIZERS, OptimizerSpec, Slot, optimizer_spec
from .fileformat import FORMAT_VERSION, load, save
from .state import Metadata, OptimizerState, ParamInfo, ParamPath, name_to_path, path_to_name

__all__ = [
    "FORMAT_VERSION",
    "OPTIMIZERS",
    "Metadata",
    "OptimizerSpec",
    "OptimizerState",
    "ParamInfo",
    "ParamPath",
    "Slot",
    "load",
    "name_to_path",
    "optimizer_spec",
    "path_to_name",
    "save",
]
