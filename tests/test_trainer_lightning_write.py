"""Lightning ``.ckpt`` files written by optstate (``convert --to lightning --model module:function``), resumed by
Lightning's own ``Trainer.fit(module, ckpt_path=...)`` and compared with the run that never stopped: a Lightning
run read and written back, and an Optax AdamW run trained in JAX; and what is refused, by name."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

import optstate
from optstate.api import read, write
from optstate.cli import main
from optstate.errors import MappingError, OptstateError, UnsupportedError

from test_trainer_lightning import SCHEDULERS, Regression, X, Y, _trainer

jax.config.update("jax_enable_x64", True)

STEPS, MORE = 4, 4  # steps before the checkpoint, steps after it
TOL = 1e-12
HPARAMS = {"lr": 0.05, "weight_decay": 0.1}  # the JAX run's optax.adamw, in torch's names
HERE = "test_trainer_lightning_write"  # tests/ is on sys.path (pyproject's pythonpath)
pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's own warnings about a tiny CPU run


def make_steplr() -> Regression:
    return Regression("StepLR")


def make_sequentiallr() -> Regression:
    return Regression("SequentialLR")


class Constant(Regression):
    """AdamW at a constant lr: what a plain ``optax.adamw`` run continues as."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


def make_constant() -> Constant:
    return Constant("StepLR")


class TwoBatches(Regression):
    """Two batches an epoch (not shuffled): a checkpoint at an epoch's end resumes on the next epoch's first."""

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
        return torch.utils.data.DataLoader(data, batch_size=len(X) // 2)


def make_two_batches() -> TwoBatches:
    return TwoBatches("StepLR")


class ThreeBatches(Regression):
    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
        return torch.utils.data.DataLoader(data, batch_size=6)


def make_three_batches() -> ThreeBatches:
    return ThreeBatches("StepLR")


class Renamed(Regression):
    """The same layer under another attribute: no prefix turns ``net.*`` into ``layer.*``."""

    def __init__(self, scheduler: str):
        super().__init__(scheduler)
        self.layer = self.net
        del self.net

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)


def make_renamed() -> Renamed:
    return Renamed("StepLR")


def make_float32() -> Regression:
    return Regression("StepLR").float()


def make_halved_steplr() -> Regression:
    module = Regression("StepLR")
    module.configure_optimizers = lambda: _steplr_with_gamma(module, 0.25)
    return module


def make_undecayed() -> Regression:
    """The same StepLR run's module, its AdamW built without weight decay: the state's 0.1 is not the module's."""
    module = Regression("StepLR")
    module.configure_optimizers = lambda: _steplr_with_gamma(module, 0.5, weight_decay=0.0)
    return module


