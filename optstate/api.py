"""``convert``: read any supported format into the canonical state, write any other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .converters import adapter
from .converters.torch import state_dict as torch_dict
from .errors import OptstateError
from .converters.layout.targets import relayout
from .schema import OptimizerState, fileformat
from .converters.layout.moves import Layout, revert_layout

FORMATS = ("torch", "optax", "optstate", "dcp")


def detect_format(path: str | os.PathLike) -> str:
    """Guess a format from a path: a directory with a ``.metadata`` file is torch.distributed.checkpoint
    (DCP), another directory (or a name ending in ``/``) Optax (Orbax),
    ``.safetensors`` optstate, ``.pt``/``.pth``/``.ckpt``/``.bin`` torch.

    >>> detect_format("ckpt.pt"), detect_format("state.safetensors"), detect_format("out/")
    ('torch', 'optstate', 'optax')
    """
    if (Path(path) / ".metadata").is_file():  # torch.distributed.checkpoint; Orbax writes _METADATA
        return "dcp"
    if Path(path).is_dir() or os.fspath(path).endswith(os.sep):
        return "optax"
    suffix = Path(path).suffix
    if suffix == ".safetensors" or os.fspath(path).endswith(".safetensors.index.json"):
        return "optstate"
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return "torch"
    raise OptstateError(f"{os.fspath(path)}: cannot tell its format from the name; "
                        f"name it (--from/--to {'|'.join(FORMATS)})")


def read(src: str | os.PathLike, fmt: str | None = None, *, optimizer: str | None = None,
         hyperparams: Any = None, allow_approximate: bool = False, optstate_transform: bool = False) -> OptimizerState:
    """Read ``src`` (of format ``fmt``, guessed when ``None``) into the canonical state."""
    fmt = fmt or detect_format(src)
    if fmt == "torch":
        # torch.save's zip format is read without torch (converters/ptfile.py): the same state bit for bit,
        # stricter than torch.load(weights_only=True); only the legacy (torch < 1.6) format needs torch.
        return torch_dict.from_torch_file(src, optimizer=optimizer)
    if fmt == "optax":
        return adapter("orbax").read_optax_dir(src, optimizer=optimizer, hyperparams=hyperparams,
                                               allow_approximate=allow_approximate,
                                               optstate_transform=optstate_transform)
    if fmt == "optstate":
        return fileformat.load(src)
    if fmt == "dcp":
        return adapter("dcp").read_dcp(src, optimizer=optimizer)
    raise OptstateError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def write(state: OptimizerState, dst: str | os.PathLike, fmt: str, *, force: bool = False, fsync: bool = True,
          max_shard_bytes: int | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Write ``state`` to ``dst`` in format ``fmt``, atomically (durably unless ``fsync=False``); a state
    moved to a Flax layout goes back to torch's on the way to torch. ``max_shard_bytes`` shards a
    canonical file; ``progress(nbytes)`` is called as each tensor is written."""
    if fmt in ("torch", "dcp") and state.metadata.layout is not None:
        state = revert_layout(state, Layout.from_json(state.metadata.layout))
    if fmt == "torch":
        torch_dict.save_torch_file(state, dst, force=force, fsync=fsync, progress=progress)  # no torch needed
    elif fmt == "optax":
        adapter("orbax").save_optax_dir(state, dst, force=force, fsync=fsync, progress=progress)
    elif fmt == "optstate":
        fileformat.save(state, dst, force=force, fsync=fsync, max_shard_bytes=max_shard_bytes, progress=progress)
    elif fmt == "dcp":
        adapter("dcp").write_dcp(state, dst, force=force, fsync=fsync)
    else:
        raise OptstateError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, src_format: str | None = None,
            dst_format: str | None = None, force: bool = False, optimizer: str | None = None,
            hyperparams: Any = None, reset: Sequence[str] = (), horizon: int | None = None,
            allow_approximate: bool = False, optstate_transform: bool = False, target_params: str | None = None,
            mapping: str | None = None, fsync: bool = True, max_shard_bytes: int | None = None,
            progress: Callable[[OptimizerState], Callable[[int], None]] | None = None) -> OptimizerState:
    """Convert a checkpoint between formats; what ``optstate convert`` runs. Returns the state.

    >>> import tempfile, torch, optstate
    >>> d = tempfile.mkdtemp(); net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> torch.save({"optimizer": opt.state_dict(), "model": net.state_dict()}, f"{d}/c.pt")
    >>> optstate.convert(f"{d}/c.pt", f"{d}/s.safetensors").optimizer
    'sgd'

    ``reset`` names slots (or ``"step"``) to restart at their initial values, deliberately. ``horizon`` is the
    largest step count training will reach, for an LR schedule that never settles (cosine, ...).
    ``allow_approximate`` converts an optimizer whose continuation across frameworks is not
    bit-exact (Muon), recording why in the output. ``optstate_transform``: an Optax input was
    trained with ``optstate.optax_transform`` (see :func:`optstate.converters.jax.orbax.read_optax_dir`).
    ``target_params`` names the model to move parameters and slots to (a Flax model's parameter tree,
    or the torch model on the way back; see :func:`optstate.converters.layout.targets.target_model`);
    ``mapping`` is a mapping file that ``optstate map -o`` wrote, edited or not. ``fsync``,
    ``max_shard_bytes``: see :func:`write`; ``progress(state)`` returns the callback it takes.
    """
    state = read(src, src_format, optimizer=optimizer, hyperparams=hyperparams, allow_approximate=allow_approximate,
                 optstate_transform=optstate_transform)
    if allow_approximate and state.spec.approximate:
        state = state.with_metadata(approximate=state.spec.approximate)
    if reset:
        state = state.reset(reset)
    if horizon is not None:
        state = state.with_metadata(lr_horizon=horizon)
    if target_params is not None or mapping is not None:
        state = relayout(state, target=target_params, mapping=mapping)
    write(state, dst, dst_format or detect_format(dst), force=force, fsync=fsync, max_shard_bytes=max_shard_bytes,
          progress=None if progress is None else progress(state))
    return state
