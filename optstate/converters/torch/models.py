"""The torch model that names a checkpoint's parameters where the checkpoint does not (``--model``).

An optimizer ``state_dict`` identifies parameters by position. Where it saved no ``param_names``
and the weights beside it do not give the order (safetensors files store keys sorted), the model
itself does: ``model.named_parameters()`` lists what the optimizer was built from, in order, a
tied weight once. The model is built without weights: from the user's own ``module:function``,
or from a Hugging Face model directory by transformers' own config loading, on the meta device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...errors import FormatError, MissingDependencyError
from .. import call_user_function

__all__ = ["load_model"]


def _from_config(directory: Path) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"{directory}: a Hugging Face model directory is read with transformers, which is not installed: "
            "pip install transformers"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(directory)  # config.json only; nothing is downloaded
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise FormatError(
            f"{directory}/config.json: architecture {architecture!r} is not a transformers model class; "
            "pass --model module:function returning the torch model"
        )
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation
        model: torch.nn.Module = model_class(config)
    return model


def load_model(spec: str | os.PathLike | torch.nn.Module) -> torch.nn.Module:
    """The torch model ``spec`` names: a module itself, a ``module:function`` returning one, or a Hugging
    Face model directory (its ``config.json``, built on the meta device).

    >>> net = load_model("torch.nn:Identity")
    >>> type(net).__name__, list(net.named_parameters())
    ('Identity', [])
    """
    if isinstance(spec, torch.nn.Module):
        return spec
    if (Path(spec) / "config.json").is_file():
        return _from_config(Path(spec))
    text = os.fspath(spec)
    if ":" not in text:
        raise FormatError(
            f"{text}: not a model; pass a module:function returning a torch module, or a Hugging Face "
            "model directory holding config.json"
        )
    model = call_user_function(text)
    if not isinstance(model, torch.nn.Module):
        raise FormatError(f"{text}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model
