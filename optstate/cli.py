"""The ``optstate`` command: ``convert``, ``verify``, ``inspect`` and ``map``, thin over the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__, api
from .converters import formats
from .converters.formats import ReadOptions
from .errors import OptstateError
from .progress import Progress
from .report import format_report, inspect
from .schema import OPTIMIZERS
from .verify import verify


def _hparams(text: str | None) -> Any:
    if text is None:
        return None
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptstateError(f"--hparams is not valid JSON ({exc})") from None


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``1.5GiB`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.upper().rstrip("BIKMG")
    unit = text.upper()[len(number) :]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):  # OverflowError: "inf"
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a positive size, e.g. 5GB, 500MB)")
    return size


def _summary(state: Any) -> str:
    steps = sorted({p.step for p in state.params if p.step is not None})
    return (
        f"{state.spec.torch_class}, {len(state.params)} parameters in {len(state.param_groups)} group(s)"
        + (f", step {', '.join(map(str, steps))}" if steps else "")
        + (", with model weights" if state.weights is not None else "")
    )


def _set_up_process(*sides: tuple[str, str | None]) -> None:
    """Converting or verifying is this process's whole job: each side's format may set the process up
    (Orbax: float64 stays float64)."""
    for path, fmt in sides:
        formats.get(fmt or formats.detect(path)).set_up_process()


@contextlib.contextmanager
def _closed_when_done(bars: list[Progress]) -> Iterator[None]:
    """Close the bars the block opened: at 100% when it finished, where they stopped when it failed."""
    finished = False
    try:
        yield
        finished = True
    finally:
        for bar in bars:
            bar.close(finished=finished)


def _convert(args: argparse.Namespace) -> int:
    _set_up_process((args.src, args.src_format), (args.dst, args.dst_format))
    bars: list[Progress] = []

    def progress(state: Any) -> Progress:
        # An estimate: writers add what they need (step counters, parameters); the bar follows what they write.
        arrays = [*state.slots.values(), *(state.weights or {}).values()]
        bars.append(Progress(sum(a.nbytes for a in arrays), len(arrays), enabled=None if not args.quiet else False))
        return bars[-1]

    with _closed_when_done(bars):
        state = api.convert(
            args.src,
            args.dst,
            src_format=args.src_format,
            dst_format=args.dst_format,
            force=args.force,
            **_read_fields(args),
            reset=args.reset,
            horizon=args.horizon,
            constant_lr=args.constant_lr,
            allow_approximate=args.allow_approximate,
            optstate_transform=args.optstate_transform,
            target_params=args.target_params,
            mapping=args.mapping,
            fsync=not args.no_fsync,
            max_shard_bytes=args.max_shard_size,
            world_size=args.world_size,
            progress=progress,
        )
    print(f"{args.src} -> {args.dst}: {_summary(state)}")
    if state.metadata.approximate is not None:
        print(f"approximate: {state.metadata.approximate}")
    for name in args.reset:
        print(f"reset {name}: back to its initial value on every parameter, as asked")
    if args.verify:
        return _run_verify(args, args.src, args.dst, args.dst_format)
    return 0


def _verify(args: argparse.Namespace) -> int:
    _set_up_process((args.src, args.src_format), (args.dst, args.dst_format))
    return _run_verify(args, args.src, args.dst, args.dst_format)


def _run_verify(args: argparse.Namespace, src: str, dst: str, dst_format: str | None) -> int:
    """Run :func:`optstate.verify` as the arguments say, print its report; 0 when it agrees, else 1."""
    bars: list[Progress] = []

    def progress(total_bytes: int, total_count: int) -> Progress:
        enabled = False if args.quiet or getattr(args, "json", False) else None
        bars.append(Progress(total_bytes, total_count, enabled=enabled, label="verifying", unit="checks"))
        return bars[-1]

    with _closed_when_done(bars):
        report = verify(
            src,
            dst,
            src_format=args.src_format,
            dst_format=dst_format,
            steps=args.verify_steps,
            seed=args.seed,
            model_data=args.model_data,
            target_params=args.target_params,
            mapping=args.mapping,
            progress=progress,
            **_read_fields(args),
        )
    print(report.to_json() if getattr(args, "json", False) else report.format())
    return 0 if report.agrees else 1


def _map(args: argparse.Namespace) -> int:
    state = api.read(args.src, args.src_format, **_read_fields(args))
    from .converters.layout.targets import plan

    layout, problems = plan(state, args.target_params)
    width = max((len(".".join(m.source)) for m in layout.moves), default=0)
    for m in layout.moves:
        print(
            f"{'.'.join(m.source):<{width}}  {list(m.source_shape)!s:<14} -> {'/'.join(m.target)} "
            f"{list(m.shape)}  {m.describe}"
        )
    for path in layout.dropped:
        print(f"{'.'.join(path):<{width}}  dropped (no Flax counterpart; kept as a buffer)")
    if args.output:
        from .atomic import atomic_file

        with atomic_file(args.output, force=args.force) as tmp:
            tmp.write_text(json.dumps(layout.to_json(), indent=1))
        print(f"mapping written to {args.output}" + (" (incomplete: add the missing entries)" if problems else ""))
    if problems:
        from .converters.layout.moves import problem_list

        raise OptstateError(problem_list(problems))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    report = inspect(args.path, args.src_format, options=ReadOptions(**_read_fields(args)))
    print(report.to_json() if args.json else format_report(report))
    return 0


def _formats_described() -> str:
    """The registered formats, one clause each, for ``convert --help``."""
    text = "Formats: " + ", ".join(f"{name} ({formats.get(name).description})" for name in formats.names()) + "."
    return textwrap.fill(text, width=100)  # wrapped here: the raw formatter that keeps the examples keeps this too


def _add_reading_arguments(command: argparse.ArgumentParser) -> None:
    """What every command that reads a checkpoint may be told about it where the checkpoint does not say."""
    command.add_argument(
        "--from", dest="src_format", choices=formats.names(), help="input format (default: from the name)"
    )
    command.add_argument(
        "--optimizer",
        help="optimizer family when the input does not record it (an Optax state): " + ", ".join(OPTIMIZERS),
    )
    command.add_argument(
        "--hparams",
        help="hyperparameters as JSON (torch names), a dict or a list of param groups "
        "each with a 'params' list of names; @FILE reads it from a file",
    )
    command.add_argument(
        "--model",
        help="the torch model, to name parameters the checkpoint does not: module:function returning it, "
        "or a Hugging Face model directory (config.json; built without weights)",
    )
    command.add_argument(
        "--step",
        type=int,
        help="the step to read from an Orbax CheckpointManager's directory (default: the latest); "
        "on convert to an Orbax format, also the step directory DST/STEP/ to write",
    )
    command.add_argument(
        "--assume-step",
        type=int,
        metavar="N",
        help="the step count of a state that records none (torch Adam without 'step'), on your word",
    )
    command.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="read a state holding NaN, inf or a negative second moment (a diverged run), on purpose; "
        "recorded in the output",
    )


def _read_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What the reading arguments (:func:`_add_reading_arguments`) tell a reader, by ReadOptions' field names."""
    return {
        "optimizer": args.optimizer,
        "hyperparams": _hparams(args.hparams),
        "model": args.model,
        "step": args.step,
        "assume_step": args.assume_step,
        "allow_nonfinite": args.allow_nonfinite,
    }


