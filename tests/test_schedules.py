"""torch LR scheduler state dicts ↔ Optax schedules: exact, or refused by name."""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.optim import lr_scheduler as L

from optstate.converters.schedules.history import advance
from optstate.converters.schedules.parse import parse
from optstate.converters.schedules.replay import replayer
from optstate.converters.schedules.torch_schedulers import (
    LAMBDA,
    TorchLRSchedule,
    group_lrs,
    optax_schedules,
    restore_torch_scheduler_state,
    scheduler_class,
)
from optstate.errors import UnsupportedError

jax.config.update("jax_enable_x64", True)

K = 7  # torch steps taken before the state dict is read
LAST = 30  # compare counts K..LAST (and 0..K-1)
LRS = (0.1, 0.03)
RTOL = 1e-12

# (id, factory(opt) -> scheduler); every one is checked for counts 0..LAST.
CASES = [
    ("StepLR", lambda o: L.StepLR(o, step_size=3, gamma=0.5)),
    ("StepLR-1", lambda o: L.StepLR(o, step_size=1, gamma=0.93)),
    ("MultiStepLR-repeated", lambda o: L.MultiStepLR(o, milestones=[3, 3, 9, 9, 9, 20], gamma=0.7)),
    ("MultiStepLR", lambda o: L.MultiStepLR(o, milestones=[10, 15], gamma=0.1)),
    ("ExponentialLR", lambda o: L.ExponentialLR(o, gamma=0.93)),
    ("CosineAnnealingLR-past-T_max", lambda o: L.CosineAnnealingLR(o, T_max=12, eta_min=1e-3)),
    ("CosineAnnealingLR-T_max<K", lambda o: L.CosineAnnealingLR(o, T_max=5)),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, T_max=40)),
    ("LinearLR", lambda o: L.LinearLR(o, start_factor=0.25, total_iters=10)),
    ("LinearLR-decay", lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=20)),
    ("ConstantLR", lambda o: L.ConstantLR(o, factor=0.5, total_iters=10)),
    ("ConstantLR-short", lambda o: L.ConstantLR(o, factor=0.3, total_iters=4)),
    ("PolynomialLR", lambda o: L.PolynomialLR(o, total_iters=12, power=2.0)),
    ("PolynomialLR-sqrt", lambda o: L.PolynomialLR(o, total_iters=5, power=0.5)),
    ("OneCycleLR", lambda o: L.OneCycleLR(o, max_lr=[1.0, 0.3], total_steps=LAST, cycle_momentum=False)),
    (
        "OneCycleLR-3phase-linear",
        lambda o: L.OneCycleLR(
            o, max_lr=0.5, total_steps=40, anneal_strategy="linear", three_phase=True, cycle_momentum=False
        ),
    ),
    ("CosineAnnealingWarmRestarts", lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2, eta_min=1e-3)),
    ("CosineAnnealingWarmRestarts-1", lambda o: L.CosineAnnealingWarmRestarts(o, T_0=6)),
    (
        "SequentialLR-warmup-cosine",
        lambda o: L.SequentialLR(
            o, [L.LinearLR(o, start_factor=0.01, total_iters=5), L.CosineAnnealingLR(o, T_max=20)], milestones=[5]
        ),
    ),
    (
        "SequentialLR-warmup-crossed-later",
        lambda o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.01, total_iters=10), L.CosineAnnealingLR(o, T_max=15, eta_min=1e-4)],
            milestones=[10],
        ),
    ),
    (
        "SequentialLR-3",
        lambda o: L.SequentialLR(
            o,
            [
                L.ConstantLR(o, factor=0.1, total_iters=3),
                L.ExponentialLR(o, gamma=0.9),
                L.StepLR(o, step_size=2, gamma=0.5),
            ],
            milestones=[4, 12],
        ),
    ),
    (
        "SequentialLR-warmup-linear-decay",
        lambda o: L.SequentialLR(
            o,
            [
                L.LinearLR(o, start_factor=0.1, total_iters=4),
                L.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=16),
            ],
            milestones=[4],
        ),
    ),
    (
        "ChainedScheduler",
        lambda o: L.ChainedScheduler([L.LinearLR(o, start_factor=0.1, total_iters=6), L.ExponentialLR(o, gamma=0.95)]),
    ),
]
IDS = [c[0] for c in CASES]


