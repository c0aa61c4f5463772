"""DeepSpeed ZeRO checkpoints written by DeepSpeed itself on the CPU (stages 1, 2 and 3; fp32 and bf16; one
and two ranks): read without DeepSpeed, converted to Optax, continued there, and compared with DeepSpeed
resuming the same checkpoint; compared with what ds_to_universal makes of them; rank files of two real
checkpoints mixed are refused by name.

DeepSpeed runs in two subprocesses (one rank, and two ranks through torchrun, gloo), this file being their
script: each run trains, saves, resumes the checkpoint in a fresh engine and records the fp32 master
weights it reaches. The loss is linear in each layer's output, ``sum(c * fc(x))``, with ``x`` and ``c``
small multiples of 1/16, so that every gradient (``c x^T`` and ``c``) is exact in bf16 and fp32 alike,
does not depend on the weights, and stays below DeepSpeed's default clipping norm of 1.0: Optax continues
from the very same gradients, and what differs is the optimizer's own arithmetic.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import optstate
from optstate.cli import main
from optstate.converters.formats import ReadOptions
from optstate.converters.torch import deepspeed as ds_reader
from optstate.converters.torch import ptfile
from optstate.errors import FormatError

pytest.importorskip("deepspeed")  # used by the subprocesses only

# Torch computes an fp32 update with double-precision hyperparameters (1 - beta2 is 0.001, not float32's
# 0.00099998713); so does the Optax transform once x64 is enabled, its arrays staying fp32.
jax.config.update("jax_enable_x64", True)

STEPS, MORE = 3, 4  # optimizer steps before the checkpoint, and after it
LAYERS = {"fc1": (5, 3), "fc2": (4, 7)}  # in, out: 53 trainable values; two ranks split fc2.weight
WIDE = {"fc1": (6, 3), "fc2": (4, 7)}  # another model, whose rank files do not fit LAYERS'
# Torch's AdamW and optstate's in JAX both compute in fp32, in another order: a few ulps of the weights
# after MORE steps (measured: at most 2 ulps of the tensor's largest weight).
ULPS = 4


@dataclass(frozen=True)
class Run:
    """One DeepSpeed run: ZeRO stage, dtype, LR scheduler (a torch one, or DeepSpeed's own WarmupLR)."""

    stage: int
    dtype: str = "fp32"
    scheduler: str | None = None
    layers: dict[str, tuple[int, int]] = field(default_factory=lambda: LAYERS)

    @property
    def resumes(self) -> bool:
        """Whether DeepSpeed resumes it for a comparison (the others are only read, or refused)."""
        return self.scheduler != "WarmupLR" and self.layers == LAYERS


RUNS = {
    1: {
        "zero1": Run(1),
        "zero2": Run(2),
        "zero3": Run(3, scheduler="StepLR"),
        "zero2-bf16": Run(2, "bf16"),
        "warmup": Run(2, scheduler="WarmupLR"),
    },
    2: {
        "zero1": Run(1),
        "zero2": Run(2, scheduler="StepLR"),
        "zero3": Run(3),
        "zero3-bf16": Run(3, "bf16"),
        "zero2-wide": Run(2, layers=WIDE),
    },
}
CONTINUED = [(ranks, name) for ranks, runs in RUNS.items() for name, run in runs.items() if run.resumes]
UNIVERSAL = ("zero2", "zero3")  # of two ranks, converted by ds_to_universal


def batch(step: int, layers: dict[str, tuple[int, int]] = LAYERS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each layer's input ``x`` (1, in) and output weights ``c`` (1, out) at a step: multiples of 1/16."""
    rng = np.random.default_rng(step)
    return {
        name: tuple((rng.integers(-4, 5, (1, n)) / 16).astype(np.float32) for n in (fan_in, fan_out))
        for name, (fan_in, fan_out) in layers.items()
    }


def gradients(step: int) -> dict[str, np.ndarray]:
    """The loss's exact gradient at a step, by parameter name: ``c x^T`` for a weight, ``c`` for a bias."""
    grads = {}
    for name, (x, c) in batch(step).items():
        grads[f"{name}.weight"], grads[f"{name}.bias"] = c.T @ x, c[0]
    return grads


# ----------------------------------------------------------------------------- DeepSpeed, in subprocesses


def _engine(run: Run):
    import deepspeed
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            for name, (fan_in, fan_out) in run.layers.items():
                setattr(self, name, torch.nn.Linear(fan_in, fan_out))
            self.frozen = torch.nn.Linear(2, 3).requires_grad_(False)  # not the optimizer's: a weight to carry
            self.register_buffer("scale", torch.tensor([2.0]))

        def forward(self, **inputs):
            dtype = self.fc1.weight.dtype
            return sum((getattr(self, n)(x.to(dtype)) * c.to(dtype)).sum() for n, (x, c) in inputs.items())

    net = Net()
    weights = [p for n, p in net.named_parameters() if n.endswith("weight") and p.requires_grad]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias") and p.requires_grad]
    groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.05)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": run.stage},
        "zero_allow_untested_optimizer": True,  # a torch optimizer: DeepSpeed's own need compiled ops
        "bf16": {"enabled": run.dtype == "bf16"},
        "steps_per_print": 10**9,
    }
    sched = None
    if run.scheduler == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    elif run.scheduler == "WarmupLR":
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def _train(engine, run: Run, steps: int) -> None:
    import torch

    for _ in range(steps):
        inputs = {n: tuple(map(torch.from_numpy, xc)) for n, xc in batch(engine.global_steps, run.layers).items()}
        engine.backward(engine(**inputs))
        engine.step()


