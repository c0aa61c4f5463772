"""Checkpoints as the Flax, Optax and Orbax docs write them (Flax NNX's model and optimizer, the optimizer
alone, a linen TrainState with StandardCheckpointer, a CheckpointManager of several steps), converted on the
command line and continued in torch; and the way back, restored with the Flax docs' own restore code.

Every run is float64 (JAX's 64-bit mode on, as tests/frameworks.py sets it), so the continued runs agree
to 1e-12. The gradients come from NumPy (tests/helpers.py), by torch's names and layout, so that both
frameworks take the same ones."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from flax import linen, nnx
from flax.training import train_state

import optstate
from optstate.cli import main
from optstate.converters.jax.optax import group_transform, to_optax

from frameworks import TinyNet, torch_params, torch_train
from helpers import TOL, gradient, initial_params, max_abs_diff

LR, WD = 0.02, 0.1
ADAMW = {"lr": LR, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": WD}
READING = ("--optimizer", "adamw", "--hparams", json.dumps(ADAMW))
K, N = range(3), range(3, 6)  # the steps before the checkpoint, and after it


def adamw() -> optax.GradientTransformation:
    return optax.adamw(LR, b1=0.8, b2=0.95, eps=1e-6, weight_decay=WD)


def torch_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.8, 0.95), eps=1e-6, weight_decay=WD)


# ----------------------------------------------------------------------------- the models, both frameworks


class NnxNet(nnx.Module):
    """TinyNet in NNX: the same names (fc1, fc2), Flax's layout (kernel = weight.T)."""

    def __init__(self) -> None:
        init = initial_params()
        rngs = nnx.Rngs(0)
        for layer, (fan_in, fan_out) in {"fc1": (3, 5), "fc2": (5, 2)}.items():
            linear = nnx.Linear(fan_in, fan_out, param_dtype=jnp.float64, rngs=rngs)
            linear.kernel[...] = jnp.asarray(init[f"{layer}.weight"].T)
            linear.bias[...] = jnp.asarray(init[f"{layer}.bias"])
            setattr(self, layer, linear)

    def __call__(self, x):
        return self.fc2(jax.nn.tanh(self.fc1(x)))


def nnx_net() -> NnxNet:
    """The NNX model, for --target-params (``test_flax_checkpoints:nnx_net``)."""
    return NnxNet()


class LinenNet(linen.Module):
    """TinyNet in linen, its layers auto-named Dense_0, Dense_1."""

    @linen.compact
    def __call__(self, x):
        x = linen.Dense(5, param_dtype=jnp.float64)(x)
        return linen.Dense(2, param_dtype=jnp.float64)(jax.nn.tanh(x))


LINEN_NAMES = {"Dense_0": "fc1", "Dense_1": "fc2"}


def linen_params() -> dict:
    init = initial_params()
    return {
        auto: {"kernel": jnp.asarray(init[f"{torch_name}.weight"].T), "bias": jnp.asarray(init[f"{torch_name}.bias"])}
        for auto, torch_name in LINEN_NAMES.items()
    }


class AutoNamedNet(torch.nn.Module):
    """TinyNet with the linen model's auto names: its state_dict keys are Dense_0.weight, ... (the matching
    of auto names to other torch names is the layout's business, tested there)."""

    def __init__(self) -> None:
        super().__init__()
        tiny = TinyNet()
        self.Dense_0, self.Dense_1 = tiny.fc1, tiny.fc2


def torch_grads_for_flax(params: dict, step: int, names: dict[str, str] | None = None) -> dict:
    """The gradient of each Flax leaf: torch's gradient of the same tensor (by its torch name), in Flax's layout."""
    grads = {}
    for layer, leaves in params.items():
        torch_name = (names or {}).get(layer, layer)
        kernel, bias = np.asarray(leaves["kernel"]), np.asarray(leaves["bias"])
        grads[layer] = {
            "kernel": gradient(step, f"{torch_name}.weight", kernel.T).T,
            "bias": gradient(step, f"{torch_name}.bias", bias),
        }
    return grads


