"""PyTorch Lightning ``.ckpt`` files, written so that ``Trainer.fit(model, ckpt_path=...)`` resumes them.

Lightning checkpoints are read by the torch format (:func:`optstate.converters.torch.state_dict.split_checkpoint`).
"""

from __future__ import annotations

import os

from ...errors import OptstateError
from ...schema.state import OptimizerState
from ..formats import WriteOptions


def write(state: OptimizerState, path: str | os.PathLike, options: WriteOptions) -> None:
    """Not written yet (the writer lands with issue 17)."""
    raise OptstateError(f"{os.fspath(path)}: writing the lightning format is not implemented yet")