CONVERT_EXAMPLES = """examples:
  optstate convert --from torch --to optax examples/mlp_adamw.pt out/
  optstate convert --from optax --to torch out/ back.pt
  optstate convert --from torch --to optstate examples/mlp_adamw.pt state.safetensors
  optstate convert --from optax --to torch jax/ out.pt --optimizer adamw --hparams '{"lr": 3e-4, "weight_decay": 0.1}'
  optstate convert --to optax output/checkpoint-500 out/                 # a Hugging Face Trainer checkpoint
  optstate convert --to optax --model train:make_model ckpt/ out/        # accelerate save_state
  optstate convert --to optax --horizon 1000 epoch=3-step=500.ckpt out/  # PyTorch Lightning
  optstate convert --to optax examples/gpt_adamw.pt gpt/ --target-params examples.gpt:flax_variables
  optstate convert --verify examples/mlp_adamw.pt out/                   # then run both and compare (verify)
"""

MAP_EXAMPLES = """examples:
  optstate map examples/gpt_adamw.pt --target-params examples.gpt:flax_variables
  optstate map examples/gpt_adamw.pt --target-params examples.gpt:flax_variables -o mapping.json
  optstate convert --to optax examples/gpt_adamw.pt gpt/ --mapping mapping.json
"""

VERIFY_EXAMPLES = """examples:
  optstate verify examples/mlp_adamw.pt out/                             # torch against its Optax conversion
  optstate verify --steps 10 --seed 1 examples/mlp_adamw.pt state.safetensors
  optstate verify --json examples/mlp_adamw.pt out/
  optstate verify --model-data train:gradients ckpt.pt out/              # gradients(params, step) of a batch
  optstate convert --verify examples/mlp_adamw.pt out/                   # convert, then verify
"""

