"""``convert``: read any supported format into the canonical state, write any other."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .converters import formats
from .converters.formats import ReadOptions, WriteOptions
from .converters.layout.targets import relayout
from .errors import OptstateError
from .schema import OptimizerState
from .schema.fileformat import INDEX_SUFFIX

# The registry's detect() under the public name it had before there was a registry.
detect_format = formats.detect


def __getattr__(name: str) -> Any:
    if name == "FORMATS":  # the registered names, current however many were registered since import
        return formats.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read(src: str | os.PathLike, fmt: str | None = None, **options: Any) -> OptimizerState:
    """Read ``src`` (of format ``fmt``, guessed when ``None``) into the canonical state; ``options`` are the
    fields of :class:`optstate.converters.formats.ReadOptions` (``optimizer=``, ``hyperparams=``, ``model=``,
    ``step=``, ...).

    >>> import tempfile
    >>> from optstate.schema import ParamInfo, save
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> read(save(s, tempfile.mkdtemp() + "/s.safetensors")).param_groups
    ({'lr': 0.1},)
    """
    return formats.get(fmt or formats.detect(src)).read(src, ReadOptions(**options))


def write(
    state: OptimizerState,
    dst: str | os.PathLike,
    fmt: str,
    *,
    force: bool = False,
    fsync: bool = True,
    max_shard_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    model: Any = None,
    step: int | None = None,
    world_size: int | None = None,
) -> None:
    """Write ``state`` to ``dst`` in format ``fmt``, atomically (durably unless ``fsync=False``); a state
    moved to a Flax layout goes back to torch's on the way to a format in torch's layout (torch, dcp).
    ``max_shard_bytes`` shards a canonical file; ``progress(nbytes)`` is called as each tensor is written;
    ``model``, ``step`` and ``world_size``: see :class:`optstate.converters.formats.WriteOptions`.

    >>> import tempfile
    >>> from optstate.schema import ParamInfo, load
    >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> f = tempfile.mkdtemp() + "/s.safetensors"
    >>> write(s, f, "optstate"); load(f).optimizer
    'sgd'
    """
    options = WriteOptions(
        force=force,
        fsync=fsync,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        model=model,
        step=step,
        world_size=world_size,
    )
    formats.get(fmt).write(state, dst, options)


def _sharded_stem(path: Path) -> str:
    """The stem a sharded canonical save names its index and shards after (``fileformat.write_sharded``'s)."""
    for suffix in (INDEX_SUFFIX, ".safetensors"):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _input_paths(src: Path) -> list[Path]:
    """What a conversion reads: ``src`` (a file or a directory) and, for a sharded index, the shards it lists."""
    paths = [src]
    if src.name.endswith(INDEX_SUFFIX) and src.is_file():
        try:  # best effort: a malformed index is the reader's to refuse, with its own message
            weight_map = json.loads(src.read_bytes())["weight_map"]
            paths += [src.with_name(n) for n in set(weight_map.values()) if isinstance(n, str) and n]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    return paths


def _output_paths(dst: Path, dst_format: str | None, max_shard_bytes: int | None) -> list[Path]:
    """Every existing path the writer may replace or remove: ``dst``; for a sharded canonical save also its
    index and any shard of the same stem beside it (``force`` removes old shards the new save does not write)."""
    paths = [dst]
    if dst_format == "optstate" and (max_shard_bytes is not None or dst.name.endswith(INDEX_SUFFIX)):
        stem = _sharded_stem(dst)
        shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
        paths.append(dst.with_name(stem + INDEX_SUFFIX))
        if dst.parent.is_dir():
            paths += [p for p in dst.parent.iterdir() if shard.fullmatch(p.name)]
    return paths


def _how_output_hits_input(out: Path, inp: Path) -> str | None:
    """How writing ``out`` would destroy ``inp`` (the same file, a hard link, a directory around or inside it),
    else ``None``. Real paths catch symbolic links on either side; ``(st_dev, st_ino)`` catches hard links."""
    real_out, real_in = os.path.realpath(out), os.path.realpath(inp)
    if real_out == real_in:
        return "is the input"
    try:
        out_stat, in_stat = os.stat(out), os.stat(inp)
        if (out_stat.st_dev, out_stat.st_ino) == (in_stat.st_dev, in_stat.st_ino):
            return "is a hard link to the input"
    except OSError:
        pass  # one of them does not exist (yet): nothing to share an inode with
    if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
        return "is a directory holding the input"
    if real_out.startswith(real_in.rstrip(os.sep) + os.sep):
        return "lies inside the input directory"
    return None


def refuse_output_that_is_input(
    src: str | os.PathLike, dst: str | os.PathLike, dst_format: str | None = None, max_shard_bytes: int | None = None
) -> None:
    """Refuse a destination whose writing would replace, remove or write into the input, whatever the flags:
    the input may be the only copy of a training run, and a checkpoint holds more than the optimizer state.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "c.pt").write_bytes(b"x"); (d / "h.pt").hardlink_to(d / "c.pt")
    >>> refuse_output_that_is_input(d / "c.pt", d / "h.pt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: .../h.pt is a hard link to the input .../c.pt; optstate never replaces its input, ...
    >>> refuse_output_that_is_input(d / "c.pt", d / "new.pt")  # a different path: fine
    """
    src, dst = Path(src), Path(dst)
    if dst_format is None:
        # An unknown destination format is the writer's to refuse, later; only the sharded layout adds paths.
        with contextlib.suppress(OptstateError):
            dst_format = formats.detect(dst)
    for out in _output_paths(dst, dst_format, max_shard_bytes):
        for inp in _input_paths(src):
            how = _how_output_hits_input(out, inp)
            if how is not None:
                subject = f"{dst}" if out == dst else f"{dst} would replace {out}, which"
                raise OptstateError(
                    f"{subject} {how} {inp}; optstate never replaces its input, even with --force: "
                    "name another output path"
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
    step: int | None = None,
    assume_step: int | None = None,
    allow_nonfinite: bool = False,
    world_size: int | None = None,
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
    :class:`optstate.converters.formats.ReadOptions`), and is the model a trainer's output is resumed with;
    ``step`` chooses a step of an Orbax ``CheckpointManager``'s directory (default: the latest) and is the
    step an Orbax output is written as (``DST/<step>/``). ``assume_step`` and ``allow_nonfinite``: see
    ``ReadOptions``; ``world_size``: the ranks a DeepSpeed output is written for. ``reset`` names slots
    (or ``"step"``) to restart at their initial values, deliberately. ``horizon`` is the largest step
    count training will reach, for an LR schedule that never settles (cosine, ...).
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
    refuse_output_that_is_input(src, dst, dst_format, max_shard_bytes)  # before anything is read or written
    state = read(
        src,
        src_format,
        optimizer=optimizer,
        hyperparams=hyperparams,
        allow_approximate=allow_approximate,
        optstate_transform=optstate_transform,
        model=model,
        step=step,
        assume_step=assume_step,
        allow_nonfinite=allow_nonfinite,
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
        model=model,
        step=step,
        world_size=world_size,
    )
    return state
