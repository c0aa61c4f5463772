"""``convert``: read any supported format into the canonical state, write any other."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .converters import formats
from .converters.formats import ReadOptions, WriteOptions
from .converters.layout.targets import relayout
from .errors import InputChangedError, OptstateError
from .schema import OptimizerState
from .schema.fileformat import INDEX_SUFFIX, refuse_special_file, shard_pattern, strict_json_loads
from .schema.state import allowing_nonfinite, state_warnings

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

    ``allow_nonfinite=True`` admits NaN, inf and negative second moments (a diverged run, on purpose) and
    records that in the state's metadata (``nonfinite``), so that every output of it says so.
    """
    refuse_special_file(src)  # before detect() or a reader opens it: a FIFO would block forever
    read_options = ReadOptions(**options)
    with allowing_nonfinite(read_options.allow_nonfinite):
        state = formats.get(fmt or formats.detect(src)).read(src, read_options)
    if read_options.allow_nonfinite and state.metadata.nonfinite is None:
        state = state.with_metadata(
            nonfinite="converted with allow_nonfinite: NaN, inf or negative second moments admitted"
        )
    return state


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
            weight_map = strict_json_loads(src.read_bytes(), os.fspath(src))["weight_map"]
            paths += [src.with_name(n) for n in set(weight_map.values()) if isinstance(n, str) and n]
        except (OSError, ValueError, TypeError, KeyError, AttributeError, OptstateError):
            pass
    return paths


def _output_paths(dst: Path, dst_format: str | None, max_shard_bytes: int | None) -> list[Path]:
    """Every existing path the writer may replace or remove: ``dst``; for a sharded canonical save also its
    index and any shard of the same stem beside it (``force`` removes old shards the new save does not write)."""
    paths = [dst]
    if dst_format == "optstate" and (max_shard_bytes is not None or dst.name.endswith(INDEX_SUFFIX)):
        stem = _sharded_stem(dst)
        shard = shard_pattern(stem)
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


Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def _identity(path: Path) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _input_files(src: Path) -> list[Path]:
    """Every file a conversion of ``src`` may read: the files of a directory (recursively), an index's shards."""
    if src.is_dir():
        return sorted(Path(d, name) for d, _, names in os.walk(src) for name in names)
    return _input_paths(src)


@dataclass(frozen=True)
class InputSnapshot:
    """The identity (device, inode, size, modification and change times) of every file a conversion reads,
    taken before it reads them; :meth:`check` refuses, naming the file, when one has changed since: an
    output built from a file rewritten while it was read mixes old and new bytes.

    In a directory, files that appear or disappear are not a change: a trainer saving its next step into
    a checkpoint manager's directory, and removing its oldest, leaves the step being read whole (a file
    removed after it was mapped stays readable; one removed before is an error of its own).

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "c.pt"; _ = f.write_bytes(b"one")
    >>> snapshot = InputSnapshot.take(f); snapshot.check()
    >>> _ = f.write_bytes(b"three")
    >>> snapshot.check()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.InputChangedError: .../c.pt changed while it was read (size 3 -> 5 bytes, ...); ...
    """

    identities: tuple[tuple[Path, Identity | None], ...]
    directory: bool = False

    @classmethod
    def take(cls, src: str | os.PathLike) -> InputSnapshot:
        return cls(tuple((p, _identity(p)) for p in _input_files(Path(src))), Path(src).is_dir())

    def check(self, cause: BaseException | None = None) -> None:
        for path, before in self.identities:
            after = _identity(path)
            if after != before and not (self.directory and after is None):
                what = _what_changed(before, after)
                because = f"; the read failed with: {cause}" if cause is not None else ""
                raise InputChangedError(
                    f"{path} changed while it was read ({what}){because}; the output was not written: "
                    "convert it again once nothing writes to it (a trainer saving, a copy in progress)"
                )


def _what_changed(before: Identity | None, after: Identity | None) -> str:
    if before is None or after is None:
        return "it appeared" if before is None else "it was removed"
    if before[:2] != after[:2]:
        return "replaced by another file"
    if before[2] != after[2]:
        return f"size {before[2]} -> {after[2]} bytes, rewritten or truncated"
    return "rewritten in place: its modification time changed"


@contextlib.contextmanager
def unchanged_inputs(src: str | os.PathLike) -> Iterator[InputSnapshot]:
    """Take the identities of the files under ``src``; check them again in every atomic write inside the
    block, after the output is written and before it is renamed into place, and on a failure, whose cause
    may be the change (a memory-mapped input truncated under the reader): the error then names the file.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "c.pt"; _ = f.write_bytes(b"one")
    >>> with unchanged_inputs(f):
    ...     _ = f.write_bytes(b"three")
    ...     raise OSError(14, "Bad address")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.InputChangedError: .../c.pt changed while it was read (...); the read failed with: [Errno 14] ...
    """
    snapshot = InputSnapshot.take(src)
    with atomic.checked_before_commit(snapshot.check):
        try:
            with atomic.checks_in_background():  # its failure, too, may come from the input's change
                yield snapshot
        except InputChangedError:
            raise  # the check before the rename found it: said once
        except (OptstateError, OSError) as exc:
            snapshot.check(cause=exc)
            raise


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
    refuse_special_file(src)
    refuse_output_that_is_input(src, dst, dst_format, max_shard_bytes)  # before anything is read or written
    with unchanged_inputs(src):
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
        for warning in state_warnings(state):
            warnings.warn(f"{os.fspath(src)}: {warning}", stacklevel=2)
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
