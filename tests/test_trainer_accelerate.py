"""accelerate ``save_state`` directories, written by accelerate itself: converted with ``optstate convert``,
continued in Optax, compared with accelerate's own ``load_state`` continuing the same steps; the parameter
order never guessed from the sorted safetensors keys; the RNG pickle never opened."""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import optstate
from optstate.api import read
from optstate.cli import main

from frameworks import TinyNet, jax_train, torch_params
from helpers import flat, gradient

STEPS, MORE = 4, 5  # optimizer steps before save_state, steps after it
TOL = 1e-12
MODEL = "test_trainer_accelerate:make_model"  # tests/ is on sys.path (pyproject's pythonpath)


def make_model() -> torch.nn.Module:
    """The model the optimizer was built from, for ``--model``: what ``named_parameters()`` lists, in order."""
    return TinyNet()


class Square(torch.nn.Module):
    """Two layers of one shape, registered in the reverse of their sorted names: aligning the optimizer with
    the sorted safetensors keys would swap their states without any shape telling."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)
        self.a = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64)


def make_square() -> torch.nn.Module:
    return Square()


RECIPES = {
    "AdamW+LinearLR": (
        lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=6),
    ),
    "SGD+StepLR": (
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    ),
    "AdamW+LambdaLR": (
        lambda params: torch.optim.AdamW(params, lr=0.05),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
    ),
}


def _train(model, opt, sched, steps: range) -> None:
    """accelerate's loop with the gradients of tests/helpers.py set directly, so that Optax sees the same ones."""
    for step in steps:
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(gradient(step, name, p.detach().numpy().copy()))
        opt.step()
        sched.step()
        opt.zero_grad()


def _prepared(recipe: str, named: bool, model: torch.nn.Module | None = None):
    """A model, optimizer and scheduler prepared by a CPU Accelerator; the optimizer built from
    ``named_parameters()`` (it saves param_names) or from ``parameters()`` (it does not)."""
    make_opt, make_sched = RECIPES[recipe]
    model = make_model() if model is None else model
    opt = make_opt(model.named_parameters() if named else model.parameters())
    accelerator = Accelerator(cpu=True)
    return accelerator, *accelerator.prepare(model, opt, make_sched(opt))


def save_state(directory, recipe: str, named: bool, model: torch.nn.Module | None = None):
    accelerator, model, opt, sched = _prepared(recipe, named, model)
    _train(model, opt, sched, range(STEPS))
    accelerator.save_state(directory)
    return model, opt


def accelerate_continues(directory, recipe: str, named: bool) -> dict[str, np.ndarray]:
    """What accelerate itself does next: load_state into fresh objects, then the same steps Optax takes."""
    accelerator, model, opt, sched = _prepared(recipe, named)
    accelerator.load_state(directory)
    _train(model, opt, sched, range(STEPS, STEPS + MORE))
    return torch_params(model)