def _steplr_with_gamma(module, gamma, weight_decay=0.1):
    opt = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=gamma)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class NeedsTrainer(Regression):
    """A schedule sized by the Trainer (``estimated_stepping_batches``): it cannot be built without one."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(opt, total_iters=total)}


def make_needs_trainer() -> NeedsTrainer:
    return NeedsTrainer("StepLR")


def _weights(module) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def _fit(make, steps: int, ckpt_path=None):
    module = make()
    trainer = _trainer(steps)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def _assert_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


def _convert(src, dst, model: str, *extra) -> int:
    return main(["convert", "--to", "lightning", "--model", f"{HERE}:{model}", *extra, str(src), str(dst)])


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """``lightning_ckpt(make)``: a .ckpt Lightning saved after STEPS steps, with the run that never stopped."""
    cache: dict = {}

    def get(make):
        if make not in cache:
            path = tmp_path_factory.mktemp("lightning") / "run.ckpt"
            _, trainer = _fit(make, STEPS)
            trainer.save_checkpoint(path)
            cache[make] = path, _weights(_fit(make, STEPS + MORE)[0])
        return cache[make]

    return get


# ----------------------------------------------------------------------------- resumed exactly


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_a_lightning_checkpoint_read_and_written_back_resumes_exactly(lightning_ckpt, tmp_path, scheduler):
    make = {"StepLR": make_steplr, "SequentialLR": make_sequentiallr}[scheduler]
    src, never_stopped = lightning_ckpt(make)
    out = tmp_path / "written.ckpt"
    assert _convert(src, out, make.__name__) == 0

    theirs, ours = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    assert _totals(ours["loops"]) == _totals(theirs["loops"])  # the progress Lightning itself counted
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"]) == (STEPS, STEPS)
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    module, trainer = _fit(make, STEPS + MORE, ckpt_path=out)
    assert trainer.global_step == STEPS + MORE
    _assert_close(_weights(module), never_stopped)
    report = optstate.inspect(out)
    assert report.optimizer == "AdamW" and report.lr_scheduler and report.optax.startswith("exact")


def test_epochs_of_two_batches_resume_on_the_next_epoch(lightning_ckpt, tmp_path):
    src, never_stopped = lightning_ckpt(make_two_batches)
    out = tmp_path / "written.ckpt"
    assert _convert(src, out, "make_two_batches") == 0
    assert _totals(torch.load(out, weights_only=True)["loops"]) == _totals(torch.load(src, weights_only=True)["loops"])
    module, trainer = _fit(make_two_batches, STEPS + MORE, ckpt_path=out)
    assert trainer.current_epoch == (STEPS + MORE) // 2
    _assert_close(_weights(module), never_stopped)


def _totals(loops: dict) -> dict:
    """The fit loop's counts over the whole run (its ``current`` counts say where in an epoch it is)."""
    fit = loops["fit_loop"]
    optim = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    return {
        "epochs": fit["epoch_progress"],
        "batches": fit["epoch_loop.batch_progress"]["total"],
        "stepped": fit["epoch_loop.state_dict"],
        "scheduler": fit["epoch_loop.scheduler_progress"]["total"],
        "optimizer": (optim["step"]["total"], optim["zero_grad"]["total"]),
    }


def test_a_run_counted_in_epochs_resumes_exactly(tmp_path):
    """A Trainer stopping at max_epochs (not max_steps): the written loops resume at the next epoch's start too."""

    def by_epochs(epochs: int, ckpt_path=None):
        module = make_two_batches()
        trainer = _trainer(-1)
        trainer.fit_loop.max_epochs = epochs
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer

    _, trainer = by_epochs(2)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert _convert(tmp_path / "run.ckpt", tmp_path / "written.ckpt", "make_two_batches") == 0
    module, trainer = by_epochs(4, tmp_path / "written.ckpt")
    assert (trainer.current_epoch, trainer.global_step) == (4, 8)
    _assert_close(_weights(module), _weights(by_epochs(4)[0]))


def test_through_optax_and_back_the_schedule_continues(lightning_ckpt, tmp_path):
    """Lightning -> an Optax directory (its tree sorted: net.bias first) -> Lightning: the StepLR state comes
    back from optstate's record beside the tree, replayed to the step, and the module's order is restored."""
    src, never_stopped = lightning_ckpt(make_steplr)
    assert main(["convert", "--to", "optax", "--horizon", "50", str(src), str(tmp_path / "optax")]) == 0
    assert _convert(tmp_path / "optax", tmp_path / "back.ckpt", "make_steplr", "--from", "optax") == 0
    ours, theirs = torch.load(tmp_path / "back.ckpt", weights_only=True), torch.load(src, weights_only=True)
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    for index, entry in theirs["optimizer_states"][0]["state"].items():
        for key, value in entry.items():
            assert torch.equal(ours["optimizer_states"][0]["state"][index][key], value), (index, key)
    module, _ = _fit(make_steplr, STEPS + MORE, ckpt_path=tmp_path / "back.ckpt")
    _assert_close(_weights(module), never_stopped)


