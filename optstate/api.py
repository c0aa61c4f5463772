"""``convert``: read any supported format into the canonical state, write any other."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .converters import formats
from .converters.formats import ReadOptions, WriteOptions
from .converters.layout.targets import relayout
from .schema import OptimizerState

# The registry's detect() under the public name it had before there was a registry.
detect_format = formats.detect


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # the registered names, current however many were registered since import
        return formats.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read(
    src: str | os.PathLike,
    fmt: str | None = None,
    *,
    optimizer: str | None = None,
    hyperparams: Any = None,
    allow_approximate: bool = False,
    optstate_transform: bool = False,
    model: Any = None,
) -> OptimizerState:
    """Read ``src`` (of format ``fmt``, guessed when ``None``) into the canonical state; the options are
    :class:`optstate.converters.formats.ReadOptions`'s.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo, save
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> read(save(s, tempfile.mkdtemp() + "/s.safetensors")).param_groups
    ({'lr': 0.1},)
    """
    options = ReadOptions(
        optimizer=optimizer,
        hyperparams=hyperparams,
        allow_approximate=allow_approximate,
        optstate_transform=optstate_transform,
        model=model,
    )
    return formats.get(fmt or formats.detect(src)).read(src, options)


def write(
    state: OptimizerState,
    dst: str | os.PathLike,
    fmt: str,
    *,
    force: bool = False,
    fsync: bool = True,
    max_shard_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write ``state`` to ``dst`` in format ``fmt``, atomically (durably unless ``fsync=False``); a state
    moved to a Flax layout goes back to torch's on the way to a format in torch's layout (torch, dcp).
    ``max_shard_bytes`` shards a canonical file; ``progress(nbytes)`` is called as each tensor is written.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo, load
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> f = tempfile.mkdtemp() + "/s.safetensors"
    >>> write(s, f, "optstate"); load(f).optimizer
    'sgd'
    """
    formats.get(fmt).write(
        state, dst, WriteOptions(force=force, fsync=fsync, max_shard_bytes=max_shard_bytes, progress=progress)
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    force: bool = False,
    optimizer: str | None = None,
    hyperparams: Any = None,
    model: Any = None,
    reset: Sequence[str] = (),
    horizon: int | None = None,
    constant_lr: bool = False,
    allow_approximate: bool = False,
    optstate_transform: bool = False,
    target_params: str | None = None,
    mapping: str | None = None,
    fsync: bool = True,
    max_shard_bytes: int | None = None,
    progress: Callable[[OptimizerState], Callable[[int], None]] | None = None,
) -> OptimizerState:
    """Convert a checkpoint between formats; what ``optstate convert`` runs. Returns the state.

    >>> import tempfile, torch, optstate
    >>> d = tempfile.mkdtemp(); net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> torch.save({"optimizer": opt.state_dict(), "model": net.state_dict()}, f"{d}/c.pt")
    >>> optstate.convert(f"{d}/c.pt", f"{d}/s.safetensors").optimizer
    'sgd'

    ``model`` names the parameters where the checkpoint does not (see
    :class:`optstate.converters.formats.ReadOptions`). ``reset`` names slots (or ``"step"``) to restart
    at their initial values, deliberately. ``horizon`` is the largest step count training will reach,
    for an LR schedule that never settles (cosine, ...).
    ``constant_lr`` says that the learning rate stays at the param groups' current values, for a state
    whose LR scheduler was attached (its ``initial_lr`` shows it) but is not carried.
    ``allow_approximate`` converts an optimizer whose continuation across frameworks is not
    bit-exact (Muon), recording why in the output. ``optstate_transform``: an Optax input was
    trained with ``optstate.optax_transform`` (see :func:`optstate.converters.jax.orbax.read_optax_dir`).
    ``target_params`` names the model to move parameters and slots to (a Flax model's parameter tree,
    or the torch model on the way back; see :func:`optstate.converters.layout.targets.target_model`);
    ``mapping`` is a mapping file that ``optstate map -o`` wrote, edited or not. ``fsync``,
    ``max_shard_bytes``: see :func:`write`; ``progress(state)`` returns the callback it takes.
    """
    state = read(
        src,
        src_format,
        optimizer=optimizer,
        hyperparams=hyperparams,
        allow_approximate=allow_approximate,
        optstate_transform=optstate_transform,
        model=model,
    )
    if allow_approximate and state.spec.approximate:
        state = state.with_metadata(approximate=state.spec.approximate)
    if reset:
        state = state.reset(reset)
    if horizon is not None:
        state = state.with_metadata(lr_horizon=horizon)
    if constant_lr:
        state = state.with_metadata(constant_lr=True)
    if target_params is not None or mapping is not None:
        state = relayout(state, target=target_params, mapping=mapping)
    write(
        state,
        dst,
        dst_format or formats.detect(dst),
        force=force,
        fsync=fsync,
        max_shard_bytes=max_shard_bytes,
        progress=None if progress is None else progress(state),
    )
    return state