def _masters(engine) -> dict[str, np.ndarray]:
    from deepspeed.utils import safe_get_full_fp32_param

    # A collective under ZeRO-3: every rank gathers.
    trainable = ((n, p) for n, p in engine.module.named_parameters() if p.requires_grad)
    return {n: safe_get_full_fp32_param(p).detach().numpy().copy() for n, p in trainable}


def _to_universal(step_dir: Path) -> None:
    """ds_to_universal, in this process (one worker: it forks none)."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(
        argparse.Namespace(
            input_folder=str(step_dir),
            output_folder=f"{step_dir}_universal",
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # a plain save_checkpoint() lacks universal_checkpoint_info
        )
    )


def run_deepspeed(out: Path) -> None:
    """Train, save and resume each run of this world size; rank 0 records the masters the resumed run reaches."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    # The shared-memory allreduce is a C++ op DeepSpeed compiles on first use (a minute); gloo reduces as well.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    ranks, rank = dist.get_world_size(), dist.get_rank()
    for name, run in RUNS[ranks].items():
        engine = _engine(run)
        _train(engine, run, STEPS)
        engine.save_checkpoint(out / name)
        if not run.resumes:
            continue
        engine = _engine(run)
        engine.load_checkpoint(out / name)
        _train(engine, run, MORE)
        masters = _masters(engine)
        if name == "zero2":
            engine.save_checkpoint(out / f"{name}-later")  # to mix its rank files with the first save's
        if rank == 0:
            np.savez(out / name / "continued.npz", **masters)
    dist.barrier()
    if ranks == 2 and rank == 0:
        for name in UNIVERSAL:
            _to_universal(out / name / f"global_step{STEPS}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Every run's checkpoint, by world size: ``runs[ranks] / name``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    dirs = {}
    for ranks in RUNS:
        out = tmp_path_factory.mktemp(f"deepspeed-{ranks}")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        done = subprocess.run([*launch, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        dirs[ranks] = out
    return dirs


def _read(path: Path) -> optstate.OptimizerState:
    with pytest.warns(UserWarning, match="clips the gradients"):
        return ds_reader.read_checkpoint(path)


# ----------------------------------------------------------------------------- continuing in Optax


def _optax_continues(directory: Path) -> dict[str, np.ndarray]:
    params, opt_state, tx = optstate.load_optax(directory)

    def name(path) -> str:
        return ".".join(str(k.key) for k in path)

    for step in range(STEPS, STEPS + MORE):
        grads = gradients(step)  # the frozen layer's leaves get zeros, which its partition ignores
        tree = jax.tree_util.tree_map_with_path(lambda p, leaf, g=grads: g.get(name(p), np.zeros_like(leaf)), params)
        updates, opt_state = tx.update(tree, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {name(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize(("ranks", "name"), CONTINUED, ids=[f"{r}ranks-{n}" for r, n in CONTINUED])
def test_optax_continues_as_deepspeed_resumes(runs, ranks, name, tmp_path):
    ckpt = runs[ranks] / name
    assert main(["convert", "--to", "optax", "--horizon", "50", str(ckpt), str(tmp_path / "out")]) == 0
    ours = _optax_continues(tmp_path / "out")
    theirs = dict(np.load(ckpt / "continued.npz"))
    assert {n: ours[n].dtype for n in theirs} == {n: np.dtype(np.float32) for n in theirs}
    for n in theirs:
        # In ulps of the tensor's largest weight: a weight near zero has ulps far finer than its updates.
        ulps = np.abs(ours[n] - theirs[n]).max() / np.spacing(np.abs(theirs[n]).max())
        assert ulps <= ULPS, f"{n}: {ulps} ulps"
    frozen = _read(ckpt).weights
    np.testing.assert_array_equal(ours["frozen.weight"], np.asarray(frozen[("frozen", "weight")], np.float32))


def test_a_torch_scheduler_travels_and_deepspeeds_own_is_refused_by_name(runs, capsys):
    state = _read(runs[2] / "zero2")
    assert state.metadata.lr_scheduler["step_size"] == 2 and state.param_groups[0]["lr"] == 0.025
    assert main(["convert", "--to", "optax", str(runs[1] / "warmup"), str(runs[1] / "warmup-out")]) == 1
    assert "DeepSpeed's own WarmupLR" in capsys.readouterr().err
    assert not (runs[1] / "warmup-out").exists()


# ----------------------------------------------------------------------------- what was read


def test_inspect_names_the_layout_and_what_is_not_carried(runs, capsys):
    ckpt = runs[2] / "zero3"
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "AdamW, 4 parameters, step 3" in out and "frozen.weight" in out and "to Optax: exact" in out
    report = ds_reader.inspect(ckpt)
    assert report.optax == "exact" and report.params[0].step == STEPS
    assert any("DeepSpeed 0.19" in n and "ZeRO-3, 2 ranks" in n for n in report.notes)
    assert any("clips the gradients to a global norm of 1" in n for n in report.notes)


@pytest.mark.parametrize("name", UNIVERSAL)
def test_the_state_is_what_ds_to_universal_makes_of_it(runs, name):
    """ds_to_universal joins the ranks' partitions with DeepSpeed's own code; its files, read raw, hold
    the state optstate read from the partitions, bit for bit, and optstate reads its layout the same."""
    step_dir = runs[2] / name / f"global_step{STEPS}"
    state = _read(runs[2] / name)
    universal = Path(f"{step_dir}_universal")
    for info in state.params:
        folder = universal / "zero" / ".".join(info.path)
        for slot, key in (("first_moment", "exp_avg"), ("second_moment", "exp_avg_sq")):
            raw = ptfile.load(folder / f"{key}.pt", records=True)
            raw = raw["param"] if isinstance(raw, dict) else raw
            np.testing.assert_array_equal(np.asarray(state.slots[(slot, info.path)]), raw.reshape(info.shape))
        raw = ptfile.load(folder / "fp32.pt", records=True)
        raw = raw["param"] if isinstance(raw, dict) else raw
        np.testing.assert_array_equal(np.asarray(state.weights[info.path]), raw.reshape(info.shape))
    again = _read(universal)
    assert (again.params, again.param_groups, again.metadata.lr_scheduler) == (
        state.params,
        state.param_groups,
        state.metadata.lr_scheduler,
    )
    for key, array in state.slots.items():
        np.testing.assert_array_equal(np.asarray(again.slots[key]), np.asarray(array))


def test_a_parameter_straddling_two_ranks_is_joined_when_read(runs):
    state = _read(runs[2] / "zero2")
    exp_avg = state.slots[("first_moment", ("fc2", "weight"))]
    assert type(exp_avg).__name__ == "Deferred" and np.asarray(exp_avg).shape == (7, 4)
    assert state.slots[("first_moment", ("fc1", "weight"))].base is not None  # a view of rank 0's file


# ----------------------------------------------------------------------------- rank files that do not belong


def _mixed(runs, tmp_path, name: str, replace: dict[str, Path]) -> Path:
    """A copy of a two-rank checkpoint with some of its files replaced by another real checkpoint's."""
    ckpt = shutil.copytree(runs[2] / name, tmp_path / name)
    step_dir = ckpt / f"global_step{STEPS}"
    for file, source in replace.items():
        (step_dir / file).unlink(missing_ok=True)
        if source is not None:
            shutil.copy(source, step_dir / file)
    return ckpt


RANK1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
LATER = f"zero2-later/global_step{STEPS + MORE}"


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        # rank 1 saved four steps later
        ({RANK1: f"{LATER}/{RANK1}"}, r"rank 1 is at step 7 on flat group 0 \(fc2.weight\), rank 0 at step 3"),
        # rank 1 of another model: its partition does not add up
        ({RANK1: f"zero2-wide/global_step{STEPS}/{RANK1}"}, r"rank 1's fp32 master partition of flat group 0 holds 22"),
        # rank 1 of a ZeRO-1 run
        ({RANK1: f"zero1/global_step{STEPS}/{RANK1}"}, r"rank 1 was saved by ZeRO stage 1, rank 0 by stage 2"),
        # rank 1 missing: rank 0 was one of two
        ({RANK1: None}, r"rank 0 was one of 2 ranks \(partition_count\), the directory holds 1"),
        # the model states of the later save
        ({"mp_rank_00_model_states.pt": f"{LATER}/mp_rank_00_model_states.pt"}, r"global_steps 7\), .* at step 3"),
    ],
    ids=["another-step", "another-model", "another-stage", "missing-rank", "model-states-of-another-step"],
)
def test_rank_files_of_two_checkpoints_are_refused_by_rank_and_parameter(runs, tmp_path, replace, message):
    ckpt = _mixed(runs, tmp_path, "zero2", {f: None if s is None else runs[2] / s for f, s in replace.items()})
    with pytest.raises(FormatError, match=message):
        ds_reader.read_checkpoint(ckpt)


def test_a_zero3_rank_file_of_a_half_precision_run_is_refused(runs, tmp_path):
    bf16 = runs[2] / f"zero3-bf16/global_step{STEPS}/bf16_{RANK1}"
    ckpt = _mixed(runs, tmp_path, "zero3", {RANK1: None, f"bf16_{RANK1}": bf16})
    with pytest.raises(FormatError, match=re.escape(f"bf16_{RANK1} and zero_pp_rank_0") + ".* half precision"):
        ds_reader.read(ckpt, ReadOptions())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the DeepSpeed runs of this test, under torchrun")
    parser.add_argument("out", type=Path)
    run_deepspeed(parser.parse_args().out)