def _optax_run(steps: range, params, opt_state, tx):
    def loss(p):
        return jax.numpy.mean((X @ p["weight"].T + p["bias"] - Y) ** 2)

    for _ in steps:
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def test_an_optax_adamw_run_resumes_exactly_in_lightning(tmp_path):
    """AdamW trained in JAX from the module's initial weights, its tree without the module's ``net.`` prefix."""
    tx = optax.adamw(0.05, weight_decay=0.1)
    params = {n.removeprefix("net."): jax.numpy.asarray(v) for n, v in _weights(make_constant()).items()}
    params, opt_state = _optax_run(range(STEPS), params, tx.init(params), tx)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "jax", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()
    never_stopped, _ = _optax_run(range(MORE), params, opt_state, tx)

    out = tmp_path / "from-jax.ckpt"
    hparams = ["--optimizer", "adamw", "--hparams", json.dumps(HPARAMS)]
    assert _convert(tmp_path / "jax", out, "make_constant", "--from", "optax", *hparams) == 0
    # verify matches the module's net.fc... to the JAX tree's fc... (one attribute prefix), then runs both
    report = optstate.verify(tmp_path / "jax", out, dst_format="lightning", optimizer="adamw", hyperparams=HPARAMS)
    assert report and len(report.params) == len(params), report.format()
    module, trainer = _fit(make_constant, STEPS + MORE, ckpt_path=out)
    assert trainer.global_step == STEPS + MORE and trainer.current_epoch == STEPS + MORE
    _assert_close(_weights(module), {f"net.{k}": np.asarray(v) for k, v in never_stopped.items()})


# ----------------------------------------------------------------------------- refused, by name


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [
        ("make_renamed", MappingError, "no attribute prefix makes them the same names"),
        ("make_float32", MappingError, "net.weight is float32 [2, 3] in the model, float64 [2, 3] in the state"),
        (
            "make_sequentiallr",
            UnsupportedError,
            "attaches an SequentialLR whose state after 4 steps is not the state's",
        ),
        ("make_halved_steplr", UnsupportedError, "['gamma']: 0.25 in the module's, 0.5 in the state's"),
        ("make_constant", UnsupportedError, "the state follows StepLR, and"),
        ("make_undecayed", MappingError, "weight_decay is 0.0 in the module's configure_optimizers, 0.1 in the state"),
        ("make_three_batches", UnsupportedError, "stops at step 4, inside epoch 1 (3 batches per epoch"),
        ("make_needs_trainer", OptstateError, "configure_optimizers() failed outside a Trainer (RuntimeError"),
        (None, OptstateError, "needs the LightningModule the run resumes with"),
    ],
)
def test_a_module_the_state_does_not_fit_is_refused(lightning_ckpt, tmp_path, model, error, message):
    state = read(lightning_ckpt(make_steplr)[0])
    with pytest.raises(error, match=re.escape(message)):
        write(state, tmp_path / "out.ckpt", "lightning", model=model and f"{HERE}:{model}")
    assert not (tmp_path / "out.ckpt").exists()


def test_a_group_lr_the_scheduler_did_not_set_and_uneven_steps_are_refused(lightning_ckpt, tmp_path):
    """The module's scheduler sets the lr it stepped from (``_last_lr``): a state whose group holds another is
    refused, not overwritten; parameters at different steps give no one global step: refused, not the most."""
    state = read(lightning_ckpt(make_steplr)[0])
    model = f"{HERE}:make_steplr"
    moved = dataclasses.replace(state, param_groups=({**state.param_groups[0], "lr": 0.125},))
    with pytest.raises(UnsupportedError, match=r"param group 0 has lr 0.125, and the LR scheduler written set it last"):
        write(moved, tmp_path / "out.ckpt", "lightning", model=model)
    behind = (dataclasses.replace(state.params[0], step=STEPS - 1), *state.params[1:])
    with pytest.raises(UnsupportedError, match=rf"has taken {STEPS - 1} optimizer steps and .* {STEPS}; a trainer"):
        write(dataclasses.replace(state, params=behind), tmp_path / "out.ckpt", "lightning", model=model)
    assert not (tmp_path / "out.ckpt").exists()
