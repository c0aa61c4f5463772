"""DeepSpeed checkpoints written by optstate and resumed by DeepSpeed itself (``engine.load_checkpoint``) on the
CPU with gloo: a 2-rank ZeRO-2 run resumed on 1 rank, a 1-rank run on 2, both as a ZeRO checkpoint for the new
world size and as a universal checkpoint (``load_universal``); a plain torch checkpoint converted by the
command line and resumed under ZeRO-2. Each resumed run is compared with the run that never stopped.

DeepSpeed runs in three subprocesses (1 rank, 2 ranks, 1 rank; torchrun), this file being their script; the
conversions run in rank 0 between a save and the next engine, or in pytest between the subprocesses. The loss
is linear in each layer's output, ``sum(c * fc(x))``, with ``x`` and ``c`` small multiples of 1/16, so that
every gradient is exact in fp32, the same on one rank as averaged over two, and below DeepSpeed's clipping
norm: ZeRO's AdamW then computes the same fp32 values elementwise over any partitioning, and a resumed run
matches the run that never stopped bit for bit (as DeepSpeed's own ds_to_universal + load does, checked here).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optstate.cli import main
from optstate.converters.formats import WriteOptions
from optstate.converters.torch import deepspeed as ds
from optstate.errors import UnsupportedError
from optstate.schema.state import OptimizerState, ParamInfo

pytest.importorskip("deepspeed")  # used by the subprocesses only

STEPS, MORE = 3, 4  # optimizer steps before the checkpoint, and after it
LAYERS = {"fc1": (5, 3), "fc2": (4, 7)}  # in, out: 53 trainable values in two param groups
LEARNING_RATE, STEP_SIZE, GAMMA = 0.05, 2, 0.5  # AdamW, StepLR


def batch(step: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each layer's input ``x`` (1, in) and output weights ``c`` (1, out) at a step: multiples of 1/16."""
    rng = np.random.default_rng(step)
    return {
        name: tuple((rng.integers(-4, 5, (1, n)) / 16).astype(np.float32) for n in (fan_in, fan_out))
        for name, (fan_in, fan_out) in LAYERS.items()
    }


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        for name, (fan_in, fan_out) in LAYERS.items():
            setattr(self, name, torch.nn.Linear(fan_in, fan_out))
        self.frozen = torch.nn.Linear(2, 3).requires_grad_(False)  # not the optimizer's: a weight to carry
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, **inputs):
        return sum((getattr(self, n)(x) * c).sum() for n, (x, c) in inputs.items())


def optimizer(net: Net, named: bool = False) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """AdamW in two param groups (weights decayed, biases not) and a StepLR; ``named``: built from named
    parameters, so that its state_dict names them (DeepSpeed's engine takes plain ones)."""
    trainable = [(n, (n, p) if named else p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LEARNING_RATE)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)


def inputs(step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: tuple(map(torch.from_numpy, xc)) for n, xc in batch(step).items()}


# ----------------------------------------------------------------------------- DeepSpeed, in subprocesses


def _engine(universal: bool = False, stage: int = 2):
    import deepspeed

    net = Net()
    opt, sched = optimizer(net)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a torch optimizer: DeepSpeed's own need compiled ops
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal},
    }
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        engine.backward(engine(**inputs(engine.global_steps)))
        engine.step()


def _masters(engine) -> dict[str, np.ndarray]:
    from deepspeed.utils import safe_get_full_fp32_param

    trainable = ((n, p) for n, p in engine.module.named_parameters() if p.requires_grad)
    return {n: safe_get_full_fp32_param(p).detach().numpy().copy() for n, p in trainable}


def _record(engine, path: Path) -> None:
    """The fp32 master weights the run reaches, the learning rates, and the module's weights that no optimizer
    touches (all ranks gather; rank 0 writes)."""
    import torch.distributed as dist

    masters = _masters(engine)
    module = {f"module.{n}": t.detach().numpy().copy() for n, t in engine.module.state_dict().items()}
    lrs = {"lr": np.array([g["lr"] for g in engine.optimizer.param_groups])}
    if dist.get_rank() == 0:
        np.savez(path, **masters, **{k: v for k, v in module.items() if "frozen" in k or "scale" in k}, **lrs)


def _resume(root: Path, record: Path, universal: bool = False, stage: int = 2) -> None:
    """DeepSpeed's own resume: a fresh engine, ``load_checkpoint``, MORE steps, recorded."""
    engine = _engine(universal, stage)
    path, _ = engine.load_checkpoint(root)
    assert path is not None, f"DeepSpeed found no checkpoint in {root}"
    assert engine.global_steps == STEPS
    _train(engine, MORE)
    _record(engine, record)