INSPECT_EXAMPLES = """examples:
  optstate inspect examples/mlp_adamw.pt
  optstate inspect --json state.safetensors
  optstate inspect output/checkpoint-500                                 # a Hugging Face Trainer checkpoint
"""


def _subcommand(sub: Any, name: str, help: str, examples: str, description: str | None = None) -> Any:
    """A subcommand's parser, with its examples under ``--help`` (kept as written) and ``--debug``
    accepted after the subcommand too, where people put it."""
    command = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: without the flag here, the value given before the subcommand (or its default) stands.
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return command


def _add_convert(sub: Any) -> None:
    c = _subcommand(sub, "convert", "convert a checkpoint", CONVERT_EXAMPLES, description=_formats_described())
    c.add_argument("src", help="the checkpoint to read")
    c.add_argument("dst", help="where to write (refused if it exists, unless --force)")
    _add_reading_arguments(c)
    c.add_argument("--to", dest="dst_format", choices=formats.writable(), help="output format (default: from the name)")
    c.add_argument(
        "--reset",
        action="append",
        default=[],
        metavar="SLOT",
        help="restart this slot (exp_avg, momentum_buffer, ..., or step) from its initial value on the way; repeatable",
    )
    c.add_argument(
        "--horizon",
        type=int,
        help="the largest step count training will reach: needed to carry an LR "
        "schedule that never settles (cosine, step, exponential) to Optax exactly",
    )
    c.add_argument(
        "--constant-lr",
        action="store_true",
        help="the checkpoint's LR scheduler is not in it (its param groups show one was attached): "
        "continue at the groups' current learning rates, on your word",
    )
    c.add_argument(
        "--allow-approximate",
        action="store_true",
        help="convert what continues only approximately "
        "(Muon; stock Optax states whose formula is not torch's), recording why in the output",
    )
    c.add_argument(
        "--optstate-transform",
        action="store_true",
        help="the Optax input was trained with "
        "optstate.optax_transform (its torch-exact states look like stock Optax ones on disk)",
    )
    _add_writing_arguments(c)
    c.add_argument(
        "--verify",
        action="store_true",
        help="after converting, run the input and the output side by side and compare them (optstate verify); "
        "exit 1 if they disagree",
    )
    _add_verify_arguments(c, prefix="--verify-")
    c.set_defaults(run=_convert)


def _add_verify_arguments(command: argparse.ArgumentParser, prefix: str = "--") -> None:
    """How ``verify`` runs the two checkpoints (``convert --verify`` takes them as ``--verify-steps``, ...)."""
    command.add_argument(
        f"{prefix}steps",
        dest="verify_steps",
        type=int,
        default=3,
        metavar="N",
        help="optimizer steps to run on both sides (default: 3)",
    )
    command.add_argument(
        f"{prefix}seed", dest="seed", type=int, default=0, metavar="S", help="seed of the random gradients (default: 0)"
    )
    command.add_argument(
        f"{prefix}model-data",
        dest="model_data",
        metavar="MODULE:FUNCTION",
        help="gradients of real batches instead of random ones: a function returning gradients(params, step), "
        "each parameter's gradient by torch name at those parameters (your code, from the working directory)",
    )


def _add_verify(sub: Any) -> None:
    v = _subcommand(
        sub,
        "verify",
        "run a checkpoint and its conversion side by side and compare them",
        VERIFY_EXAMPLES,
        description="Loads SRC in its framework and DST in the other (torch or Optax), feeds both the same "
        "gradients for a few steps, and compares every parameter and optimizer slot after each step, to 1e-12 "
        "for float64 (a few ulps of the update for float32 and bfloat16). Exit status 0 when every parameter "
        "agrees, 1 otherwise, naming the worst parameters.",
    )
    v.add_argument("src", help="the original checkpoint")
    v.add_argument("dst", help="its conversion")
    _add_reading_arguments(v)
    v.add_argument("--to", dest="dst_format", choices=formats.names(), help="DST's format (default: from the name)")
    v.add_argument(
        "--target-params",
        metavar="PARAMS",
        help="the --target-params the conversion was made with, where SRC is a Flax checkpoint in names and a "
        "layout of its own converted to a torch model's",
    )
    v.add_argument("--mapping", metavar="FILE", help="the --mapping the conversion was made with")
    _add_verify_arguments(v)
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--quiet", action="store_true", help="no progress bar (it appears only on a terminal)")
    v.set_defaults(run=_verify)


