"""Inputs real checkpoints have that the happy path does not: each once silently wrong or a traceback."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

import optstate
from optstate.cli import main
from optstate.errors import FormatError, MappingError, UnsupportedError

from frameworks import TinyNet, torch_params, torch_train


def _stepped(make=lambda m: torch.optim.Adam(m.named_parameters(), lr=0.01), steps=2, model=None):
    model = model or TinyNet()
    opt = make(model)
    torch_train(model, opt, range(steps))
    return model, opt


def test_state_read_from_a_live_optimizer_is_a_snapshot():
    model, opt = _stepped()
    state = optstate.from_torch(opt)
    before = {k: a.copy() for k, a in state.slots.items()}
    torch_train(model, opt, range(2, 3))
    assert all(np.array_equal(state.slots[k], a) for k, a in before.items())
    other = torch.optim.Adam(model.named_parameters(), lr=0.01)
    optstate.to_torch(state, other)
    assert other.state_dict()["state"][0]["exp_avg"].data_ptr() != opt.state_dict()["state"][0]["exp_avg"].data_ptr()


def test_missing_hyperparameters_take_torch_defaults_not_the_live_ones():
    params = {"w": jax.numpy.ones(3)}
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    state = optstate.from_optax(opt_state, params, optimizer="sgd", hyperparams={"lr": 0.1, "momentum": 0.9})
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    live = torch.optim.SGD([("w", w)], lr=1.0, momentum=0.9, nesterov=True)
    optstate.to_torch(state, live)
    assert live.param_groups[0]["nesterov"] is False


def test_optimizer_name_contradicting_the_groups_is_refused(tmp_path):
    model, opt = _stepped(lambda m: torch.optim.Adam(m.named_parameters(), lr=0.01, weight_decay=0.1))
    with pytest.raises(UnsupportedError, match="optimizer='adamw' but the param groups are Adam's"):
        optstate.from_torch(opt.state_dict(), optimizer="adamw")
    with pytest.raises(UnsupportedError, match="the state is Adam's, the optimizer is AdamW"):
        optstate.to_torch(optstate.from_torch(opt), torch.optim.AdamW(model.named_parameters()))


def test_moments_narrower_than_the_parameter_are_refused_for_torch():
    params = {"w": jax.numpy.ones(3, dtype=jax.numpy.float32)}
    opt_state = optax.adam(0.1, mu_dtype=jax.numpy.bfloat16).init(params)
    state = optstate.from_optax(opt_state, params, optimizer="adam", hyperparams={"lr": 0.1})
    with pytest.raises(UnsupportedError, match="w: first_moment is bfloat16, the parameter float32"):
        optstate.to_torch_state_dict(state)


def test_buffers_for_a_group_without_momentum_are_refused():
    params = {"w": jax.numpy.ones(3)}
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(UnsupportedError, match="w: the Optax state holds momentum"):
        optstate.from_optax(opt_state, params, optimizer="sgd", hyperparams={"lr": 0.1})


def test_tied_weights_are_one_parameter_named_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 3)
            self.head = torch.nn.Linear(3, 4, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    # named_parameters() and the optimizer list emb.weight once; head.weight is the same tensor, not a frozen one
    for state in (
        optstate.from_torch({"model": model.state_dict(), "optimizer": opt.state_dict()}),
        optstate.from_torch(opt, model=model),
    ):
        assert [p.path for p in state.params] == [("emb", "weight")]
        assert ("head", "weight") not in state.weights and state.frozen_paths() == ()


def test_float32_tensor_lr_is_refused():
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), lr=torch.tensor(0.02), foreach=False)
    torch_train(model, opt, range(1))
    with pytest.raises(UnsupportedError, match="param group 0: a float32 tensor hyperparameter"):
        optstate.from_torch(opt)


def test_layer_order_follows_registration_not_string_sorting():
    params = {"layers": {str(i): {"w": jax.numpy.ones(2)} for i in range(12)}}
    opt_state = optax.adam(0.1).init(params)
    with pytest.warns(UserWarning, match="order is inferred"):
        state = optstate.from_optax(opt_state, params, optimizer="adam", hyperparams={"lr": 0.1})
    assert [p.path[1] for p in state.params] == [str(i) for i in range(12)]


def test_prefixed_names_are_named_in_the_error():
    model, opt = _stepped()
    weights = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(MappingError, match=r"'fc1.weight' is not among the model weights .*'module.fc1.weight'"):
        optstate.from_torch({"model": weights, "optimizer": opt.state_dict()})


def test_non_persistent_buffers_and_channels_last(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3)
            self.register_buffer("scale", torch.ones(3), persistent=False)

    model = Net().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.conv(torch.ones(1, 2, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    state = optstate.from_torch(opt, model=model)
    assert state.buffers == ()
    optstate.to_torch(state, torch.optim.AdamW(model.parameters(), lr=0.01), model=model)
    optstate.save(state, tmp_path / "s.safetensors")


def test_lightning_checkpoint_layout():
    model, opt = _stepped()
    state = optstate.from_torch({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]})
    assert state.optimizer == "adam" and state.weights is not None


def test_dotted_keys_in_optax_trees():
    params = {"fc1.weight": jax.numpy.ones((2, 2)), "fc1.bias": jax.numpy.ones(2)}
    opt_state = optax.adam(0.1).init(params)
    state = optstate.from_optax(
        opt_state, params, optimizer="adam", hyperparams=[{"lr": 0.1, "params": ["fc1.weight", "fc1.bias"]}]
    )
    assert [p.path for p in state.params] == [("fc1.weight",), ("fc1.bias",)]
    sd = optstate.to_torch_state_dict(state)
    assert sd["param_groups"][0]["param_names"] == ["fc1.weight", "fc1.bias"]


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"state": {}, "param_groups": []}, "non-empty 'param_groups'"),
        ({"state": {}, "param_groups": [{"lr": 0.1}]}, "param group 0 has no 'params' list"),
        ({"state": {5: {}}, "param_groups": [{"lr": 0.1, "params": [0]}]}, r"indices \[5\] that no param group holds"),
    ],
)
def test_malformed_state_dicts(tmp_path, sd, message):
    torch.save({"optimizer": sd}, tmp_path / "bad.pt")
    with pytest.raises(FormatError, match=message):
        optstate.from_torch(tmp_path / "bad.pt")
    assert main(["inspect", str(tmp_path / "bad.pt")]) == 1


@pytest.mark.parametrize(
    "hparams, message",
    [("[1]", "must be a dict or a list of dicts"), ('{"lr": "abc"}', "lr='abc' is not of the type torch takes")],
)
def test_bad_hparams_on_the_command_line(tmp_path, capsys, hparams, message):
    import orbax.checkpoint as ocp

    params = {"w": jax.numpy.ones(3)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ck", {"params": params, "opt_state": optax.adam(0.1).init(params)})
    checkpointer.wait_until_finished()
    assert (
        main(
            [
                "convert",
                "--from",
                "optax",
                "--to",
                "torch",
                "--optimizer",
                "adam",
                "--hparams",
                hparams,
                str(tmp_path / "ck"),
                str(tmp_path / "o.pt"),
            ]
        )
        == 1
    )
    assert message in capsys.readouterr().err


def test_empty_directory_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "convert",
                "--from",
                "optax",
                "--to",
                "torch",
                "--optimizer",
                "adam",
                "--hparams",
                '{"lr": 1}',
                str(tmp_path / "empty"),
                str(tmp_path / "o.pt"),
            ]
        )
        == 1
    )
    assert "not an Orbax checkpoint" in capsys.readouterr().err


def test_from_format_is_honoured_whatever_the_suffix(tmp_path):
    _model, opt = _stepped()
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "ckpt.tar")
    assert (
        main(
            [
                "convert",
                "--from",
                "torch",
                "--to",
                "optstate",
                str(tmp_path / "ckpt.tar"),
                str(tmp_path / "s.safetensors"),
            ]
        )
        == 0
    )


# ----------------------------------------------------------------------------- combinations (second review)

from optstate.converters.jax.optax import group_transform  # noqa: E402

from frameworks import jax_params, jax_train  # noqa: E402
from helpers import SHAPES, TOL, flat, gradient, max_abs_diff, nested  # noqa: E402

K, N = range(0, 5), range(5, 10)


def _skipping(model, opt, steps, sched=None, skipped="fc2.bias"):
    for step in steps:
        for name, p in model.named_parameters():
            value = p.detach().numpy().copy()
            p.grad = None if name == skipped and step % 2 == 0 else torch.from_numpy(gradient(step, name, value))
        opt.step()
        if sched is not None:
            sched.step()


def _continue_in_jax(state, model, steps=N, **kw):
    tx = optstate.optax_transform(state, **kw)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    params, _ = jax_train(tx, params, optstate.to_optax(state, tx, params), steps)
    return flat(params)


def test_adagrad_lr_decay_with_scheduler_and_skipped_steps():
    model = TinyNet()
    opt = torch.optim.Adagrad(model.named_parameters(), lr=0.05, lr_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _skipping(model, opt, K, sched)
    params = _continue_in_jax(optstate.from_torch(opt, scheduler=sched), model, horizon=10)
    _skipping(model, opt, N, sched, skipped=None)
    assert max_abs_diff(params, torch_params(model)) < TOL


def test_adafactor_group_at_lr_zero_stays_put():
    model = TinyNet()
    opt = torch.optim.Adafactor(
        [
            {"params": [("fc1.weight", model.fc1.weight), ("fc1.bias", model.fc1.bias)]},
            {"params": [("fc2.weight", model.fc2.weight), ("fc2.bias", model.fc2.bias)], "lr": 0.0},
        ],
        lr=0.05,
    )
    torch_train(model, opt, K)
    params = _continue_in_jax(optstate.from_torch(opt), model)
    torch_train(model, opt, N)
    assert max_abs_diff(params, torch_params(model)) < TOL


def test_adafactor_default_eps_over_mixed_dtypes_is_refused():
    model = TinyNet()
    model.fc2.to(torch.float32)
    opt = torch.optim.Adafactor(model.named_parameters(), lr=0.05)
    with pytest.raises(UnsupportedError, match=r"Adafactor\(eps=\(None, \.\.\.\)\) over parameters of dtypes"):
        optstate.optax_transform(optstate.from_torch(opt))


def test_counts_in_a_partition_of_the_users_own_labels():
    model = TinyNet()
    opt = torch.optim.Adagrad(model.named_parameters(), lr=0.05, lr_decay=0.1)
    torch_train(model, opt, K)
    state = optstate.from_torch(opt)
    inner = group_transform(optstate.OPTIMIZERS["adagrad"], state.param_groups[0])
    tx = optax.partition({"w": inner, "b": inner}, lambda p: {k: {"weight": "w", "bias": "b"} for k in p})
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    params, _ = jax_train(tx, params, optstate.to_optax(state, tx, params), N)
    torch_train(model, opt, N)
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_nadam_that_never_stepped_converts():
    model = TinyNet()
    opt = torch.optim.NAdam(model.named_parameters(), lr=0.02)
    params = _continue_in_jax(optstate.from_torch(opt, model=model), model, steps=K)
    torch_train(model, opt, K)
    assert max_abs_diff(params, torch_params(model)) < TOL


def test_chained_scheduler_continues_in_optax():
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=3),
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 7]),
        ]
    )
    _skipping(model, opt, K, sched, skipped=None)
    params = _continue_in_jax(optstate.from_torch(opt, scheduler=sched), model)
    _skipping(model, opt, N, sched, skipped=None)
    assert max_abs_diff(params, torch_params(model)) < TOL


def test_sgd_into_inject_hyperparams_and_multisteps_templates():
    model = TinyNet()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9)
    torch_train(model, opt, K)
    state = optstate.from_torch(opt)
    params = nested({n: jax.numpy.asarray(v) for n, v in torch_params(model).items()})
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.9)
    filled = optstate.to_optax(state, tx, params)
    assert float(filled.hyperparams["learning_rate"]) == 0.05
    ms = optax.MultiSteps(optax.sgd(0.05, momentum=0.9), every_k_schedule=2)
    assert int(optstate.to_optax(state, ms, params).mini_step) == 0


def test_injected_b1_completes_the_users_betas():
    tx = optax.inject_hyperparams(optax.adam, static_args=("b2",))(learning_rate=0.02, b1=0.8, b2=0.95)
    params = jax_params()
    params, opt_state = jax_train(tx, params, tx.init(params), K)
    state = optstate.from_optax(
        opt_state, params, optimizer="adam", hyperparams=[{"betas": [0.8, 0.95], "params": list(SHAPES)}]
    )
    assert state.param_groups[0]["betas"] == (0.8, 0.95) and state.param_groups[0]["lr"] == 0.02


def test_round_trip_keeps_steps_optax_has_no_count_for_and_the_scheduler(tmp_path):
    model = TinyNet()
    opt = torch.optim.RMSprop(model.named_parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3])
    _skipping(model, opt, K, sched, skipped=None)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()},
        tmp_path / "a.pt",
    )
    optstate.convert(tmp_path / "a.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    optstate.convert(tmp_path / "out", tmp_path / "b.pt", src_format="optax", dst_format="torch")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["lr_scheduler"] == sched.state_dict()
    assert {float(s["step"]) for s in back["optimizer"]["state"].values()} == {5.0}


def test_reset_restores_initial_values():
    model = TinyNet()
    opt = torch.optim.Adagrad(model.named_parameters(), lr=0.05, initial_accumulator_value=0.2)
    torch_train(model, opt, K)
    state = optstate.from_torch(opt).reset(["sum", "step"])
    assert all(np.all(a == 0.2) for a in state.slots.values()) and {p.step for p in state.params} == {0}


# ----------------------------------------------------------------------------- third review


def test_adagrad_steps_and_schedule_survive_an_optax_directory(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adagrad(model.named_parameters(), lr=0.05, lr_decay=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2])
    _skipping(model, opt, K, sched)
    torch.save(
        {"optimizer": opt.state_dict(), "model": model.state_dict(), "lr_scheduler": sched.state_dict()},
        tmp_path / "a.pt",
    )
    optstate.convert(tmp_path / "a.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    optstate.convert(tmp_path / "out", tmp_path / "b.pt", src_format="optax", dst_format="torch")
    before, after = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert {i: float(s["step"]) for i, s in after["optimizer"]["state"].items()} == {
        i: float(s["step"]) for i, s in before["optimizer"]["state"].items()
    }
    assert after["lr_scheduler"] == before["lr_scheduler"]


def test_too_small_a_horizon_is_one_line(tmp_path, capsys):
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    _skipping(model, opt, K, sched, skipped=None)
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, tmp_path / "a.pt")
    assert main(["convert", "--to", "optax", "--horizon", "2", str(tmp_path / "a.pt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "horizon=2 is below the state's last_epoch=5" in err and err.count("\n") == 1


def test_sidecar_of_another_version_is_named(tmp_path):
    import json

    model, opt = _stepped()
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict()}, tmp_path / "a.pt")
    optstate.convert(tmp_path / "a.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    sidecar = tmp_path / "out" / "optstate.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "format_version": 2, "params": None}))
    with pytest.raises(FormatError, match="format_version 2 is not supported"):
        optstate.load_optax(tmp_path / "out")


def test_inspect_of_a_state_entry_that_is_not_a_dict(tmp_path):
    _model, opt = _stepped()
    sd = opt.state_dict()
    sd["state"][0] = [1, 2]
    torch.save({"optimizer": sd}, tmp_path / "bad.pt")
    assert main(["inspect", str(tmp_path / "bad.pt")]) == 1


def test_reset_takes_any_iterable():
    _model, opt = _stepped(lambda m: torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9))
    state = optstate.from_torch(opt).reset(name for name in ["momentum_buffer"])
    assert all(not a.any() for a in state.slots.values())


def test_adam_and_adamw_from_before_torch_2_6_are_told_apart_or_refused():
    _model, opt = _stepped(lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.01, weight_decay=0.1))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"]  # as torch < 2.6 saved them
    with pytest.raises(UnsupportedError, match="Adam and AdamW param groups look alike"):
        optstate.from_torch(sd)
    assert optstate.from_torch(sd, optimizer="adamw").optimizer == "adamw"


def test_in_memory_migration_hands_moments_to_jax_without_a_copy():
    import jax

    import optstate

    net = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(net.named_parameters(), lr=1e-3)
    net(torch.ones(2, 64)).sum().backward()
    opt.step()
    state = optstate.from_torch(opt, copy=False)
    params = {"weight": jax.numpy.zeros((32, 64), np.float32), "bias": jax.numpy.zeros(32, np.float32)}
    opt_state = optstate.to_optax(state, optstate.optax_transform(state), params)
    mu = opt_state[0].mu["weight"]
    assert mu.unsafe_buffer_pointer() == opt.state[net.weight]["exp_avg"].data_ptr()  # DLPack, no copy
    np.testing.assert_array_equal(np.asarray(mu), opt.state[net.weight]["exp_avg"].numpy())
    copied = optstate.from_torch(opt)  # the default: a copy, safe against the next torch step
    assert copied.slots[("first_moment", ("weight",))].ctypes.data != opt.state[net.weight]["exp_avg"].data_ptr()


def test_a_scheduler_restored_into_other_param_groups_is_refused():
    """The saved scheduler has one lr per group: an optimizer built with other groups cannot take it."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    torch_train(model, opt, range(3))
    for _ in range(3):
        sched.step()
    state = optstate.from_torch(opt, model=model, scheduler=sched)
    fresh = TinyNet()
    split = torch.optim.SGD(
        [{"params": fresh.fc1.parameters()}, {"params": fresh.fc2.parameters()}], lr=0.1, momentum=0.9
    )
    with pytest.raises(UnsupportedError, match="1 param group"):
        optstate.to_torch(state, split, model=fresh, scheduler=torch.optim.lr_scheduler.StepLR(split, step_size=2))