def _run(out: Path, name: str) -> None:
    """The run that never stopped: STEPS, a save, MORE steps, recorded."""
    engine = _engine()
    _train(engine, STEPS)
    engine.save_checkpoint(out / name)
    _train(engine, MORE)
    _record(engine, out / f"{name}.npz")


def _convert(src: Path, dst: Path, *flags: str) -> None:
    assert main(["convert", "--quiet", "--to", "deepspeed", *flags, str(src), str(dst)]) == 0


def _to_universal(step_dir: Path) -> None:
    """DeepSpeed's own two-step conversion, for comparison."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(
        argparse.Namespace(
            input_folder=str(step_dir),
            output_folder=f"{step_dir}_universal",
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
    )


def run_deepspeed(out: Path, phase: str) -> None:
    """One phase of the test under torchrun: ``first`` (1 rank) trains ``one``; ``second`` (2 ranks) trains
    ``two`` and resumes ``one`` converted for 2 ranks and as a universal checkpoint; ``third`` (1 rank) resumes
    ``two`` converted for 1 rank, optstate's universal, ds_to_universal's, and the torch checkpoint."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    # The shared-memory allreduce is a C++ op DeepSpeed compiles on first use (a minute); gloo reduces as well.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if phase == "first":
        _run(out, "one")
    elif phase == "second":
        _run(out, "two")
        if rank == 0:
            _convert(out / "one", out / "one-to-2", "--world-size", "2")
            _convert(out / "one", out / "one-universal")
            _convert(out / "two", out / "two-to-1", "--world-size", "1")
            _convert(out / "two", out / "two-universal")
            _to_universal(out / "two" / f"global_step{STEPS}")
        dist.barrier()
        _resume(out / "one-to-2", out / "one-to-2.npz")
        _resume(out / "one-universal", out / "one-universal-on-2.npz", universal=True)
    else:
        _resume(out / "two-to-1", out / "two-to-1.npz")
        _resume(out / "two-to-1", out / "two-to-1-zero1.npz", stage=1)  # ZeRO 1 loads the same files
        _resume(out / "two-universal", out / "two-universal-on-1.npz", universal=True)
        _resume(out / "two", out / "ds-universal-on-1.npz", universal=True)  # ds_to_universal's latest_universal
        _resume(out / "torch-to-1", out / "torch-to-1.npz")