class TorchLinear(nnx.Module):
    """A Linear that keeps torch's names and layout (``weight`` is ``[out, in]``), as a model ported from torch may."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight, self.bias = nnx.Param(jnp.asarray(weight)), nnx.Param(jnp.asarray(bias))

    def __call__(self, x):
        return x @ self.weight[...].T + self.bias[...]


class TorchNamedNnxNet(nnx.Module):
    """TinyNet in NNX under torch's names and layout: what an NNX tree written without --target-params restores into."""

    def __init__(self) -> None:
        init = initial_params()
        self.fc1 = TorchLinear(init["fc1.weight"], init["fc1.bias"])
        self.fc2 = TorchLinear(init["fc2.weight"], init["fc2.bias"])


def torch_grads_by_torch_names(params: dict, step: int) -> dict:
    return {
        layer: {name: gradient(step, f"{layer}.{name}", np.asarray(leaf)) for name, leaf in leaves.items()}
        for layer, leaves in params.items()
    }


def nnx_train(model: nnx.Module, optimizer: nnx.Optimizer, steps: range, grads_of=torch_grads_for_flax) -> None:
    for step in steps:
        grads = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(grads, grads_of(nnx.to_pure_dict(grads), step))
        optimizer.update(model, grads)


def flax_as_torch(params: dict) -> dict[str, np.ndarray]:
    """Flax Dense/Linear parameters by torch's names, in torch's layout."""
    return {
        f"{layer}.{name}": np.asarray(leaves[flax]).T if name == "weight" else np.asarray(leaves[flax])
        for layer, leaves in params.items()
        for name, flax in (("weight", "kernel"), ("bias", "bias"))
    }


def nnx_as_torch(model: NnxNet) -> dict[str, np.ndarray]:
    return flax_as_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def torch_target(tmp_path_factory):
    """The torch model for --target-params on the way back: its state_dict, saved."""
    path = tmp_path_factory.mktemp("target") / "tiny.pt"
    torch.save(TinyNet().state_dict(), path)
    return path