def _add_writing_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--target-params",
        metavar="PARAMS",
        help="move parameters and optimizer slots to this model's "
        "layout: a Flax parameter tree (msgpack file, Orbax directory, or module:function returning it or "
        "an nnx.Module); on the way back, the torch model (.pt state_dict or module:function)",
    )
    c.add_argument("--mapping", metavar="FILE", help="move tensors as this mapping file says (optstate map -o)")
    c.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help="shard a canonical file into pieces of at "
        "most SIZE (e.g. 5GB) plus an index JSON, as Hugging Face shards weights",
    )
    c.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip the fsyncs (faster; the output is still renamed "
        "into place whole, but a power cut right after may lose it)",
    )
    c.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (it appears only on a terminal, and only "
        "for conversions that take more than a couple of seconds)",
    )
    c.add_argument(
        "--world-size",
        type=int,
        metavar="M",
        help="write a DeepSpeed ZeRO checkpoint for M ranks (default: a universal checkpoint, "
        'loaded at any world size with "load_universal": true)',
    )
    c.add_argument("--force", action="store_true", help="replace an existing output")


def _add_map(sub: Any) -> None:
    m = _subcommand(sub, "map", "show (and save) how a checkpoint's tensors map onto a Flax model", MAP_EXAMPLES)
    m.add_argument("src")
    m.add_argument(
        "--target-params",
        metavar="PARAMS",
        required=True,
        help="the Flax model (as for convert), or the torch model for a state in Flax's names",
    )
    _add_reading_arguments(m)
    m.add_argument("-o", "--output", metavar="FILE", help="save the mapping as editable JSON (for --mapping)")
    m.add_argument("--force", action="store_true", help="replace an existing mapping file")
    m.set_defaults(run=_map)


def _add_inspect(sub: Any) -> None:
    i = _subcommand(sub, "inspect", "show what a checkpoint holds and what a restore would lose", INSPECT_EXAMPLES)
    i.add_argument("path")
    _add_reading_arguments(i)
    i.add_argument("--json", action="store_true", help="print the facts as JSON")
    i.set_defaults(run=_inspect)


def parser() -> argparse.ArgumentParser:
    """The command line's parser: ``convert``, ``verify``, ``map`` and ``inspect``.

    >>> parser().parse_args(["inspect", "ckpt.pt", "--optimizer", "adam"]).optimizer
    'adam'
    >>> parser().parse_args(["convert", "a.pt", "b/", "--debug"]).debug  # after the command, where people put it
    True
    >>> parser().parse_args(["--debug", "inspect", "a"]).debug, parser().parse_args(["inspect", "a"]).debug
    (True, False)
    """
    p = argparse.ArgumentParser(
        prog="optstate",
        description="Move optimizer state between PyTorch and JAX/Optax exactly, or refuse and say why.",
    )
    p.add_argument("--version", action="version", version=f"optstate {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_convert, _add_verify, _add_map, _add_inspect):
        add(sub)
    return p


def _silence_library_logging() -> None:
    """Keep Orbax's absl warnings (``Metadata file does not exist``, ...) off the terminal: the command
    says what went wrong in one line of its own. The command line's process only; ``--debug`` keeps them.
    Orbax logs through absl, whose Python logger is ``logging.getLogger("absl")``. A filter, not a level:
    absl sets that logger's level itself when it is imported (its ``--verbosity`` flag), after this runs.

    """
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _BelowError) for f in absl.filters):
        absl.addFilter(_BelowError())


class _BelowError(logging.Filter):
    """Drops records below ERROR.

    >>> _BelowError().filter(logging.makeLogRecord({"levelno": logging.WARNING}))
    False
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _reader_went_away() -> int:
    """The output's reader closed its end (``optstate inspect --json x | head``): stop quietly, as ``cat``
    does, not with an error about our own output. Standard output is pointed at /dev/null so that the
    interpreter's flush at exit finds no broken pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 input or conversion error or a verify that
    disagrees, 2 usage).

    >>> main(["inspect", "missing.pt"])  # doctest: +SKIP
    1
    """
    args = parser().parse_args(argv)
    if not args.debug:
        _silence_library_logging()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, *_, **__: print(f"optstate: warning: {message}", file=sys.stderr)
            return args.run(args)
    except BrokenPipeError:
        return _reader_went_away()
    except (OptstateError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"optstate: error: {exc}", file=sys.stderr)
        return 1