def _optimizer(momentum=0.0, lrs=LRS):
    params = [
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
        torch.zeros(3, dtype=torch.float64, requires_grad=True),
    ]
    return torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], lr=lrs[0], momentum=momentum
    )


def _torch_lrs(factory, steps=LAST, keep=K):
    """Every group["lr"] for last_epoch 0..steps, and the state dicts read at last_epoch == keep."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _optimizer()
        sched = factory(opt)
        sd0 = copy.deepcopy(sched.state_dict())
        lrs, sd, groups = [[g["lr"] for g in opt.param_groups]], None, None
        for c in range(1, steps + 1):
            opt.step()
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
            if c == keep:
                sd = copy.deepcopy(sched.state_dict())
                groups = copy.deepcopy(opt.state_dict()["param_groups"])
    return np.asarray(lrs), sd0, sd, groups


def _rel(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)))


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=IDS)
def test_schedules_follow_torch(factory):
    want, _, sd, groups = _torch_lrs(factory)
    schedules = optax_schedules(sd, horizon=LAST, param_groups=groups)
    assert len(schedules) == 2
    counts = np.arange(LAST + 1)
    for i, schedule in enumerate(schedules):
        jitted = jax.jit(jax.vmap(schedule))(jnp.asarray(counts, dtype=jnp.int32))
        assert jitted.dtype == jnp.float64
        assert _rel(jitted, want[:, i]) < RTOL
        assert float(jax.jit(schedule)(jnp.int32(K))) == jitted[K]
        for c in (0, K, LAST):  # eager, as optax calls it without jit
            assert float(schedule(jnp.asarray(c, dtype=jnp.int32))) == jitted[c]


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=IDS)
def test_restored_torch_scheduler_continues_like_the_real_one(factory):
    want, sd0, sd_k, groups = _torch_lrs(factory)
    restored = restore_torch_scheduler_state(sd0, K, param_groups=groups)
    assert group_lrs(sd0, K, param_groups=groups) == list(want[K])
    _assert_same_state(restored, sd_k)
    # load into a fresh optimizer + scheduler and keep stepping: same lrs as the run that really stepped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _optimizer()
        sched = factory(opt)
        sched.load_state_dict(copy.deepcopy(restored))
        for g, lr in zip(opt.param_groups, group_lrs(sd0, K, param_groups=groups), strict=True):
            g["lr"] = lr
        got = [[g["lr"] for g in opt.param_groups]]
        for _ in range(K, LAST):
            opt.step()
            sched.step()
            got.append([g["lr"] for g in opt.param_groups])
    assert _rel(got, want[K:]) < RTOL
    # from a later state, forwards and backwards
    assert restore_torch_scheduler_state(sd_k, K, param_groups=groups)["_last_lr"] == list(want[K])
    assert group_lrs(sd_k, 3, param_groups=groups) == list(want[3])
    assert group_lrs(sd_k, LAST, param_groups=groups) == list(want[LAST])


def _assert_same_state(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if key == "_schedulers":
            for g, w in zip(got[key], value, strict=True):
                _assert_same_state(g, w)
        elif key == "anneal_func":
            continue
        else:
            assert got[key] == value, key


def test_scheduler_class_names_every_torch_scheduler():
    opt = _optimizer(momentum=0.9)
    made = {
        "StepLR": L.StepLR(opt, 2),
        "MultiStepLR": L.MultiStepLR(opt, [2]),
        "ExponentialLR": L.ExponentialLR(opt, 0.9),
        "CosineAnnealingLR": L.CosineAnnealingLR(opt, 5),
        "LinearLR": L.LinearLR(opt),
        "ConstantLR": L.ConstantLR(opt),
        "PolynomialLR": L.PolynomialLR(opt),
        "OneCycleLR": L.OneCycleLR(opt, 1.0, total_steps=10),
        "LambdaLR": L.LambdaLR(opt, lambda e: 1.0),
        "MultiplicativeLR": L.MultiplicativeLR(opt, lambda e: 1.0),
        "CosineAnnealingWarmRestarts": L.CosineAnnealingWarmRestarts(opt, 3),
        "CyclicLR": L.CyclicLR(opt, 0.01, 0.1),
        "ReduceLROnPlateau": L.ReduceLROnPlateau(opt),
        "SequentialLR": L.SequentialLR(opt, [L.StepLR(opt, 2), L.StepLR(opt, 3)], milestones=[2]),
        "ChainedScheduler": L.ChainedScheduler([L.StepLR(opt, 2), L.ExponentialLR(opt, 0.9)]),
    }
    for name, sched in made.items():
        expected = LAMBDA if name in ("LambdaLR", "MultiplicativeLR") else name
        assert scheduler_class(sched.state_dict()) == expected


def test_unknown_state_dict_names_its_keys():
    with pytest.raises(UnsupportedError, match="'warmup_steps'"):
        scheduler_class({"warmup_steps": 5, "base_lrs": [0.1], "last_epoch": 0})
    sd = L.StepLR(_optimizer(), 2).state_dict()
    with pytest.raises(UnsupportedError, match=r"StepLR.*'my_extra'"):
        scheduler_class({**sd, "my_extra": 1})


def _gradient(step, p):
    return np.cos(3.0 * p + 0.7 * step) + 0.01 * step


def test_optax_chain_continues_torch_sgd_momentum_run():
    def factory(o):
        return L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.01, total_iters=5), L.CosineAnnealingLR(o, T_max=12, eta_min=1e-3)],
            milestones=[5],
        )

    rng = np.random.default_rng(0)
    init = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    params = [torch.tensor(v, requires_grad=True) for v in init]
    opt = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.03}], lr=0.1, momentum=0.9
    )
    sched = factory(opt)

    def torch_step(step):
        for p in params:
            p.grad = torch.from_numpy(_gradient(step, p.detach().numpy()))
        opt.step()
        sched.step()

    for step in range(K):
        torch_step(step)
    sd = copy.deepcopy(sched.state_dict())
    bufs = [opt.state[p]["momentum_buffer"].numpy().copy() for p in params]
    jparams = [jnp.asarray(p.detach().numpy()) for p in params]
    for step in range(K, K + 10):
        torch_step(step)

    schedules = optax_schedules(sd, horizon=K + 10)
    for i, schedule in enumerate(schedules):
        tx = optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(schedule))
        trace, sched_state = tx.init(jparams[i])
        state = (
            trace._replace(trace=jnp.asarray(bufs[i])),
            sched_state._replace(count=jnp.asarray(sd["last_epoch"], dtype=jnp.int32)),
        )
        update = jax.jit(tx.update)
        p = jparams[i]
        for step in range(K, K + 10):
            updates, state = update(jnp.asarray(_gradient(step, np.asarray(p))), state, p)
            p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(np.asarray(p), params[i].detach().numpy(), rtol=0, atol=1e-12)
        assert int(state[1].count) == K + 10


# ----------------------------------------------------------------------------- refusals


def _sd(factory, momentum=0.9):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(_optimizer(momentum=momentum)).state_dict()


@pytest.mark.parametrize(
    "factory, names",
    [
        (lambda o: L.LambdaLR(o, lambda e: 0.9**e), ("LambdaLR", "build the equivalent Optax schedule yourself")),
        (lambda o: L.MultiplicativeLR(o, lambda e: 0.9), ("MultiplicativeLR", "not in the state dict")),
        (lambda o: L.ReduceLROnPlateau(o), ("ReduceLROnPlateau", "metric")),
        (lambda o: L.CyclicLR(o, 0.01, 0.1, cycle_momentum=False), ("CyclicLR", "scale_fn")),
        (lambda o: L.OneCycleLR(o, 1.0, total_steps=10), ("OneCycleLR", "cycle_momentum")),
        (
            lambda o: L.SequentialLR(o, [L.LinearLR(o), L.LambdaLR(o, lambda e: 1.0)], milestones=[3]),
            ("SequentialLR child 1", "LambdaLR"),
        ),
    ],
    ids=["LambdaLR", "MultiplicativeLR", "ReduceLROnPlateau", "CyclicLR", "OneCycleLR-momentum", "SequentialLR-lambda"],
)
def test_refusals_name_the_scheduler(factory, names):
    sd = _sd(factory)
    for call in (lambda: optax_schedules(sd, horizon=10), lambda: restore_torch_scheduler_state(sd, 3)):
        with pytest.raises(UnsupportedError) as info:
            call()
        for name in names:
            assert name in str(info.value)


def test_never_settling_schedule_needs_a_horizon():
    sd = _sd(lambda o: L.ExponentialLR(o, 0.9))
    with pytest.raises(UnsupportedError, match=r"ExponentialLR.*horizon="):
        optax_schedules(sd)
    settles = optax_schedules(_sd(lambda o: L.LinearLR(o, 0.1, total_iters=4)))  # no horizon needed
    assert settles[0].horizon is None and float(settles[0](10**6)) == float(settles[0](4))


def test_counts_beyond_the_horizon_raise_or_give_nan():
    (schedule, _) = optax_schedules(_sd(lambda o: L.CosineAnnealingLR(o, 10)), horizon=20)
    assert isinstance(schedule, TorchLRSchedule) and schedule.horizon == 20
    with pytest.raises(ValueError, match="horizon"):
        schedule(21)
    with pytest.raises(ValueError, match="start at 0"):
        schedule(-1)
    out = jax.jit(schedule)(jnp.asarray([20, 21, -1], dtype=jnp.int32))
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


def test_onecycle_needs_param_groups_and_stops_at_total_steps():
    _, _, sd, groups = _torch_lrs(CASES[IDS.index("OneCycleLR")][1])
    with pytest.raises(UnsupportedError, match=r"OneCycleLR.*param_groups"):
        optax_schedules(sd)
    assert optax_schedules(sd, param_groups=groups)[0].horizon == LAST
    with pytest.raises(ValueError, match="total_steps"):
        optax_schedules(sd, param_groups=groups, horizon=LAST + 1)


def test_lr_changed_outside_the_scheduler_is_refused():
    # two schedulers stepping the same optimizer: each state dict alone cannot explain the lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _optimizer()
        warmup, decay = L.LinearLR(opt, 0.1, total_iters=4), L.ExponentialLR(opt, 0.9)
        for _ in range(3):  # still warming up
            opt.step()
            warmup.step()
            decay.step()
    with pytest.raises(UnsupportedError, match=r"ExponentialLR.*changed outside"):
        optax_schedules(decay.state_dict(), horizon=20)
    with pytest.raises(UnsupportedError, match=r"LinearLR.*changed outside"):
        optax_schedules(warmup.state_dict())
    groups = opt.state_dict()["param_groups"]
    groups[0]["lr"] *= 0.5
    sd = _sd(lambda o: L.StepLR(o, 3))
    with pytest.raises(UnsupportedError, match=r"StepLR.*param_groups\[0\]"):
        optax_schedules(sd, horizon=10, param_groups=groups)


@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=IDS)
def test_conversions_leave_the_state_dict_and_its_parse_as_they_were(factory):
    _, sd0, sd, groups = _torch_lrs(factory)
    before, before0 = copy.deepcopy(sd), copy.deepcopy(sd0)
    optax_schedules(sd, horizon=LAST, param_groups=groups)
    restore_torch_scheduler_state(sd, 3, param_groups=groups)
    restore_torch_scheduler_state(sd0, K, param_groups=groups)
    _assert_same_state(sd, before)
    _assert_same_state(sd0, before0)
    tree = parse(sd, groups)  # parsed once, replayed many times: each replay steps a copy of its own
    state = copy.deepcopy(dict(tree.state))
    node = replayer(tree)
    advance(node, tree.last_lrs, LAST - K)
    assert node.epoch == LAST and tree.epoch == K
    assert set(tree.state) == set(state) and all(tree.state[k] == state[k] for k in state if k != "anneal_func")


# ----------------------------------------------------------------------------- transformers' LambdaLR schedules

# (lr_scheduler_type, lr_scheduler_kwargs): every type reproduced, defaults and the kwargs that change the arithmetic.
TRANSFORMERS_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.3}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr": 1e-3}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 6}),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 5, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1},
    ),
    ("warmup_stable_decay", {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]
WARMUP, TOTAL = 4, 20  # LAST = 30 goes past num_training_steps: where a schedule settles, and where it does not


def _transformers_run(name, kwargs):
    """transformers' own scheduler on two param groups (as the Trainer builds it: the optimizer's default lr is
    the first group's): every group["lr"] for last_epoch 0..LAST, the state dict at K, and the schedule."""
    transformers = pytest.importorskip("transformers")
    from optstate.converters.schedules.transformers import schedule_from_arguments

    opt = _optimizer()
    sched = transformers.get_scheduler(
        name, opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL, scheduler_specific_kwargs=dict(kwargs)
    )
    lrs, sd = [[g["lr"] for g in opt.param_groups]], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(1, LAST + 1):
            opt.step()
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
            if c == K:
                sd = copy.deepcopy(sched.state_dict())
    schedule = schedule_from_arguments(
        name, num_warmup_steps=WARMUP, num_training_steps=TOTAL, learning_rate=LRS[0], lr_scheduler_kwargs=kwargs
    )
    return np.asarray(lrs), sd, schedule


