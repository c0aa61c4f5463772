"""The kill matrix (issue 15): every writer that tests/test_reliability.py's matrix does not cover (DCP, Orbax, NNX,
TrainState, the Hugging Face Trainer, Lightning, accelerate, DeepSpeed), killed with SIGKILL, SIGTERM and SIGINT
after its first array or file, just before its rename, and (over a previous directory) between moving the previous
output aside and renaming the new one in, fresh and over a previous output of the same writer with --force: the
destination is always absent (fresh) or the previous output byte for byte (over), never a mix; after SIGTERM and
SIGINT nothing else is left, after SIGKILL only ``.<name>.*.tmp``. And each writer, run to its end over a previous
output, leaves the new output whole.

All children start at once and are signalled as each reaches its point (tests/kill_matrix_child.py): the torch
writers forked from this process, the Orbax ones from a script that has imported JAX and not started it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint  # the dcp writer's, imported before the children fork
from kill_matrix_child import Case, Outcome, copy_previous, run

import optstate
from optstate.api import read, write
from optstate.schema import save

TESTS = Path(__file__).resolve().parent


class Tiny(torch.nn.Module):
    """The model the trainers resume with: parameters ``net.weight`` and ``net.bias``."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3, dtype=dtype)

    def forward(self, x):
        return self.net(x)


class LitTiny(L.LightningModule):
    """The same model as a LightningModule: AdamW over its named parameters, no scheduler."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3, dtype=torch.float64)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.named_parameters(), lr=0.01, weight_decay=0.1)

    def train_dataloader(self):  # one batch an epoch: the epoch of a step is told from it
        return torch.utils.data.DataLoader(torch.zeros(2, 4, dtype=torch.float64), batch_size=2)


def trained(kind: str, seed: int, directory: Path) -> optstate.OptimizerState:
    """A real torch checkpoint, read: AdamW on :class:`Tiny` after 3 steps on the data of ``seed``; ``kind``
    ``adamw`` (float64, one group), ``adamw-groups`` (the Trainer's two: decay and none), ``adamw-float32``."""
    model = Tiny(torch.float32 if kind == "adamw-float32" else torch.float64)
    weight, bias = model.net.weight, model.net.bias
    groups = (
        [
            {"params": [("net.weight", weight)], "weight_decay": 0.1},
            {"params": [("net.bias", bias)], "weight_decay": 0.0},
        ]
        if kind == "adamw-groups"
        else [{"params": list(model.named_parameters()), "weight_decay": 0.1}]
    )
    opt = torch.optim.AdamW(groups, lr=0.01)
    data = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, 2, 4))).to(weight.dtype)
    for batch in data:
        opt.zero_grad()
        model(batch).pow(2).sum().backward()
        opt.step()
    path = directory / f"{kind}-{seed}.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return read(path)


@dataclass(frozen=True)
class Writer:
    """How the matrix calls a writer: its output's name, the state kind it writes, the options it needs and the
    files (under the output) that a complete output holds."""

    output: str
    kind: str = "adamw"
    options: tuple[tuple[str, Any], ...] = ()
    files: tuple[str, ...] = ()

    @property
    def is_directory(self) -> bool:
        return "." not in self.output


