"""The core test: train k steps in framework A, convert, continue n steps in B, compare with staying in A."""

from __future__ import annotations

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

import optstate
from optstate.converters.jax.optax import group_transform

from frameworks import TinyNet, jax_params, jax_train, torch_params, torch_train
from helpers import SHAPES, TOL, flat, gradient, initial_params, max_abs_diff, nested

K, N = range(0, 5), range(5, 10)


def _no_decay_on_bias(model, **decay):
    named = list(model.named_parameters())
    return [
        dict(params=[(n, p) for n, p in named if not n.endswith("bias")], **decay),
        dict(params=[(n, p) for n, p in named if n.endswith("bias")], weight_decay=0.0),
    ]


TORCH_CASES = {
    "sgd": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05),
    "sgd-momentum": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05, momentum=0.9, nesterov=True),
    "sgd-dampening": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05, momentum=0.8, dampening=0.3),
    "sgd-weight-decay": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd-maximize": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.05, momentum=0.9, maximize=True),
    "adam": lambda m: torch.optim.Adam(m.named_parameters(), lr=0.02, betas=(0.8, 0.95), eps=1e-6),
    "adam-weight-decay": lambda m: torch.optim.Adam(m.named_parameters(), lr=0.02, weight_decay=0.1),
    "adam-maximize": lambda m: torch.optim.Adam(m.named_parameters(), lr=0.02, weight_decay=0.1, maximize=True),
    "adam-decoupled": lambda m: torch.optim.Adam(
        m.named_parameters(), lr=0.02, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adamw": lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.02, weight_decay=0.1),
    "adamw-groups": lambda m: torch.optim.AdamW(_no_decay_on_bias(m, weight_decay=0.2, lr=0.03), lr=0.02),
    "adamax": lambda m: torch.optim.Adamax(m.named_parameters(), lr=0.02, betas=(0.8, 0.95), weight_decay=0.1),
    "rmsprop": lambda m: torch.optim.RMSprop(m.named_parameters(), lr=0.01, alpha=0.9),
    "rmsprop-centered": lambda m: torch.optim.RMSprop(m.named_parameters(), lr=0.01, centered=True),
    "rmsprop-momentum": lambda m: torch.optim.RMSprop(m.named_parameters(), lr=0.01, momentum=0.8),
    "rmsprop-all": lambda m: torch.optim.RMSprop(
        m.named_parameters(),
        lr=0.01,
        alpha=0.95,
        eps=1e-4,
        momentum=0.8,
        centered=True,
        weight_decay=0.1,
        maximize=True,
    ),
    "adadelta": lambda m: torch.optim.Adadelta(m.named_parameters(), lr=0.5, rho=0.8, weight_decay=0.05),
    "adam-amsgrad": lambda m: torch.optim.Adam(m.named_parameters(), lr=0.02, amsgrad=True, weight_decay=0.1),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.02, amsgrad=True),
    "nadam": lambda m: torch.optim.NAdam(m.named_parameters(), lr=0.02),
    "nadam-decoupled": lambda m: torch.optim.NAdam(
        m.named_parameters(), lr=0.02, momentum_decay=0.1, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "radam": lambda m: torch.optim.RAdam(m.named_parameters(), lr=0.02, eps=1e-3, weight_decay=0.1),
    "radam-decoupled": lambda m: torch.optim.RAdam(
        m.named_parameters(), lr=0.02, betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adagrad": lambda m: torch.optim.Adagrad(m.named_parameters(), lr=0.05),
    "adagrad-all": lambda m: torch.optim.Adagrad(
        m.named_parameters(),
        lr=0.05,
        lr_decay=0.1,
        eps=1e-3,
        initial_accumulator_value=0.2,
        weight_decay=0.1,
        maximize=True,
    ),
    "adafactor": lambda m: torch.optim.Adafactor(m.named_parameters(), lr=0.05),
    "adafactor-all": lambda m: torch.optim.Adafactor(
        m.named_parameters(), lr=0.5, beta2_decay=-0.5, eps=(0.3, 1e-3), weight_decay=0.1, maximize=True
    ),
    "adamax-maximize": lambda m: torch.optim.Adamax(m.named_parameters(), lr=0.02, maximize=True),
    "nadam-maximize": lambda m: torch.optim.NAdam(m.named_parameters(), lr=0.02, weight_decay=0.1, maximize=True),
    "radam-maximize": lambda m: torch.optim.RAdam(m.named_parameters(), lr=0.02, maximize=True),
    "adadelta-maximize": lambda m: torch.optim.Adadelta(m.named_parameters(), lr=0.5, maximize=True),
    "rmsprop-groups": lambda m: torch.optim.RMSprop(
        _no_decay_on_bias(m, weight_decay=0.1, momentum=0.5), lr=0.01, centered=True
    ),
    "sgd-groups": lambda m: torch.optim.SGD(
        _no_decay_on_bias(m, weight_decay=0.1, momentum=0.5), lr=0.05, momentum=0.9
    ),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_to_optax_continues_exactly(case, tmp_path):
    model = TinyNet()
    opt = TORCH_CASES[case](model)
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")

    optstate.convert(tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    params, opt_state, tx = optstate.load_optax(tmp_path / "out")
    params, _ = jax_train(tx, params, opt_state, N)

    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_frozen_parameter_stays_frozen_in_optax(tmp_path):
    model = TinyNet(frozen=True)
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.02)
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    optstate.convert(tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    params, opt_state, tx = optstate.load_optax(tmp_path / "out")
    assert set(opt_state.inner_states) == {"group_0", "frozen"}
    # JAX hands the frozen parameter a gradient too; the frozen label must ignore it.
    params, _ = jax_train(tx, params, opt_state, N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def _train_skipping(model, opt, steps, skipped="fc2.bias"):
    """torch_train, except that ``skipped`` gets no gradient (None) on even steps: torch skips it then."""
    for step in steps:
        for name, p in model.named_parameters():
            value = p.detach().numpy().copy()
            p.grad = None if name == skipped and step % 2 == 0 else torch.from_numpy(gradient(step, name, value))
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.02),
        lambda m: torch.optim.Adamax(m.named_parameters(), lr=0.02),
    ],
)
def test_parameters_at_different_steps_partition_by_step(make, tmp_path):
    model = TinyNet()
    opt = make(model)
    _train_skipping(model, opt, K)
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {5.0, 2.0}
    state = optstate.from_torch(opt)
    tx = optstate.optax_transform(state)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    opt_state = optstate.to_optax(state, tx, params)
    assert sorted(opt_state.inner_states) == ["group_0_step_2", "group_0_step_5"]
    params, opt_state = jax_train(tx, params, opt_state, N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL

    back = optstate.from_optax(
        opt_state, params, optimizer=state.optimizer, hyperparams=[dict(state.param_groups[0], params=list(SHAPES))]
    )
    assert {".".join(p.path): p.step for p in back.params} == {
        "fc1.weight": 10,
        "fc1.bias": 10,
        "fc2.weight": 10,
        "fc2.bias": 7,
    }


def test_live_optimizer_in_memory(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)  # no param_names: names come from the model
    torch_train(model, opt, K)
    state = optstate.from_torch(opt, model=model)
    tx = optstate.optax_transform(state)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    params, _ = jax_train(tx, params, optstate.to_optax(state, tx, params), N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


# ----------------------------------------------------------------------------- Optax -> torch


def _labels(params):
    return {layer: {"weight": "decay", "bias": "no_decay"} for layer in params}


OPTAX_CASES = {
    # name: (stock Optax transform, --optimizer, --hparams, torch optimizer class)
    "sgd": (optax.sgd(0.05), "sgd", {"lr": 0.05}),
    "sgd-momentum": (optax.sgd(0.05, momentum=0.9), "sgd", {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov": (
        optax.sgd(0.05, momentum=0.9, nesterov=True),
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ),
    "sgd-weight-decay": (
        optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9)),
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
    ),
    "sgd-dampening": (
        optax.chain(optax.scale(0.7), optax.trace(decay=0.8), optax.scale_by_learning_rate(0.05)),
        "sgd",
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
    ),
    "adam": (optax.adam(0.02, b1=0.8, b2=0.95, eps=1e-6), "adam", {"lr": 0.02, "betas": [0.8, 0.95], "eps": 1e-6}),
    "adam-weight-decay": (
        optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.02)),
        "adam",
        {"lr": 0.02, "weight_decay": 0.1},
    ),
    "adamw": (optax.adamw(0.02, weight_decay=0.1), "adamw", {"lr": 0.02, "weight_decay": 0.1}),
    "adamax": (optax.adamax(0.02, b1=0.8, b2=0.95), "adamax", {"lr": 0.02, "betas": [0.8, 0.95]}),
    # optax.rmsprop's state type is also that of eps inside the square root: optstate's chain says which.
    **{
        f"rmsprop{suffix}-optstate": (group_transform(optstate.OPTIMIZERS["rmsprop"], hp), "rmsprop", hp)
        for suffix, hp in [
            ("", {"lr": 0.01, "alpha": 0.9}),
            ("-centered", {"lr": 0.01, "alpha": 0.9, "centered": True}),
            ("-momentum", {"lr": 0.01, "alpha": 0.9, "momentum": 0.8, "weight_decay": 0.1}),
        ]
    },
    "adadelta": (
        optax.adadelta(0.5, rho=0.8, weight_decay=0.05),
        "adadelta",
        {"lr": 0.5, "rho": 0.8, "weight_decay": 0.05},
    ),
    # torch's load_state_dict casts NAdam's mu_product to the parameter dtype: float64 here.
    **{
        f"{name}-optstate": (
            group_transform(optstate.OPTIMIZERS[family], hp, {"momentum_product": np.float64}),
            family,
            hp,
        )
        for name, family, hp in [
            ("amsgrad", "adam", {"lr": 0.02, "amsgrad": True, "weight_decay": 0.1}),
            (
                "nadam",
                "nadam",
                {"lr": 0.02, "momentum_decay": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": True},
            ),
            ("radam", "radam", {"lr": 0.02, "eps": 1e-3}),
            ("adagrad", "adagrad", {"lr": 0.05, "lr_decay": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.2}),
            ("adagrad-constant-lr", "adagrad", {"lr": 0.05, "eps": 1e-10}),
            ("adafactor", "adafactor", {"lr": 0.5, "weight_decay": 0.1}),
        ]
    },
    "adamw-groups": (
        optax.partition(
            {"decay": optax.adamw(0.03, weight_decay=0.2), "no_decay": optax.adamw(0.02, weight_decay=0.0)}, _labels
        ),
        "adamw",
        [
            {"lr": 0.03, "weight_decay": 0.2, "params": ["fc1.weight", "fc2.weight"]},
            {"lr": 0.02, "weight_decay": 0.0, "params": ["fc1.bias", "fc2.bias"]},
        ],
    ),
}


def _save_orbax(path, params, opt_state):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()


@pytest.mark.parametrize("case", sorted(OPTAX_CASES))
@pytest.mark.parametrize("load", ["load_state_dict", "to_torch"])
def test_optax_to_torch_continues_exactly(case, load, tmp_path):
    tx, family, hparams = OPTAX_CASES[case]
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    _save_orbax(tmp_path / "ckpt", params, opt_state)

    groups = (
        hparams
        if isinstance(hparams, list)
        else [dict(hparams, params=["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])]
    )  # torch's order
    optstate.convert(
        tmp_path / "ckpt",
        tmp_path / "out.pt",
        src_format="optax",
        dst_format="torch",
        optimizer=family,
        hyperparams=groups,
        optstate_transform=case.endswith("optstate"),
    )
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    model = TinyNet()
    model.load_state_dict(ckpt["model"])
    named = dict(model.named_parameters())
    opt = getattr(torch.optim, optstate.OPTIMIZERS[family].torch_class)(
        [{"params": [(n, named[n]) for n in g["params"]]} for g in groups], lr=1.0
    )
    if load == "load_state_dict":
        opt.load_state_dict(ckpt["optimizer"])
    else:
        optstate.to_torch(optstate.from_torch(tmp_path / "out.pt"), opt)
    torch_train(model, opt, N)

    params, _ = jax_train(tx, params, opt_state, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_optax_default_order_loads_by_name_into_torch(tmp_path):
    """With one dict of hyperparameters the order is JAX's (sorted); to_torch matches by name anyway."""
    tx = optax.adam(0.02)
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    with pytest.warns(UserWarning, match="order is inferred from the JAX tree"):
        state = optstate.from_optax(opt_state, params, optimizer="adam", hyperparams={"lr": 0.02})
    assert [".".join(p.path) for p in state.params][:2] == ["fc1.bias", "fc1.weight"]
    model = TinyNet()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.array(flat(params)[n])))
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    optstate.to_torch(state, opt, model=model)
    assert opt.param_groups[0]["lr"] == 0.02  # saved hyperparameters win, as in load_state_dict
    torch_train(model, opt, N)
    params, _ = jax_train(tx, params, opt_state, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


# ----------------------------------------------------------------------------- LR schedulers


def _train_with_scheduler(model, opt, sched, steps):
    for step in steps:
        torch_train(model, opt, range(step, step + 1))
        sched.step()


SCHEDULERS = {
    "warmup-cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
        ],
        milestones=[3],
    ),
    "multistep": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 6, 7], gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12, cycle_momentum=False),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scheduler_continues_exactly_in_optax(name, tmp_path):
    model = TinyNet()
    opt = torch.optim.AdamW(_no_decay_on_bias(model, weight_decay=0.2, lr=0.03), lr=0.02)
    sched = SCHEDULERS[name](opt)
    _train_with_scheduler(model, opt, sched, K)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()},
        tmp_path / "ckpt.pt",
    )
    optstate.convert(tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax", horizon=10)
    params, opt_state, tx = optstate.load_optax(tmp_path / "out")
    params, _ = jax_train(tx, params, opt_state, N)
    _train_with_scheduler(model, opt, sched, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_optax_schedule_restores_a_torch_scheduler(tmp_path):
    tx = optax.adamw(lambda count: 0.02 * 0.9**count, weight_decay=0.1)
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    state = optstate.from_optax(
        opt_state, params, optimizer="adamw", hyperparams=[{"lr": 0.02, "weight_decay": 0.1, "params": list(SHAPES)}]
    )
    model = TinyNet()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.array(flat(params)[n])))
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    optstate.to_torch(state, opt, scheduler=sched)
    assert sched.last_epoch == 5 and opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.9**5, rel=1e-15)
    _train_with_scheduler(model, opt, sched, N)
    params, _ = jax_train(tx, params, opt_state, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


# ----------------------------------------------------------------------------- inject_hyperparams, MultiSteps


def test_inject_hyperparams_template_takes_torch_values(tmp_path):
    model = TinyNet()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.02, betas=(0.8, 0.95), weight_decay=0.1)
    torch_train(model, opt, K)
    opt.param_groups[0]["lr"] = 0.013  # changed by hand during training: only the group knows
    state = optstate.from_torch(opt)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1.0, b1=0.5, b2=0.5, weight_decay=0.0)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    opt_state = optstate.to_optax(state, tx, params)
    assert float(opt_state.hyperparams["learning_rate"]) == 0.013 and float(opt_state.hyperparams["b1"]) == 0.8
    params, _ = jax_train(tx, params, opt_state, N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_injected_hyperparameters_travel_to_torch():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.02, b1=0.8, b2=0.95, eps=1e-6)
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    state = optstate.from_optax(
        opt_state, params, optimizer="adam", hyperparams=[{"params": list(SHAPES)}]
    )  # the rest is in the state
    assert state.param_groups[0]["betas"] == (0.8, 0.95) and state.param_groups[0]["lr"] == 0.02
    model = TinyNet()
    model.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in flat(params).items()})
    opt = torch.optim.Adam(model.named_parameters(), lr=1.0)
    optstate.to_torch(state, opt)
    torch_train(model, opt, N)
    params, _ = jax_train(tx, params, opt_state, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_multisteps_at_a_boundary_both_ways():
    """MultiSteps(k=2) fed each gradient twice takes the same steps as torch fed it once."""
    inner = group_transform(optstate.OPTIMIZERS["adam"], {"lr": 0.02})
    tx = optax.MultiSteps(inner, every_k_schedule=2, accumulator_dtype=jax.numpy.float64)

    def train_twice(params, opt_state, steps):
        for step in steps:
            grads = nested({n: gradient(step, n, v) for n, v in flat(params).items()})
            for _ in range(2):
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
        return params, opt_state

    params = jax_params()
    params, opt_state = train_twice(params, tx.init(params), K)
    state = optstate.from_optax(opt_state, params, optimizer="adam", hyperparams=[{"lr": 0.02, "params": list(SHAPES)}])
    assert {p.step for p in state.params} == {5}
    refilled = optstate.to_optax(state, tx, params)  # and back into a MultiSteps template
    assert int(refilled.gradient_step) == 5 and int(refilled.mini_step) == 0
    model = TinyNet()
    model.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in flat(params).items()})
    opt = torch.optim.Adam(model.named_parameters(), lr=1.0)
    optstate.to_torch(state, opt)
    torch_train(model, opt, N)
    params, _ = train_twice(params, refilled, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


@pytest.mark.parametrize(
    "family, tx",
    [
        ("lion", optax.lion(0.01, b1=0.8, b2=0.95, weight_decay=0.1)),
        ("lamb", optax.lamb(0.01, b1=0.8, b2=0.95, weight_decay=0.1)),
    ],
)
def test_optax_native_optimizers_round_trip_through_the_canonical_file(family, tx, tmp_path):
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    hp = {"lr": 0.01, "betas": [0.8, 0.95], "weight_decay": 0.1, "params": list(SHAPES)}
    state = optstate.from_optax(opt_state, params, optimizer=family, hyperparams=[hp])
    optstate.save(state, tmp_path / "lion.safetensors")
    state = optstate.load(tmp_path / "lion.safetensors")
    ours = optstate.optax_transform(state)
    restored = optstate.to_optax(state, ours, params)
    mine, _ = jax_train(ours, params, restored, N)
    stock, _ = jax_train(tx, params, opt_state, N)
    assert max_abs_diff(flat(mine), flat(stock)) < TOL
    with pytest.raises(optstate.UnsupportedError, match=r"is an Optax optimizer with no torch.optim counterpart"):
        optstate.to_torch_state_dict(state)


# ----------------------------------------------------------------------------- Muon (approximate by nature)


class TwoMatrices(torch.nn.Module):
    """Muon takes 2-D parameters only."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 5, bias=False, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(5, 2, bias=False, dtype=torch.float64)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.from_numpy(initial_params()[name]))


def test_muon_needs_allow_approximate_and_then_continues(tmp_path):
    model = TwoMatrices()
    opt = torch.optim.Muon(model.named_parameters(), lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    torch_train(model, opt, K)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(optstate.UnsupportedError, match="Muon: torch's bfloat16 Newton-Schulz is not reproducible"):
        optstate.convert(tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    optstate.convert(
        tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax", allow_approximate=True
    )
    params, opt_state, tx = optstate.load_optax(tmp_path / "out")
    params, _ = jax_train(tx, params, opt_state, N)
    torch_train(model, opt, N)
    # Small matrices: JAX's bfloat16 Newton-Schulz on CPU matches torch's bit for bit.
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


@pytest.mark.parametrize(
    "stock, family, hparams, gap",
    [
        (optax.rmsprop(0.01, decay=0.9, eps_in_sqrt=False), "rmsprop", {"lr": 0.01, "alpha": 0.9}, 0.0),
        (optax.rmsprop(0.01, decay=0.9), "rmsprop", {"lr": 0.01, "alpha": 0.9}, 1e-9),
        (optax.amsgrad(0.02), "adam", {"lr": 0.02, "amsgrad": True}, 1e-3),
    ],
)
def test_stock_optax_states_need_allow_approximate(stock, family, hparams, gap, tmp_path):
    """A stock state cannot say whether its formula was torch's; with the flag it converts and is recorded."""
    params = jax_params()
    params, opt_state = jax_train(stock, params, stock.init(params), K)
    _save_orbax(tmp_path / "ckpt", params, opt_state)
    groups = [dict(hparams, params=list(SHAPES))]
    with pytest.raises(optstate.UnsupportedError, match=r"is a stock Scale.*pass --allow-approximate"):
        optstate.convert(tmp_path / "ckpt", tmp_path / "out.pt", optimizer=family, hyperparams=groups)
    state = optstate.convert(
        tmp_path / "ckpt", tmp_path / "out.pt", optimizer=family, hyperparams=groups, allow_approximate=True
    )
    assert "stock Optax" in state.metadata.approximate
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["model"])
    opt = getattr(torch.optim, optstate.OPTIMIZERS[family].torch_class)(model.named_parameters(), lr=1.0)
    optstate.to_torch(state, opt)
    torch_train(model, opt, N)
    params, _ = jax_train(stock, params, opt_state, N)
    diff = max_abs_diff(flat(params), torch_params(model))
    assert diff < TOL if gap == 0 else diff > gap  # exact only where the stock formula is torch's
