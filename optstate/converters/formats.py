"""The checkpoint formats optstate reads and writes: a registry keyed by name, one :class:`Format` row each.

In the manner of ``flax.serialization``'s type-keyed registry and Orbax's type handlers: a row says
how a path of the format looks and which functions read and write it. Readers and writers are
``"module:function"`` strings, imported on first use, so that the registry (and ``import
optstate``) imports no framework; a missing one is named with the pip extra that installs it.

Every reader is ``read(path, options: ReadOptions) -> OptimizerState`` and every writer
``write(state, path, options: WriteOptions) -> None``: small functions at the end of the format's
own module, over what that module does. Adding a format is its module plus one row of
:data:`BUILTIN` (or a :func:`register` call, from outside optstate).

>>> names()  # doctest: +NORMALIZE_WHITESPACE
('torch', 'dcp', 'hf-trainer', 'accelerate', 'deepspeed', 'lightning', 'optax', 'nnx', 'train-state',
 'optstate')
>>> get("optstate").reader
'optstate.schema.fileformat:read'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OptstateError
from ..schema.state import OptimizerState
from . import ORBAX, TORCH_DCP, Framework, import_function
from .layout.moves import Layout, revert_layout


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need beyond the path; a format that records a value itself ignores the option.

    ``optimizer`` names the optimizer family where the checkpoint cannot tell (an Optax state; Adam
    and AdamW of torch before 2.6); ``hyperparams`` are its hyperparameters (torch names), a dict or
    a list of param groups; ``allow_approximate`` reads a state whose continuation is not bit-exact;
    ``optstate_transform``: an Optax state trained with ``optstate.optax_transform``. ``model`` names
    the parameters where the checkpoint does not: a torch module, a ``module:function`` returning one,
    or a Hugging Face model directory (its ``config.json``; see :mod:`optstate.converters.torch.models`).
    ``step`` chooses a step of an Orbax ``CheckpointManager``'s directory (default: the latest).
    ``assume_step`` is the step count of a state that records none (on the user's word);
    ``allow_nonfinite`` reads a state holding NaN, inf or a negative second moment (a diverged run,
    converted on purpose; recorded in the output).

    >>> ReadOptions(optimizer="adamw").allow_approximate
    False
    """

    optimizer: str | None = None
    hyperparams: Any = None
    allow_approximate: bool = False
    optstate_transform: bool = False
    model: Any = None
    step: int | None = None
    assume_step: int | None = None
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """How a writer writes: ``force`` replaces an existing output, ``fsync=False`` skips the fsyncs (still
    atomic, not durable against a crash), ``max_shard_bytes`` shards a format that shards (the canonical
    file), ``progress(nbytes)`` is called as each tensor is written. ``model`` is the model the output
    will be resumed with, where a trainer's layout needs it (its parameters' order and param groups; as
    :class:`ReadOptions`' ``model``); ``step`` writes an Orbax ``CheckpointManager`` step ``DST/<step>/``;
    ``world_size`` is the number of ranks a sharded trainer checkpoint (DeepSpeed ZeRO) is written for.

    >>> WriteOptions(force=True).fsync
    True
    """

    force: bool = False
    fsync: bool = True
    max_shard_bytes: int | None = None
    progress: Callable[[int], None] | None = None
    model: Any = None
    step: int | None = None
    world_size: int | None = None