def _torch_run(out: Path) -> None:
    """The same training in plain torch (fp32, no DeepSpeed): STEPS, a torch.save checkpoint, MORE steps."""
    net = Net()
    opt, sched = optimizer(net, named=True)
    for step in range(STEPS + MORE):
        if step == STEPS:
            torch.save(
                {"model": net.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()},
                out / "torch.pt",
            )
        opt.zero_grad()
        net(**inputs(step)).backward()
        opt.step()
        sched.step()
    trainable = {n: p.detach().numpy().copy() for n, p in net.named_parameters() if p.requires_grad}
    np.savez(out / "torch.npz", **trainable, lr=np.array([g["lr"] for g in opt.param_groups]))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """Every phase's checkpoints, conversions and recorded runs."""
    out = tmp_path_factory.mktemp("deepspeed-write")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for phase, ranks in (("first", 1), ("second", 2), ("third", 1)):
        if phase == "third":
            _torch_run(out)
            _convert(out / "torch.pt", out / "torch-to-1", "--world-size", "1")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        done = subprocess.run(
            [*launch, __file__, str(out), phase], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _same(out: Path, resumed: str, reference: str) -> None:
    ours, theirs = np.load(out / f"{resumed}.npz"), np.load(out / f"{reference}.npz")
    assert set(theirs) <= set(ours) and len(theirs) >= 5
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{resumed} vs {reference}: {name}")


# ----------------------------------------------------------------------------- resumed by DeepSpeed


@pytest.mark.parametrize(
    ("resumed", "reference"),
    [
        ("two-to-1", "two"),  # 2 ranks -> a ZeRO-2 checkpoint for 1 rank
        ("two-to-1-zero1", "two"),  # resumed by ZeRO-1
        ("one-to-2", "one"),  # 1 rank -> 2 ranks
        ("two-universal-on-1", "two"),  # optstate's universal checkpoint, loaded on 1 rank
        ("one-universal-on-2", "one"),  # and on 2
    ],
)
def test_deepspeed_resumes_on_another_world_size_as_if_it_never_stopped(out, resumed, reference):
    """Bit for bit: the fp32 master weights MORE steps later, the StepLR's learning rates, the frozen layer
    and the buffer."""
    _same(out, resumed, reference)


def test_ds_to_universal_resumes_the_same(out):
    """DeepSpeed's own two-step way (ds_to_universal, then load_universal) reaches the same weights: the
    tolerance both share is zero."""
    _same(out, "ds-universal-on-1", "two")
    _same(out, "two-universal-on-1", "ds-universal-on-1")


def test_a_plain_torch_checkpoint_resumes_under_zero(out):
    """A torch.save checkpoint of the model and AdamW, converted by the command line for 1 rank: DeepSpeed
    continues it as torch itself does."""
    _same(out, "torch-to-1", "torch")


# ----------------------------------------------------------------------------- what was written


def _read(path: Path):
    with pytest.warns(UserWarning, match="clips the gradients"):
        return ds.read_checkpoint(path)


@pytest.mark.parametrize("written", ["two-to-1", "one-to-2", "two-universal"])
def test_optstate_reads_back_the_state_it_wrote(out, written):
    source = _read(out / written.split("-")[0])
    again = _read(out / written)
    assert (again.params, again.param_groups, again.metadata.lr_scheduler) == (
        source.params,
        source.param_groups,
        source.metadata.lr_scheduler,
    )
    for key, array in source.slots.items():
        np.testing.assert_array_equal(np.asarray(again.slots[key]), np.asarray(array))
    assert again.weights is not None and source.weights is not None
    assert list(again.weights) == list(source.weights)
    for key, array in source.weights.items():
        np.testing.assert_array_equal(np.asarray(again.weights[key]), np.asarray(array))


def test_the_layout_is_deepspeeds(out):
    """The rank files are DeepSpeed's own for that world size: partitions of 2 x ranks-aligned flat groups,
    the padding on the last rank, the wrapped AdamW's state over the padded partition."""
    step_dir = out / "one-to-2" / f"global_step{STEPS}"
    theirs = out / "two" / f"global_step{STEPS}"
    for rank in (0, 1):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        mine = torch.load(step_dir / name, weights_only=True)["optimizer_state_dict"]
        real = torch.load(theirs / name, weights_only=False)["optimizer_state_dict"]
        for key in ("group_paddings", "partition_count", "param_alignment_paddings"):
            assert mine[key] == real[key], key
        assert [t.shape for t in mine["single_partition_of_fp32_groups"]] == [
            t.shape for t in real["single_partition_of_fp32_groups"]
        ]
        state, real_state = mine["base_optimizer_state"]["state"], real["base_optimizer_state"]["state"]
        assert {g: {k: tuple(v.shape) for k, v in s.items()} for g, s in state.items()} == {
            g: {k: tuple(v.shape) for k, v in s.items()} for g, s in real_state.items()
        }
    assert (out / "two-universal" / "latest_universal").read_text() == f"global_step{STEPS}_universal"
    universal = out / "two-universal" / f"global_step{STEPS}_universal" / "zero"
    assert sorted(p.name for p in (universal / "fc2.weight").iterdir()) == [
        "exp_avg.pt",
        "exp_avg_sq.pt",
        "fp32.pt",
        "step.pt",
    ]


def test_inspect_reads_the_output(out, capsys):
    # A universal root holds latest_universal, not latest: named with --from until the row's markers hold it.
    for args in (["two-to-1"], ["--from", "deepspeed", "two-universal"]):
        assert main(["inspect", *args[:-1], str(out / args[-1])]) == 0
        text = capsys.readouterr().out
        assert "AdamW, 4 parameters, step 3" in text and "frozen.weight" in text
        # optstate's universal output is not said to be ds_to_universal's
        assert ("(a universal checkpoint of ZeRO-2)" in text) == (args[-1] == "two-universal"), text


def test_the_model_given_orders_the_flat_groups():
    """ZeRO flattens a group in the order the model registers its parameters; ``--model`` gives that order where
    the state's own is another (a state read from Optax, say)."""
    shapes = {"fc2.weight": (7, 4), "fc1.weight": (3, 5)}
    params = tuple(ParamInfo(tuple(n.split(".")), s, "float32", 0) for n, s in shapes.items())
    state = OptimizerState("adamw", ({"lr": 0.1},), params, {}, {p.path: np.zeros(p.shape, np.float32) for p in params})
    names = [[".".join(p.path) for p in ds.write_groups(state, model)[0].params] for model in (None, Net())]
    assert names == [["fc2.weight", "fc1.weight"], ["fc1.weight", "fc2.weight"]]


# ----------------------------------------------------------------------------- what is refused


def test_a_float64_state_is_refused_by_name(tmp_path, capsys):
    """DeepSpeed ZeRO keeps fp32 master weights and state: a float64 one would be rounded."""
    net = torch.nn.Linear(2, 2).double()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    opt.step()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "f64.pt")
    code = main(["convert", "--quiet", "--to", "deepspeed", str(tmp_path / "f64.pt"), str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code == 1 and "weight is a float64 parameter" in err and "expected float32" in err
    assert not (tmp_path / "ds").exists() and [p.name for p in tmp_path.iterdir()] == ["f64.pt"]


def _adamw(step: int = STEPS, **metadata) -> OptimizerState:
    """A small fp32 AdamW state with weights, its two parameters in the state's order ``fc2`` before ``fc1``."""
    shapes = {"fc2.weight": (7, 4), "fc1.weight": (3, 5)}
    params = tuple(ParamInfo(tuple(n.split(".")), s, "float32", 0, step) for n, s in shapes.items())
    slots = {(k, p.path): np.ones(p.shape, np.float32) for k in ("first_moment", "second_moment") for p in params}
    weights = {p.path: np.zeros(p.shape, np.float32) for p in params}
    state = OptimizerState("adamw", ({"lr": 0.1},), params, slots, weights)
    return state.with_metadata(**{"source": "torch 2.13", **metadata})


@pytest.mark.parametrize(
    ("state", "options", "message"),
    [
        # Optax orders its tree by key: ZeRO would flatten the parameters in the wrong places.
        (_adamw(source="optax 0.2.8"), {"world_size": 1}, "comes from optax 0.2.8, whose parameter order"),
        # A scheduler drove the state (its groups hold initial_lr) and its state is not carried.
        (
            dataclasses.replace(_adamw(), param_groups=({"lr": 0.05, "initial_lr": 0.1},)),
            {},
            "holds 'initial_lr'.*--constant-lr",
        ),
        (_adamw(schedule_count=STEPS), {}, "an Optax schedule at count 3.*--constant-lr"),
        # --step is the engine's global step: it must agree with the optimizer's.
        (_adamw(), {"step": STEPS + 1}, "steps disagree: the optimizer's step count 3, --step 4"),
        # ZeRO keeps the step in float32.
        (_adamw(step=2**24 + 1), {}, r"step 16777217 is past 2\*\*24"),
    ],
    ids=["optax-order", "initial_lr", "optax-schedule", "--step", "float32-step"],
)
def test_what_zero_cannot_resume_as_it_stopped_is_refused(tmp_path, state, options, message):
    with pytest.raises(UnsupportedError, match=message):
        ds.write(state, tmp_path / "ds", WriteOptions(**options))
    assert list(tmp_path.iterdir()) == []


def test_the_constant_lr_and_the_model_let_them_through(tmp_path):
    """With --constant-lr the scheduler's keys are dropped; with the model, an Optax state's order is the model's."""
    constant = dataclasses.replace(_adamw(constant_lr=True), param_groups=({"lr": 0.05, "initial_lr": 0.1},))
    ds.write(constant, tmp_path / "constant", WriteOptions(world_size=1))
    model = tmp_path / "constant" / f"global_step{STEPS}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    groups = torch.load(model, weights_only=True)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert groups[0]["lr"] == 0.05 and "initial_lr" not in groups[0]
    net = torch.nn.Module()
    net.fc1, net.fc2 = torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(4, 7, bias=False)
    ds.write(_adamw(source="optax 0.2.8"), tmp_path / "optax", WriteOptions(world_size=1, model=net))
    shapes = torch.load(tmp_path / "optax" / f"global_step{STEPS}" / ds.MODEL_STATES, weights_only=True)["param_shapes"]
    assert list(shapes[0]) == ["fc1.weight", "fc2.weight"]


def test_an_existing_output_is_kept(out, tmp_path, capsys):
    dst = shutil.copytree(out / "two-to-1", tmp_path / "dst")
    before = sorted(p.name for p in dst.rglob("*"))
    assert main(["convert", "--quiet", "--to", "deepspeed", str(out / "two"), str(dst)]) == 1
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in dst.rglob("*")) == before


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a phase of this test's DeepSpeed runs, under torchrun")
    parser.add_argument("out", type=Path)
    parser.add_argument("phase", choices=("first", "second", "third"))
    arguments = parser.parse_args()
    run_deepspeed(arguments.out, arguments.phase)
