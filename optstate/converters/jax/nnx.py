"""Flax's own checkpoint trees in Orbax directories: NNX's ``{'model': ..., 'optimizer': ...}`` and a
linen ``TrainState``, written so that the Flax docs' restore code reads them back."""

from __future__ import annotations

import os

from ...errors import OptstateError
from ...schema.state import OptimizerState
from ..formats import WriteOptions


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """Not written yet (the writer lands with issue 13)."""
    raise OptstateError(f"{os.fspath(path)}: writing the nnx format is not implemented yet")


def write_train_state(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """Not written yet (the writer lands with issue 13)."""
    raise OptstateError(f"{os.fspath(path)}: writing the train-state format is not implemented yet")
