"""accelerate ``save_state`` directories written by optstate (``convert --to accelerate``), resumed by accelerate's
own ``Accelerator.load_state`` and compared with the run that never stopped: a save_state read and written back,
and an Optax AdamW run trained in JAX; and what is refused, by name."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from accelerate import Accelerator

import optstate
from optstate.api import read, write
from optstate.cli import main
from optstate.errors import MappingError, OptstateError, UnsupportedError

from frameworks import jax_params, jax_train, torch_params, torch_train
from helpers import flat
from test_trainer_accelerate import MODEL, MORE, STEPS, _prepared, _train, make_model, save_state

TOL = 1e-12
HERE = "test_trainer_accelerate_write"  # tests/ is on sys.path (pyproject's pythonpath)


def make_prefixed() -> torch.nn.Module:
    """The same network one attribute down: its parameters are ``net.fc1.weight``, ...."""
    wrapper = torch.nn.Module()
    wrapper.net = make_model()
    return wrapper


def never_stopped(recipe: str, named: bool) -> dict[str, np.ndarray]:
    _, model, opt, sched = _prepared(recipe, named)
    _train(model, opt, sched, range(STEPS + MORE))
    return torch_params(model)


def resumed(directory, recipe: str, named: bool) -> dict[str, np.ndarray]:
    accelerator, model, opt, sched = _prepared(recipe, named)
    accelerator.load_state(directory)
    _train(model, opt, sched, range(STEPS, STEPS + MORE))
    return torch_params(model)


def _assert_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


# ----------------------------------------------------------------------------- resumed exactly


@pytest.mark.filterwarnings("ignore:SGD keeps no step count")  # inspect's Optax verdict on SGD+StepLR
@pytest.mark.parametrize(
    ("recipe", "named"), [("AdamW+LinearLR", True), ("SGD+StepLR", False)], ids=["param_names", "--model"]
)
def test_a_save_state_read_and_written_back_resumes_exactly(tmp_path, recipe, named):
    src, out = tmp_path / "src", tmp_path / "out"
    save_state(src, recipe, named)
    model_flag = [] if named else ["--model", MODEL]
    assert main(["convert", "--to", "accelerate", *model_flag, str(src), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.bin", "scheduler.bin"]
    theirs = torch.load(src / "optimizer.bin", weights_only=True)
    ours = torch.load(out / "optimizer.bin", weights_only=True)
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        for key, value in entry.items():
            assert torch.equal(ours["state"][index][key], value), (index, key)
    assert torch.load(out / "scheduler.bin", weights_only=True) == torch.load(src / "scheduler.bin", weights_only=True)
    _assert_close(resumed(out, recipe, named), never_stopped(recipe, named))
    assert optstate.inspect(out).optax.startswith("exact")


def test_through_optax_and_back_the_schedule_continues(tmp_path):
    """accelerate -> an Optax directory (its tree sorted: fc1.bias first) -> accelerate with --model: the LinearLR
    state comes back from optstate's record beside the tree, and the optimizer's order from the model."""
    recipe = "AdamW+LinearLR"
    save_state(tmp_path / "src", recipe, named=True)
    assert main(["convert", "--to", "optax", "--horizon", "50", str(tmp_path / "src"), str(tmp_path / "optax")]) == 0
    out = tmp_path / "back"
    assert (
        main(["convert", "--from", "optax", "--to", "accelerate", "--model", MODEL, str(tmp_path / "optax"), str(out)])
        == 0
    )
    assert torch.load(out / "scheduler.bin", weights_only=True) == torch.load(
        tmp_path / "src" / "scheduler.bin", weights_only=True
    )
    _assert_close(resumed(out, recipe, True), never_stopped(recipe, True))


def _constant_prepared():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    accelerator = Accelerator(cpu=True)
    return accelerator, *accelerator.prepare(model, opt)


def _jax_run(tmp_path):
    """AdamW trained in JAX for STEPS steps from TinyNet's weights, saved to Orbax; and its MORE steps onwards."""
    tx = optax.adamw(0.05, weight_decay=0.1)
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), range(STEPS))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "jax", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()
    return tmp_path / "jax", flat(jax_train(tx, params, opt_state, range(STEPS, STEPS + MORE))[0])