@dataclass(frozen=True)
class Format:
    """One checkpoint format: its name, what it is, how a path of it looks, and the functions behind it.

    A path is recognised (:func:`detect`) as a directory holding one of ``markers`` (files), else,
    among the other directories (and names ending in the path separator), by ``any_directory``,
    else among files by the name ending in one of ``suffixes``. ``reader``, ``writer`` (``None``: read
    only), ``process_setup`` and ``inspector`` are ``"module:function"`` strings; ``framework`` is
    imported before any of them, so that a missing one names its pip extra. ``torch_layout``: the
    writer wants torch's tensor layout, so a state moved to a Flax layout goes back first.
    ``process_setup`` is what a process whose whole job is converting from the format calls first
    (the command line does; a library caller keeps its own settings). ``inspector(path, name, options)``
    returns the :class:`optstate.report.Report` of a format that holds more than its canonical state
    tells (a torch file's raw state_dict, described even where it does not convert).

    >>> fmt = Format("npz", "NumPy archive", reader="m:read", suffixes=(".npz",))
    >>> fmt.recognises_file("state.npz"), fmt.recognises_file(".npz"), fmt.writer
    (True, False, None)
    """

    name: str
    description: str
    reader: str
    writer: str | None = None
    suffixes: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    any_directory: bool = False
    framework: Framework | None = None
    torch_layout: bool = False
    process_setup: str | None = None
    inspector: str | None = None

    def __post_init__(self) -> None:
        for target in (self.reader, self.writer, self.process_setup, self.inspector):
            if target is not None and target.count(":") != 1:
                raise ValueError(f"format {self.name!r}: {target!r} is not 'module:function'")

    def recognises_directory(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a directory holding one of this format's marker files.

        >>> Format("dcp", "", reader="m:read", markers=(".metadata",)).recognises_directory(".")
        False
        """
        return any((Path(path) / marker).is_file() for marker in self.markers)

    def recognises_file(self, path: str | os.PathLike) -> bool:
        """Whether the file name ends in one of this format's suffixes (and is more than the suffix).

        >>> Format("optstate", "", reader="m:read", suffixes=(".safetensors",)).recognises_file("a/s.safetensors")
        True
        """
        name = Path(path).name
        return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in self.suffixes)

    def function(self, target: str) -> Callable[..., Any]:
        """The function ``target`` names, after importing this format's framework (naming its extra if missing).

        >>> get("optstate").function("optstate.schema.fileformat:load").__name__
        'load'
        """
        if self.framework is not None:
            self.framework.require(f"the {self.name} format")
        return import_function(target)

    def read(self, path: str | os.PathLike, options: ReadOptions = ReadOptions()) -> OptimizerState:
        """Read ``path`` into the canonical state.

        >>> import tempfile
        >>> from optstate.schema import ParamInfo, save
        >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
        >>> get("optstate").read(save(s, tempfile.mkdtemp() + "/s.safetensors")).optimizer
        'sgd'
        """
        state: OptimizerState = self.function(self.reader)(path, options)
        return state

    def write(self, state: OptimizerState, path: str | os.PathLike, options: WriteOptions = WriteOptions()) -> None:
        """Write ``state`` to ``path``, atomically, in torch's layout where the format wants it.

        >>> import tempfile
        >>> from optstate.schema import ParamInfo, load
        >>> s = OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {})
        >>> f = tempfile.mkdtemp() + "/s.safetensors"
        >>> get("optstate").write(s, f); load(f).param_groups
        ({'lr': 0.1},)
        """
        if self.writer is None:
            raise OptstateError(f"the {self.name} format is read only (writable: {', '.join(writable())})")
        if self.torch_layout and state.metadata.layout is not None:
            state = revert_layout(state, Layout.from_json(state.metadata.layout))
        self.function(self.writer)(state, path, options)

    def set_up_process(self) -> None:
        """Run :attr:`process_setup`, if the format has one (the command line, before it converts).

        >>> get("optstate").set_up_process()
        """
        if self.process_setup is not None:
            self.function(self.process_setup)()


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format; a name is registered once (a second registration is refused, as
    ``flax.serialization.register_serialization_state`` refuses one).

    >>> register(get("torch"))
    Traceback (most recent call last):
    ValueError: a format named 'torch' is already registered
    """
    if fmt.name in _REGISTRY:
        raise ValueError(f"a format named {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def names() -> tuple[str, ...]:
    """The registered formats' names, in the order they were registered.

    >>> "dcp" in names()
    True
    """
    return tuple(_REGISTRY)


def writable() -> tuple[str, ...]:
    """The names of the formats that can be written.

    >>> "optstate" in writable()
    True
    """
    return tuple(name for name, fmt in _REGISTRY.items() if fmt.writer is not None)


def get(name: str) -> Format:
    """The format registered as ``name``.

    >>> get("torch").description
    'torch.save file'
    >>> get("keras")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    optstate.errors.OptstateError: unknown format 'keras' (known: torch, dcp, ..., optstate)
    """
    fmt = _REGISTRY.get(name)
    if fmt is None:
        raise OptstateError(f"unknown format {name!r} (known: {', '.join(names())})")
    return fmt


def _recognising(path: str | os.PathLike) -> Iterator[Format]:
    """The formats that recognise ``path``, the most specific first."""
    rows = tuple(_REGISTRY.values())
    yield from (fmt for fmt in rows if fmt.recognises_directory(path))
    # A name ending in the separator is a directory still to be written.
    if Path(path).is_dir() or os.fspath(path).endswith(os.sep):
        yield from (fmt for fmt in rows if fmt.any_directory)
    else:
        yield from (fmt for fmt in rows if fmt.recognises_file(path))


def detect(path: str | os.PathLike) -> str:
    """Guess a format from a path: a directory by a marker file inside it (``.metadata``: DCP;
    ``trainer_state.json``: a Hugging Face Trainer checkpoint; ...), another directory (or a name
    ending in ``/``) is Optax (Orbax); a file by its suffix (``.safetensors``: optstate; ``.pt``,
    ``.pth``, ``.ckpt``, ``.bin``: torch). Rows are tried in the order they were registered.

    >>> detect("ckpt.pt"), detect("state.safetensors"), detect("out/")
    ('torch', 'optstate', 'optax')
    """
    found = next(_recognising(path), None)
    if found is None:
        raise OptstateError(
            f"{os.fspath(path)}: cannot tell its format from the name; name it (--from/--to {'|'.join(names())})"
        )
    return found.name


# The built-in formats. Their order is the order of names() (the command line's choices) and of detect():
# among directories, the first row whose marker file is there wins.
BUILTIN = (
    Format(
        "torch",
        "torch.save file",
        suffixes=(".pt", ".pth", ".ckpt", ".bin"),
        torch_layout=True,
        # The zip format is read and written with NumPy alone; the legacy one (torch < 1.6) imports torch.
        reader="optstate.converters.torch.state_dict:read",
        writer="optstate.converters.torch.state_dict:write",
        inspector="optstate.report:inspect_torch_file",
    ),
    Format(
        "dcp",
        "torch.distributed.checkpoint directory, as FSDP and torchtitan write",
        # DCP's own (Orbax writes _METADATA); first among the markers, as a DCP directory may sit in a
        # trainer's checkpoint directory beside the trainer's own files.
        markers=(".metadata",),
        framework=TORCH_DCP,
        torch_layout=True,
        reader="optstate.converters.torch.dcp:read",
        writer="optstate.converters.torch.dcp:write",
    ),
    # Trainers' checkpoint directories, recognised by a file only they write; read without torch.
    Format(
        "hf-trainer",
        "Hugging Face Trainer checkpoint-N directory",
        markers=("trainer_state.json",),
        reader="optstate.converters.torch.hf_trainer:read",
        writer="optstate.converters.torch.hf_trainer:write",
        inspector="optstate.converters.torch.hf_trainer:inspect",
    ),
    Format(
        "accelerate",
        "accelerate save_state directory",
        markers=("optimizer.bin",),
        reader="optstate.converters.torch.accelerate:read",
        writer="optstate.converters.torch.accelerate:write",
        inspector="optstate.converters.torch.accelerate:inspect",
    ),
    Format(
        "deepspeed",
        "DeepSpeed ZeRO checkpoint (a root with 'latest', or one global_stepN directory)",
        # A root names its step folder in `latest`; in a step folder, ZeRO 1/2 write mp_rank_00_model_states.pt,
        # ZeRO-3 one zero_pp_rank_*_mp_rank_00_model_states.pt per rank; a universal root (ds_to_universal's
        # or optstate's) names its folder in latest_universal.
        markers=(
            "latest",
            "latest_universal",
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
        ),
        torch_layout=True,
        reader="optstate.converters.torch.deepspeed:read",
        writer="optstate.converters.torch.deepspeed:write",
        inspector="optstate.converters.torch.deepspeed:inspect",
    ),
    Format(
        "lightning",
        "PyTorch Lightning .ckpt (read as a torch file; written for Trainer.fit(ckpt_path=...))",
        torch_layout=True,
        reader="optstate.converters.torch.state_dict:read",
        writer="optstate.converters.torch.lightning:write",
        inspector="optstate.report:inspect_torch_file",
    ),
    Format(
        "optax",
        "Orbax checkpoint directory",
        any_directory=True,
        framework=ORBAX,
        reader="optstate.converters.jax.orbax:read",
        writer="optstate.converters.jax.orbax:write",
        process_setup="optstate.converters.jax.orbax:enable_x64",
    ),
    # Flax's own checkpoint trees, in an Orbax directory (or a CheckpointManager step with --step); the
    # optax reader reads them too.
    Format(
        "nnx",
        "Orbax checkpoint of Flax NNX's {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}",
        framework=ORBAX,
        reader="optstate.converters.jax.orbax:read",
        writer="optstate.converters.jax.nnx:write",
        process_setup="optstate.converters.jax.orbax:enable_x64",
    ),
    Format(
        "train-state",
        "Orbax checkpoint of a Flax linen TrainState (step, params, opt_state)",
        framework=ORBAX,
        reader="optstate.converters.jax.orbax:read",
        writer="optstate.converters.jax.nnx:write_train_state",
        process_setup="optstate.converters.jax.orbax:enable_x64",
    ),
    Format(
        "optstate",
        "canonical safetensors file",
        suffixes=(".safetensors", ".safetensors.index.json"),
        reader="optstate.schema.fileformat:read",
        writer="optstate.schema.fileformat:write",
    ),
)

for _fmt in BUILTIN:
    register(_fmt)