TORCH_WRITERS = {
    "dcp": Writer("dcp", files=(".metadata", "__0_0.distcp")),
    "hf-trainer": Writer(
        "checkpoint-3",
        "adamw-groups",
        (("model", Tiny()),),
        ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"),
    ),
    "accelerate": Writer("resume", options=(("model", Tiny()),), files=("model.safetensors", "optimizer.bin")),
    "deepspeed": Writer(
        "ds",
        "adamw-float32",
        (("world_size", 2),),
        (
            "latest",
            "global_step3/mp_rank_00_model_states.pt",
            "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ),
    ),
    "lightning": Writer("resume.ckpt", options=(("model", LitTiny()),)),
}
ORBAX_WRITERS = {
    "optax": Writer("orbax", files=("optstate.json", "_CHECKPOINT_METADATA")),
    "nnx": Writer("nnx", files=("optstate.json", "_CHECKPOINT_METADATA")),
    "train-state": Writer("ts", files=("optstate.json", "_CHECKPOINT_METADATA")),
}
WRITERS = {**TORCH_WRITERS, **ORBAX_WRITERS}
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT")


def points(writer: Writer, over: bool) -> tuple[str, ...]:
    # A file is replaced by one rename; a directory, over a previous one, by two: the previous aside, the new in.
    return ("first", "commit", "swap") if over and writer.is_directory else ("first", "commit")


MATRIX = [
    (name, point, signal_name, over)
    for name, writer in WRITERS.items()
    for over in (False, True)
    for point, signal_name in itertools.product(points(writer, over), SIGNALS)
]


def id_of(name: str, point: str, signal_name: str, over: bool) -> str:
    return f"{name}-{point}-{signal_name}-{'over' if over else 'fresh'}"


# ----------------------------------------------------------------------------- running the matrix


@dataclass(frozen=True)
class Matrix:
    cases: dict[str, Case]
    outcomes: dict[str, Outcome]
    previous: dict[str, dict[str, Any]]  # writer -> its previous output's tree
    states: dict[str, optstate.OptimizerState]  # kind -> the state the cases write


def case_directory(root: Path, name: str, point: str, signal_name: str, over: bool) -> str:
    return str(root / f"{name}-{point}-{signal_name or 'completes'}-{'over' if over else 'fresh'}")


def make_cases(root: Path) -> tuple[list[Case], list[Case]]:
    """The previous outputs' writes (one per writer, run to its end), and the matrix's cases, each in a directory
    of its own; the ``over`` cases' previous outputs are copied in once written."""
    templates = [
        Case(n, "none", "", False, str(root / f"{n}-previous"), w.output, "previous") for n, w in WRITERS.items()
    ]
    cases = [Case(n, p, s, o, case_directory(root, n, p, s, o), WRITERS[n].output) for n, p, s, o in MATRIX]
    cases += [
        Case(n, "none", "", True, case_directory(root, n, "none", "", True), w.output) for n, w in WRITERS.items()
    ]
    for case in templates + cases:
        Path(case.directory).mkdir()
    return templates, cases


def start_orbax_side(root: Path, cases: list[Case], templates: list[Case], states: dict[str, Path]):
    """The Orbax writers' parent (kill_matrix_child.py as a script), started; None without Orbax."""
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return None
    spec = {
        "states": {k: str(v) for k, v in states.items()},
        "templates": [asdict(c) for c in templates if c.writer in ORBAX_WRITERS],
        "cases": [asdict(c) for c in cases if c.writer in ORBAX_WRITERS],
        "results": str(root / "orbax-results.json"),
    }
    (root / "orbax-spec.json").write_text(json.dumps(spec))
    paths = [str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.Popen(
        [sys.executable, str(TESTS / "kill_matrix_child.py"), str(root / "orbax-spec.json")], env=env
    )


def torch_writer(states: dict[str, optstate.OptimizerState]):
    def write_for(case: Case):
        writer = WRITERS[case.writer]
        state = states[f"{writer.kind}-{case.state}"]

        def go(progress):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the trainers' writers say how to resume
                write(state, case.out, case.writer, force=True, progress=progress, **dict(writer.options))

        return go

    return write_for


def tree(directory: Path, leftovers_of: str | None = None) -> dict[str, Any]:
    """Every entry under ``directory``: a file's bytes, a directory as ``"dir"``; ``leftovers_of`` (an output's
    name) leaves out its ``.<name>.*.tmp`` entries, which SIGKILL may leave."""
    found: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        top = relative.parts[0]
        if leftovers_of and top.startswith(f".{leftovers_of}.") and top.endswith(".tmp"):
            continue
        found[str(relative)] = "dir" if path.is_dir() and not path.is_symlink() else path.read_bytes()
    return found


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    root = tmp_path_factory.mktemp("kill")
    states = {
        f"{kind}-{which}": trained(kind, seed, root)
        for kind in ("adamw", "adamw-groups", "adamw-float32")
        for which, seed in (("previous", 1), ("new", 2))
    }
    files = {which: save(states[f"adamw-{which}"], root / f"{which}.safetensors") for which in ("previous", "new")}
    templates, cases = make_cases(root)
    orbax_side = start_orbax_side(root, cases, templates, files)  # runs beside the torch side, on the other core
    write_for = torch_writer(states)
    outcomes = run([t for t in templates if t.writer in TORCH_WRITERS], write_for)
    for t in templates:
        if t.writer in TORCH_WRITERS and outcomes[t.id].status == 0:
            copy_previous(t.out, [c for c in cases if c.writer == t.writer])
    outcomes.update(run([c for c in cases if c.writer in TORCH_WRITERS], write_for))
    if orbax_side is not None:
        try:
            assert orbax_side.wait(240) == 0, "the Orbax side failed: see its output above"
        finally:
            orbax_side.kill()  # where it hung (the runner ends each of its own children itself)
        results = json.loads((root / "orbax-results.json").read_text())
        outcomes.update({k: Outcome(**v) for k, v in results.items()})
    previous = {t.writer: tree(Path(t.directory)) for t in templates}
    return Matrix({c.id: c for c in cases}, outcomes, previous, states)


def log_of(case: Case) -> str:
    """The end of what the child wrote (its traceback, if it failed)."""
    log = Path(f"{case.directory}.log")
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def outcome_of(matrix: Matrix, case_id: str) -> tuple[Case, Outcome]:
    case = matrix.cases[case_id]
    if case.writer in ORBAX_WRITERS and case_id not in matrix.outcomes:
        pytest.skip("Orbax is not installed")
    assert matrix.previous[case.writer], f"{case.writer}: the previous output was not written"
    return case, matrix.outcomes[case_id]


# ----------------------------------------------------------------------------- the tests


def assert_new_and_whole(matrix: Matrix, case: Case, after: dict[str, Any]) -> None:
    """The destination holds the new output, whole (every file a complete output holds; it reads back as the
    state written), and nothing is beside it."""
    writer = WRITERS[case.writer]
    assert after != matrix.previous[case.writer]
    assert all(entry.split(os.sep)[0] == case.output for entry in after), sorted(after)
    assert all(os.path.join(case.output, f) in after for f in writer.files), sorted(after)
    expected = matrix.states[f"{writer.kind}-new"]
    options = {k: v for k, v in writer.options if k == "model"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's reader says how to resume; nnx's that the layout is torch's
        back = read(case.out, case.writer if case.writer != "lightning" else "torch", **options)
    assert back.common_step() == expected.common_step() == 3
    assert len(back.slots) == len(expected.slots)
    for (slot, path), array in expected.slots.items():  # found by the parameter's last name: trainers prefix them
        ours = next(a for (s, p), a in back.slots.items() if s == slot and p[-1] == path[-1])
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(array), err_msg=f"{slot} {path}")


@pytest.mark.parametrize("case_id", [id_of(*row) for row in MATRIX])
def test_a_signalled_write_leaves_the_previous_output_or_nothing(matrix, case_id):
    """Absent (fresh) or the previous output byte for byte (over); or, where the writer held the signal until its
    write was done or has no such point, the new output whole. Nothing else after SIGTERM and SIGINT."""
    case, outcome = outcome_of(matrix, case_id)
    assert not outcome.hung, (outcome.hung, log_of(case))
    killed = case.signal_name == "SIGKILL"
    after = tree(Path(case.directory), case.output if killed else None)
    if not outcome.reached:  # e.g. a directory replaced in one step: no window between two renames
        assert case.point == "swap" and outcome.status == 0, (outcome, log_of(case))
        assert_new_and_whole(matrix, case, after)
        return
    assert outcome.underway, "no temporary entry when the child was signalled: the write was not under way"
    if after != (matrix.previous[case.writer] if case.over else {}):
        assert_new_and_whole(matrix, case, after)
    assert outcome.status == -signal.Signals[case.signal_name], (f"ended {outcome.status}", log_of(case))


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_write_that_completes_over_a_previous_output_leaves_the_new_one_whole(matrix, name):
    case, outcome = outcome_of(matrix, f"{name}-none-completes-over")
    assert outcome.status == 0, (outcome, log_of(case))
    assert_new_and_whole(matrix, case, tree(Path(case.directory)))