@pytest.mark.parametrize(("name", "kwargs"), TRANSFORMERS_CASES, ids=[f"{n}{k or ''}" for n, k in TRANSFORMERS_CASES])
def test_transformers_schedules_are_bit_identical(name, kwargs):
    from optstate.converters.schedules.transformers import attach

    want, sd, schedule = _transformers_run(name, kwargs)
    assert scheduler_class(sd) == LAMBDA  # torch saved the function as nothing
    carried = attach(sd, schedule)
    schedules = optax_schedules(carried, horizon=LAST)
    counts = jnp.arange(LAST + 1, dtype=jnp.int32)
    for i, s in enumerate(schedules):
        np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(s))(counts)), want[:, i], err_msg=f"group {i}")
    # where the schedule settles (linear, polynomial, ...), the table ends there and every count is exact
    assert schedules[0].clamped == (schedule.settles_at() is not None and schedule.settles_at() <= LAST)
    # and back to torch: the state transformers' scheduler holds at LAST, and its lr
    restored = restore_torch_scheduler_state(carried, LAST)
    assert restored["_last_lr"] == list(want[LAST]) and restored["last_epoch"] == LAST
    assert group_lrs(carried, 2) == list(want[2])


def test_transformers_schedule_that_does_not_give_the_saved_lr_is_refused():
    from optstate.converters.schedules.transformers import attach, schedule_from_arguments

    _, sd, _ = _transformers_run("cosine", {})
    linear = schedule_from_arguments("linear", num_warmup_steps=WARMUP, num_training_steps=TOTAL, learning_rate=LRS[0])
    with pytest.raises(UnsupportedError, match=r"linear schedule gives lr .* do not describe this scheduler"):
        attach(sd, linear)
    longer = schedule_from_arguments(
        "cosine", num_warmup_steps=WARMUP, num_training_steps=TOTAL + 1, learning_rate=LRS[0]
    )
    with pytest.raises(UnsupportedError, match="num_training_steps=21"):
        attach(sd, longer)


