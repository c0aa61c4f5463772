"""Lightning ``.ckpt`` files, written by Lightning's own Trainer: the LR scheduler under ``lr_schedulers``
travels with the optimizer, the run continues exactly in Optax, and a state whose scheduler is not
carried is never called exact."""

from __future__ import annotations

import jax
import lightning as L
import numpy as np
import optax
import pytest
import torch

import optstate
from optstate.cli import main

jax.config.update("jax_enable_x64", True)

STEPS, MORE = 5, 6  # steps before the checkpoint, steps after it
TOL = 1e-12

# One full batch, so that every step sees the same data whichever batch Lightning resumes at.
X = np.random.default_rng(0).standard_normal((16, 3))
Y = np.random.default_rng(1).standard_normal((16, 2))


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _sequential_lr(opt):
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, decay], milestones=[3])


SCHEDULERS = {"StepLR": _step_lr, "SequentialLR": _sequential_lr}


class Regression(L.LightningModule):
    def __init__(self, scheduler: str):
        super().__init__()
        torch.manual_seed(0)
        # float64 from the start: Lightning restores a checkpoint before "64-true" casts the module, so a
        # float32 module would round the restored weights and the comparison would measure that rounding.
        self.net = torch.nn.Linear(3, 2, dtype=torch.float64)
        self.scheduler = scheduler

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": SCHEDULERS[self.scheduler](opt), "interval": "step"}}

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
        return torch.utils.data.DataLoader(data, batch_size=len(X))


def _trainer(max_steps: int):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(params=sorted(SCHEDULERS))
def ckpt(request, tmp_path):
    module = Regression(request.param)
    _trainer(STEPS).fit(module)
    path = tmp_path / "run.ckpt"
    module.trainer.save_checkpoint(path)
    return path, request.param


def _lightning_continues(path, scheduler):
    module = Regression(scheduler)
    _trainer(STEPS + MORE).fit(module, ckpt_path=path)
    return {n: p.detach().numpy() for n, p in module.named_parameters()}


def _optax_continues(directory):
    params, opt_state, tx = optstate.load_optax(directory)

    def loss(p):
        net = p["net"]
        return jax.numpy.mean((X @ net["weight"].T + net["bias"] - Y) ** 2)

    for _ in range(MORE):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    return {f"net.{k}": np.asarray(v) for k, v in params["net"].items()}


def test_lightning_checkpoint_continues_exactly_in_optax(ckpt, tmp_path):
    path, scheduler = ckpt
    assert main(["convert", "--to", "optax", "--horizon", "50", str(path), str(tmp_path / "out")]) == 0
    ours = _optax_continues(tmp_path / "out")
    theirs = _lightning_continues(path, scheduler)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


def test_inspect_reads_the_lightning_scheduler(ckpt):
    path, _ = ckpt
    report = optstate.inspect(path)
    assert report.lr_scheduler
    assert report.optax.startswith("exact")


def test_a_scheduler_attached_but_not_saved_is_never_exact(tmp_path, capsys):
    """A training script that saves the optimizer but not its scheduler: the param groups still show
    that one was attached (``initial_lr``), so the lr the run would follow next is unknown."""
    net = torch.nn.Linear(3, 2, dtype=torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = _step_lr(opt)
    for _ in range(3):
        net(torch.from_numpy(X)).sum().backward()
        opt.step()
        sched.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)

    assert "refused" in optstate.inspect(path).optax
    assert main(["convert", "--to", "optax", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "initial_lr" in err and "scheduler" in err
    assert not (tmp_path / "out").exists()
    # Said by the user, the lr stays where it is: the conversion goes through, and the output keeps the
    # user's word, so that reading it back (inspect, a conversion onwards) is not refused again.
    assert main(["convert", "--to", "optax", "--constant-lr", str(path), str(tmp_path / "out")]) == 0
    assert optstate.inspect(tmp_path / "out").optax == "exact"
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "again.safetensors")]) == 0
    assert optstate.load(tmp_path / "again.safetensors").metadata.constant_lr


class TwoSchedulers(Regression):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [opt], [_step_lr(opt), torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)]


def test_two_schedulers_on_one_optimizer_are_shown_and_refused(tmp_path, capsys):
    """Two schedulers both set the lr: inspect shows the checkpoint, a conversion refuses by name."""
    module = TwoSchedulers("StepLR")
    _trainer(STEPS).fit(module)
    path = tmp_path / "two.ckpt"
    module.trainer.save_checkpoint(path)
    report = optstate.inspect(path)
    assert report.optimizer == "SGD" and report.optax.startswith("refused") and "2 LR schedulers" in report.optax
    assert main(["convert", "--to", "optax", str(path), str(tmp_path / "out")]) == 1
    assert "'lr_schedulers' holds 2 LR schedulers" in capsys.readouterr().err