def _continue_in_torch(ckpt_path, model: torch.nn.Module) -> torch.nn.Module:
    """The converted checkpoint loaded as a torch user loads one (load_state_dict), then N more steps."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt = torch_adamw(model)
    opt.load_state_dict(ckpt["optimizer"])
    torch_train(model, opt, N)
    return model


def _save(path, tree) -> None:
    """``StandardCheckpointer().save``, as the Flax docs save, finished before the test reads it."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def _convert(*args: str, capsys) -> str:
    code = main(["convert", *map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


# ----------------------------------------------------------------------------- from JAX to torch


@pytest.fixture(scope="module")
def nnx_run():
    """An NNX model and optimizer trained K steps, and the same continued N more (the run that never stopped)."""
    model = NnxNet()
    optimizer = nnx.Optimizer(model, adamw(), wrt=nnx.Param)
    nnx_train(model, optimizer, K)
    saved = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    saved = jax.tree.map(lambda a: a, saved)  # a copy: the run goes on
    nnx_train(model, optimizer, N)
    return saved, nnx_as_torch(model)


@pytest.mark.parametrize("kind", ["nnx.State", "pure dicts"])
def test_nnx_model_and_optimizer_continue_in_torch(nnx_run, kind, torch_target, tmp_path, capsys):
    saved, finished = nnx_run
    if kind == "pure dicts":  # nnx.to_pure_dict, as some training loops save: no Variables, no "value"
        saved = {name: nnx.to_pure_dict(state) for name, state in saved.items()}
    _save(tmp_path / "ckpt", saved)  # as the Flax docs save
    assert main(["inspect", str(tmp_path / "ckpt"), *READING]) == 0
    assert "AdamW, 4 parameters, step 3" in capsys.readouterr().out
    err = _convert(tmp_path / "ckpt", tmp_path / "out.pt", *READING, "--target-params", torch_target, capsys=capsys)
    assert "order is inferred" not in err  # one group, loaded by name: nothing to warn about
    model = _continue_in_torch(tmp_path / "out.pt", TinyNet())
    assert max_abs_diff(torch_params(model), finished) < TOL


def test_nnx_optimizer_alone_converts_its_state(nnx_run, torch_target, tmp_path, capsys):
    saved, _ = nnx_run
    _save(tmp_path / "opt", saved["optimizer"])  # nnx.state(optimizer) alone
    _convert(tmp_path / "opt", tmp_path / "out.pt", *READING, "--target-params", torch_target, capsys=capsys)
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "model" not in ckpt
    names = ckpt["optimizer"]["param_groups"][0]["param_names"]
    mu = saved["optimizer"]["opt_state"][0]["mu"]
    for index, name in enumerate(names):
        layer, leaf = name.split(".")
        expected = np.asarray(mu[layer]["kernel" if leaf == "weight" else "bias"][...])
        actual = ckpt["optimizer"]["state"][index]["exp_avg"].numpy()
        np.testing.assert_array_equal(actual, expected.T if leaf == "weight" else expected)
        assert float(ckpt["optimizer"]["state"][index]["step"]) == 3


def test_an_nnx_model_state_without_optimizer_is_refused_in_one_line(nnx_run, tmp_path, capsys):
    saved, _ = nnx_run
    _save(tmp_path / "model", saved["model"])
    assert main(["inspect", str(tmp_path / "model"), *READING]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an NNX state without optimizer state of ['fc1', 'fc2']" in err
    assert "nnx.state(optimizer)" in err and str(tmp_path / "model") in err


def _linen_train(state: train_state.TrainState, steps: range) -> train_state.TrainState:
    for step in steps:
        state = state.apply_gradients(grads=torch_grads_for_flax(state.params, step))
    return state


def test_linen_train_state_continues_in_torch(tmp_path, capsys):
    state = train_state.TrainState.create(apply_fn=LinenNet().apply, params=linen_params(), tx=adamw())
    state = _linen_train(state, K)
    _save(tmp_path / "ckpt", state)  # as the Flax docs save a TrainState
    target = tmp_path / "auto_named.pt"
    torch.save(AutoNamedNet().state_dict(), target)
    _convert(tmp_path / "ckpt", tmp_path / "out.pt", *READING, "--target-params", target, capsys=capsys)
    model = _continue_in_torch(tmp_path / "out.pt", AutoNamedNet())
    assert max_abs_diff(torch_params(model), flax_as_torch(_linen_train(state, N).params)) < TOL


def test_linen_train_state_step_fills_in_what_optax_does_not_count(tmp_path, capsys):
    """RMSprop's Optax state keeps no count: the TrainState's step is torch's."""
    tx = group_transform(optstate.OPTIMIZERS["rmsprop"], {"lr": LR, "alpha": 0.9})  # optstate's torch-exact one
    state = _linen_train(train_state.TrainState.create(apply_fn=None, params=linen_params(), tx=tx), K)
    _save(tmp_path / "ckpt", state)
    hparams = json.dumps({"lr": LR, "alpha": 0.9})
    assert main(["inspect", str(tmp_path / "ckpt"), "--optimizer", "rmsprop", "--hparams", hparams]) == 0
    shown = capsys.readouterr().out
    # The step is the TrainState's; fields that stock Optax's state has too read as stock without the user's word.
    assert "RMSprop, 4 parameters, step 3" in shown and "stock Optax ScaleByRmsState" in shown
    _convert(
        tmp_path / "ckpt",
        tmp_path / "out.pt",
        "--optimizer",
        "rmsprop",
        "--hparams",
        hparams,
        "--optstate-transform",
        capsys=capsys,
    )
    sd = torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"]
    assert {float(s["step"]) for s in sd["state"].values()} == {3.0}


@pytest.fixture(scope="module")
def manager_run(tmp_path_factory):
    """NNX trained 3 steps under a CheckpointManager, saved after each as the Orbax docs save."""
    root = tmp_path_factory.mktemp("manager") / "ckpts"
    model = NnxNet()
    optimizer = nnx.Optimizer(model, adamw(), wrt=nnx.Param)
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    finished = {}
    for step in K:
        nnx_train(model, optimizer, range(step, step + 1))
        manager.save(
            step + 1, args=ocp.args.StandardSave({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
        )
        manager.wait_until_finished()
        finished[step + 1] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(optimizer)))
    manager.close()
    nnx_train(model, optimizer, N)
    return root, finished, nnx_as_torch(model)


def test_checkpoint_manager_latest_step_continues_in_torch(manager_run, torch_target, tmp_path, capsys):
    root, _, finished = manager_run
    _convert(root, tmp_path / "out.pt", *READING, "--target-params", torch_target, capsys=capsys)
    model = _continue_in_torch(tmp_path / "out.pt", TinyNet())
    assert max_abs_diff(torch_params(model), finished) < TOL


@pytest.mark.parametrize("where", ["root", "step"])
def test_checkpoint_manager_step_is_chosen(manager_run, where, tmp_path, capsys):
    root, saved, _ = manager_run
    src, extra = (root, ("--step", "2")) if where == "root" else (root / "2", ())
    _convert(src, tmp_path / "out.safetensors", *READING, *extra, capsys=capsys)
    state = optstate.api.read(tmp_path / "out.safetensors")
    assert {p.step for p in state.params} == {2}
    np.testing.assert_array_equal(
        np.asarray(state.slots[("second_moment", ("fc2", "kernel"))]), saved[2]["opt_state"][0]["nu"]["fc2"]["kernel"]
    )


# ----------------------------------------------------------------------------- from torch to JAX


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """torch AdamW trained K steps and saved; the same run continued N more."""
    path = tmp_path_factory.mktemp("torch") / "ckpt.pt"
    model = TinyNet()
    opt = torch_adamw(model)
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    torch_train(model, opt, N)
    return path, torch_params(model)


def _restored_as_the_flax_docs_do(path, manager_step=None, tx=None, net=NnxNet) -> tuple[nnx.Module, nnx.Optimizer]:
    """The Flax docs' restore: an abstract model and optimizer, Orbax's restore into them, nnx.update."""
    tx = adamw() if tx is None else tx
    abstract_model = nnx.eval_shape(net)
    abstract_optimizer = nnx.eval_shape(lambda: nnx.Optimizer(net(), tx, wrt=nnx.Param))
    target = {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)}
    if manager_step is None:
        restored = ocp.StandardCheckpointer().restore(path, target)
    else:
        manager = ocp.CheckpointManager(path)
        assert manager.latest_step() == manager_step
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
        manager.close()
    model = net()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    return model, optimizer


@pytest.mark.parametrize("step", [None, 3])
def test_torch_to_nnx_restores_with_the_flax_docs_code(torch_run, step, tmp_path, capsys):
    src, finished = torch_run
    extra = () if step is None else ("--step", str(step))
    _convert(
        src, tmp_path / "nnx", "--to", "nnx", "--target-params", "test_flax_checkpoints:nnx_net", *extra, capsys=capsys
    )
    model, optimizer = _restored_as_the_flax_docs_do(tmp_path / "nnx", manager_step=step)
    assert int(optimizer.step[...]) == 3
    nnx_train(model, optimizer, N)
    assert max_abs_diff(nnx_as_torch(model), finished) < TOL


def test_torch_param_groups_to_nnx_continue_with_optstates_transform(tmp_path, capsys):
    """Two param groups (no decay on biases): the tx is optstate.optax_transform of what was written, a partition."""
    model = TinyNet()
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=LR, weight_decay=WD)
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    _convert(
        tmp_path / "ckpt.pt",
        tmp_path / "nnx",
        "--to",
        "nnx",
        "--target-params",
        "test_flax_checkpoints:nnx_net",
        capsys=capsys,
    )
    tx = optstate.optax_transform(optstate.api.read(tmp_path / "nnx"))
    nnx_model, optimizer = _restored_as_the_flax_docs_do(tmp_path / "nnx", tx=tx)
    nnx_train(nnx_model, optimizer, N)
    torch_train(model, opt, N)
    assert max_abs_diff(nnx_as_torch(nnx_model), torch_params(model)) < TOL


def test_torch_to_nnx_to_torch_is_bit_exact(torch_run, tmp_path, capsys):
    src, _ = torch_run
    _convert(src, tmp_path / "nnx", "--to", "nnx", "--target-params", "test_flax_checkpoints:nnx_net", capsys=capsys)
    _convert(tmp_path / "nnx", tmp_path / "back.pt", capsys=capsys)  # optstate.json: no --optimizer needed
    before, after = torch.load(src, weights_only=True), torch.load(tmp_path / "back.pt", weights_only=True)
    for name, tensor in before["model"].items():
        assert torch.equal(after["model"][name], tensor), name
    names = after["optimizer"]["param_groups"][0]["param_names"]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # the torch model's order, by the layout
    for index, entry in before["optimizer"]["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(after["optimizer"]["state"][index][key].to(tensor.dtype), tensor), (index, key)
    for key, value in before["optimizer"]["param_groups"][0].items():
        if key not in ("params", "param_names"):
            assert after["optimizer"]["param_groups"][0][key] == value, key


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """torch SGD with momentum (no step count, no scheduler) trained K steps and saved; continued N more."""
    path = tmp_path_factory.mktemp("sgd") / "ckpt.pt"
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    torch_train(model, opt, N)
    return path, torch_params(model)


TO_NNX = ("--to", "nnx", "--target-params", "test_flax_checkpoints:nnx_net")


def test_steps_are_added_to_a_checkpoint_manager_directory(sgd_run, tmp_path, capsys):
    src, _ = sgd_run
    for step in (3, 5):  # SGD records no step: --step gives it
        _convert(src, tmp_path / "ckpts", *TO_NNX, "--step", str(step), capsys=capsys)
    manager = ocp.CheckpointManager(tmp_path / "ckpts")
    assert manager.all_steps() == [3, 5]
    manager.close()
    assert main(["convert", str(src), str(tmp_path / "ckpts"), *TO_NNX, "--step", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "ckpts" / "5") in err and "--force" in err


def test_sgd_to_nnx_takes_its_step_from_the_step_option_and_continues(sgd_run, tmp_path, capsys):
    """SGD keeps no step count: the nnx.Optimizer's step is --step's, the CheckpointManager step it is written as."""
    src, finished = sgd_run
    _convert(src, tmp_path / "ckpts", *TO_NNX, "--step", "3", capsys=capsys)
    tx = optax.sgd(LR, momentum=0.9)  # stock Optax SGD is torch's formula (dampening 0, no Nesterov)
    model, optimizer = _restored_as_the_flax_docs_do(tmp_path / "ckpts", manager_step=3, tx=tx)
    assert int(optimizer.step[...]) == 3
    nnx_train(model, optimizer, N)
    assert max_abs_diff(nnx_as_torch(model), finished) < TOL


@pytest.mark.parametrize("fmt", ["nnx", "train-state"])
def test_a_state_without_a_step_count_needs_the_step_option(sgd_run, fmt, tmp_path, capsys):
    src, _ = sgd_run
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", fmt, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "out") in err
    assert "SGD keeps no step count" in err and "--step N" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["nnx", "train-state"])
def test_a_step_option_that_disagrees_with_the_state_is_refused(torch_run, fmt, tmp_path, capsys):
    src, _ = torch_run  # AdamW at step 3
    assert main(["convert", str(src), str(tmp_path / "ckpts"), "--to", fmt, "--step", "5", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "ckpts") in err
    assert "--step 5" in err and "taken 3 optimizer steps" in err and "--step 3" in err
    assert not (tmp_path / "ckpts").exists()


def test_parameters_at_different_steps_are_refused_naming_them(tmp_path, capsys):
    """torch skips a parameter whose gradient is None: its step falls behind, and an nnx.Optimizer has one step."""
    model = TinyNet()
    opt = torch_adamw(model)
    model.fc2.bias.requires_grad_(False)  # no gradient at the first step
    torch_train(model, opt, range(1))
    model.fc2.bias.requires_grad_(True)
    torch_train(model, opt, range(1, 3))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "nnx"), *TO_NNX, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nnx") in err
    assert "fc2.bias at step 2" in err and "at step 3" in err
    assert not (tmp_path / "nnx").exists()


def test_torch_names_written_to_nnx_are_warned_about_and_restore_into_a_model_of_those_names(
    torch_run, tmp_path, capsys
):
    """The warning's promise: the Flax docs' restore reads the tree into an NNX model that keeps torch's names."""
    src, finished = torch_run
    err = _convert(src, tmp_path / "nnx", "--to", "nnx", capsys=capsys)
    assert "torch's names and layout (fc1.weight [5, 3])" in err and "--target-params" in err
    assert "a model whose parameters keep these names and shapes" in err
    model, optimizer = _restored_as_the_flax_docs_do(tmp_path / "nnx", net=TorchNamedNnxNet)
    assert int(optimizer.step[...]) == 3
    nnx_train(model, optimizer, N, grads_of=torch_grads_by_torch_names)
    assert max_abs_diff(flax_as_torch_names(model), finished) < TOL


def flax_as_torch_names(model: nnx.Module) -> dict[str, np.ndarray]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {f"{layer}.{name}": np.asarray(leaf) for layer, leaves in params.items() for name, leaf in leaves.items()}


def test_torch_to_train_state_restores_into_an_abstract_train_state(torch_run, tmp_path, capsys):
    src, finished = torch_run
    target = tmp_path / "params.msgpack"
    from flax import serialization

    init = linen_params()
    target.write_bytes(serialization.to_bytes({"params": {"fc1": init["Dense_0"], "fc2": init["Dense_1"]}}))
    _convert(src, tmp_path / "ts", "--to", "train-state", "--target-params", target, capsys=capsys)
    params = {"fc1": init["Dense_0"], "fc2": init["Dense_1"]}
    abstract = jax.eval_shape(lambda: train_state.TrainState.create(apply_fn=None, params=params, tx=adamw()))
    state = ocp.StandardCheckpointer().restore(tmp_path / "ts", abstract)  # as the Flax docs restore
    state = state.replace(tx=adamw(), apply_fn=None)
    assert int(state.step) == 3
    assert max_abs_diff(flax_as_torch(_linen_train(state, N).params), finished) < TOL


# ----------------------------------------------------------------------------- float64 without JAX's 64-bit mode


@pytest.fixture
def x64_off():
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def nadam_ckpt(tmp_path_factory):
    torch.set_default_dtype(torch.float64)  # torch keeps mu_product in its default dtype
    try:
        model = TinyNet()
        opt = torch.optim.NAdam(model.parameters(), lr=LR)
        torch_train(model, opt, K)
    finally:
        torch.set_default_dtype(torch.float32)
    path = tmp_path_factory.mktemp("nadam") / "nadam.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


@pytest.mark.parametrize("fmt", ["optax", "nnx"])
def test_float64_nadam_converts_on_the_command_line(nadam_ckpt, fmt, x64_off, tmp_path, capsys):
    assert optstate.api.read(nadam_ckpt).slots[("momentum_product", ("fc1", "weight"))].dtype == np.float64
    _convert(nadam_ckpt, tmp_path / "out", "--to", fmt, capsys=capsys)
    jax.config.update("jax_enable_x64", True)
    state = optstate.api.read(tmp_path / "out")
    assert state.slots[("momentum_product", ("fc1", "weight"))].dtype == np.float64


def test_a_float64_state_into_a_32_bit_template_names_family_slot_parameter_and_x64(nadam_ckpt, x64_off):
    state = optstate.api.read(nadam_ckpt)
    params = {
        "fc1": {"weight": jnp.zeros((5, 3)), "bias": jnp.zeros(5)},
        "fc2": {"weight": jnp.zeros((2, 5)), "bias": jnp.zeros(2)},
    }
    with pytest.raises(optstate.OptstateError) as info:
        to_optax(state, optstate.optax_transform(state), params)
    message = str(info.value)
    assert "NAdam" in message and "jax_enable_x64" in message and "\n" not in message
    assert "momentum_product" in message or "first_moment" in message
    assert "fc1." in message or "fc2." in message