def test_transformers_types_not_reproduced_are_refused_by_name():
    from optstate.converters.schedules.transformers import SCHEDULE_TYPES, TransformersSchedule, schedule_from_arguments

    for name in ("reduce_lr_on_plateau", "greedy", "my_schedule"):
        with pytest.raises(UnsupportedError, match=repr(name)):
            schedule_from_arguments(name, num_warmup_steps=0, num_training_steps=10, learning_rate=0.1)
    with pytest.raises(UnsupportedError, match="'num_cycle'"):  # transformers raises a TypeError on it
        schedule_from_arguments(
            "cosine", num_warmup_steps=0, num_training_steps=10, learning_rate=0.1, lr_scheduler_kwargs={"num_cycle": 2}
        )
    # a state dict carrying an unknown type (a newer transformers, a hand edit) is refused when parsed
    sd = {
        "base_lrs": [0.1],
        "last_epoch": 0,
        "_step_count": 1,
        "_last_lr": [0.1],
        "lr_lambdas": [{}],
        "transformers_schedule": {"type": "cosine_v2", "kwargs": {}},
    }
    with pytest.raises(UnsupportedError, match=r"LambdaLR\[transformers\].*'cosine_v2'"):
        parse(sd)
    assert "cosine_v2" not in SCHEDULE_TYPES
    with pytest.raises(UnsupportedError, match="warmup_type 'sqrt' is not one of linear, cosine, 1-sqrt"):
        TransformersSchedule(
            "warmup_stable_decay",
            {
                "num_warmup_steps": 1,
                "num_stable_steps": 1,
                "num_decay_steps": 1,
                "warmup_type": "sqrt",
                "decay_type": "linear",
                "min_lr_ratio": 0.0,
                "num_cycles": 0.5,
            },
        )


def test_a_lambda_lr_without_its_schedule_still_points_at_the_trainer_directory():
    sd = L.LambdaLR(_optimizer(), lambda e: 1.0).state_dict()
    with pytest.raises(UnsupportedError, match="checkpoint-N directory"):
        parse(sd)