def optax_continues(directory) -> dict[str, np.ndarray]:
    params, opt_state, tx = optstate.load_optax(directory)
    params, _ = jax_train(tx, params, opt_state, range(STEPS, STEPS + MORE))
    return flat(params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(recipe, named)``: a save_state directory, written once per module."""
    cache: dict[tuple[str, bool], str] = {}

    def get(recipe: str, named: bool) -> str:
        if (recipe, named) not in cache:
            directory = tmp_path_factory.mktemp("accelerate") / "ckpt"
            save_state(directory, recipe, named)
            cache[recipe, named] = str(directory)
        return cache[recipe, named]

    return get


# ----------------------------------------------------------------------------- continuing exactly


@pytest.mark.parametrize("named", [True, False], ids=["param_names", "--model"])
@pytest.mark.parametrize("recipe", ["AdamW+LinearLR", "SGD+StepLR"])
def test_save_state_continues_exactly_in_optax(saved, tmp_path, recipe, named):
    directory, out = saved(recipe, named), tmp_path / "out"
    model_flag = [] if named else ["--model", MODEL]
    assert main(["convert", "--to", "optax", "--horizon", "50", *model_flag, directory, str(out)]) == 0
    ours, theirs = optax_continues(out), accelerate_continues(directory, recipe, named)
    assert ours.keys() == theirs.keys() == {n for n, _ in make_model().named_parameters()}
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


def test_the_state_is_the_optimizers_own(saved):
    """Slot by slot, by name, what torch.load reads from optimizer.bin, and the weights of model.safetensors."""
    directory = saved("AdamW+LinearLR", False)
    state = read(directory, model=MODEL)
    sd = torch.load(os.path.join(directory, "optimizer.bin"), weights_only=True)
    for index, (name, _) in enumerate(make_model().named_parameters()):
        path = tuple(name.split("."))
        np.testing.assert_array_equal(state.slots["first_moment", path], sd["state"][index]["exp_avg"].numpy())
        np.testing.assert_array_equal(state.slots["second_moment", path], sd["state"][index]["exp_avg_sq"].numpy())
        assert state.params[index].step == STEPS
    assert state.metadata.source == "accelerate"
    assert state.metadata.lr_scheduler["last_epoch"] == STEPS


# ----------------------------------------------------------------------------- inspect


def test_inspect_reads_the_directory_and_says_what_is_not_carried(saved, capsys):
    directory = saved("AdamW+LinearLR", True)
    assert main(["inspect", directory]) == 0
    out = capsys.readouterr().out
    assert f"{directory} (accelerate)" in out
    assert "optimizer: AdamW, 4 parameters, step 4" in out
    assert "LR scheduler state: yes" in out
    assert "to Optax: exact" in out
    assert "not carried (never opened): random_states_0.pkl: RNG states" in out


def test_inspect_names_the_model_as_the_source_of_names(saved, capsys):
    assert main(["inspect", "--model", MODEL, saved("SGD+StepLR", False)]) == 0
    assert "parameter names: aligned by position with the model given (--model)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- refusals


def test_without_param_names_or_model_the_sorted_keys_are_never_used(tmp_path, capsys):
    """Square's layers have one shape: aligned with the sorted keys (a, b) instead of the order the optimizer
    was built in (b, a), their states would swap silently. Refused without --model; right with it."""
    directory = tmp_path / "ckpt"
    model, opt = save_state(directory, "SGD+StepLR", named=False, model=Square())
    assert main(["convert", "--to", "optax", "--horizon", "50", str(directory), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "saved no param_names" in err and "sorted" in err and "--model" in err
    assert not (tmp_path / "out").exists()

    state = read(directory, model="test_trainer_accelerate:make_square")
    buffers = {name: opt.state[getattr(model, name).weight]["momentum_buffer"].numpy() for name in ("a", "b")}
    assert not np.array_equal(buffers["a"], buffers["b"])  # a swap would show
    for name, expected in buffers.items():
        np.testing.assert_array_equal(state.slots["momentum", (name, "weight")], expected)


def test_a_lambda_lr_is_refused_by_name(saved, tmp_path, capsys):
    directory = saved("AdamW+LambdaLR", True)
    assert main(["convert", "--to", "optax", directory, str(tmp_path / "out")]) == 1
    assert "LambdaLR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert "LambdaLR" in optstate.inspect(directory).optax


def test_several_optimizers_are_refused_by_name(tmp_path, capsys):
    model = make_model()
    adamw = torch.optim.AdamW(model.fc1.named_parameters(prefix="fc1"), lr=0.05)
    sgd = torch.optim.SGD(model.fc2.named_parameters(prefix="fc2"), lr=0.1, momentum=0.9)
    accelerator = Accelerator(cpu=True)
    model, adamw, sgd = accelerator.prepare(model, adamw, sgd)
    for step in range(2):
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(gradient(step, name, p.detach().numpy().copy()))
        adamw.step()
        sgd.step()
    accelerator.save_state(tmp_path / "ckpt")
    assert main(["convert", "--to", "optax", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "optimizer.bin, optimizer_1.bin" in err and "one optimizer" in err


def test_the_rng_pickle_is_never_opened(saved, tmp_path, monkeypatch):
    """random_states_0.pkl pickles NumPy's RNG state: opening it at all is refused here, and nothing needs to."""

    def refusing(real):
        def opener(file, *args, **kwargs):
            if os.path.basename(os.fsdecode(file) if not isinstance(file, int) else "").startswith("random_states"):
                raise AssertionError(f"{file} was opened")
            return real(file, *args, **kwargs)

        return opener

    directory = saved("AdamW+LinearLR", True)
    assert os.path.isfile(os.path.join(directory, "random_states_0.pkl"))
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, refusing(getattr(module, name)))
    assert main(["inspect", directory]) == 0
    assert main(["convert", "--to", "optax", "--horizon", "50", directory, str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------- several processes


def save_state_per_process(root: str) -> None:
    """Run under ``torch.distributed.run`` (two CPU processes, DistributedDataParallel): one save_state per recipe."""
    for recipe in ("AdamW+LinearLR", "SGD+StepLR"):
        save_state(os.path.join(root, recipe), recipe, named=False)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-processes")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*launch, __file__, str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_a_scheduler_stepped_once_per_process_is_never_continued_as_once_per_step(two_processes, tmp_path, capsys):
    """Two processes, no split_batches: accelerate steps the LR scheduler twice per optimizer step. AdamW's step
    count shows it; SGD keeps none, so the directory's two RNG files are what tells."""
    adamw, sgd = two_processes / "AdamW+LinearLR", two_processes / "SGD+StepLR"
    assert sorted(p.name for p in sgd.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]

    assert main(["convert", "--to", "optax", "--model", MODEL, str(adamw), str(tmp_path / "adamw")]) == 1
    assert f"stepped {2 * STEPS} times and the optimizer {STEPS}" in capsys.readouterr().err
    assert main(["convert", "--to", "optax", "--model", MODEL, str(sgd), str(tmp_path / "sgd")]) == 1
    assert "saved by 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "adamw").exists() and not (tmp_path / "sgd").exists()


if __name__ == "__main__":
    save_state_per_process(sys.argv[1])