HPARAMS = ["--from", "optax", "--optimizer", "adamw", "--hparams", '{"lr": 0.05, "weight_decay": 0.1}']


def test_an_optax_adamw_run_resumes_exactly_in_accelerate(tmp_path, capsys):
    src, jax_never_stopped = _jax_run(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", "--to", "accelerate", *HPARAMS, "--model", MODEL, str(src), str(out)]) == 0
    assert not (out / "scheduler.bin").exists()
    # the resume call without a scheduler is said: load_state would look for scheduler.bin for a prepared one
    assert re.search(r"no scheduler.bin .*prepare no LR scheduler", capsys.readouterr().err)
    accelerator, model, opt = _constant_prepared()
    accelerator.load_state(out)
    torch_train(model, opt, range(STEPS, STEPS + MORE))
    _assert_close(torch_params(model), jax_never_stopped)


# ----------------------------------------------------------------------------- refused, by name


def test_an_optax_state_without_the_model_is_refused_and_a_prefix_is_added(tmp_path, capsys):
    """Optax's tree is ordered by its keys (fc1.bias before fc1.weight), the torch optimizer by registration:
    without the model, the order is unknown."""
    src, _ = _jax_run(tmp_path)
    assert main(["convert", "--to", "accelerate", *HPARAMS, str(src), str(tmp_path / "out")]) == 1
    assert "whose parameter order is not the order the torch optimizer numbers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    prefixed = tmp_path / "prefixed"
    model = ["--model", f"{HERE}:make_prefixed"]
    assert main(["convert", "--to", "accelerate", *HPARAMS, *model, str(src), str(prefixed)]) == 0
    sd = torch.load(prefixed / "optimizer.bin", weights_only=True)
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in make_prefixed().named_parameters()]


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [
        ("test_trainer_accelerate:make_square", MappingError, "no attribute prefix makes them the same names"),
        (
            f"{HERE}:make_float32",
            MappingError,
            "fc1.weight is float32 [5, 3] in the model, float64 [5, 3] in the state",
        ),
    ],
)
def test_a_model_the_state_does_not_fit_is_refused(tmp_path, model, error, message):
    save_state(tmp_path / "src", "AdamW+LinearLR", True)
    state = read(tmp_path / "src")
    with pytest.raises(error, match=re.escape(message)):
        write(state, tmp_path / "out", "accelerate", model=model)
    assert not (tmp_path / "out").exists()


def make_float32() -> torch.nn.Module:
    return make_model().float()


def test_a_schedule_that_is_not_carried_and_a_state_without_weights_are_refused(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, sched, range(STEPS))
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict()}, tmp_path / "no-sched.pt")
    with pytest.raises(UnsupportedError, match=r"param group 0 holds 'initial_lr'.*--constant-lr"):
        write(read(tmp_path / "no-sched.pt"), tmp_path / "out", "accelerate")
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, tmp_path / "no-weights.pt")
    with pytest.raises(OptstateError, match="holds no model weights"):
        write(read(tmp_path / "no-weights.pt"), tmp_path / "out", "accelerate")
    assert not (tmp_path / "out").exists()


def test_a_group_lr_the_scheduler_did_not_set_is_refused(tmp_path):
    """The scheduler written sets the lr it stepped from (``_last_lr``); a state whose group holds another lr
    would resume at the scheduler's, not its own: refused, not overwritten."""
    save_state(tmp_path / "src", "AdamW+LinearLR", True)
    state = read(tmp_path / "src")
    moved = dataclasses.replace(state, param_groups=({**state.param_groups[0], "lr": 0.125},))
    with pytest.raises(UnsupportedError, match=r"param group 0 has lr 0.125, and the LR scheduler written set it last"):
        write(moved, tmp_path / "out", "accelerate")
    assert not (tmp_path / "out").exists()
