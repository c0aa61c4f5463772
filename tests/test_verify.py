"""``optstate verify``, ``optstate.verify`` and ``optstate.testing.assert_continues``: real conversions agree,
tampered ones do not (and say which parameter, and when), on the command line as in the library."""

from __future__ import annotations

import dataclasses
import json
import re

import flax.serialization
import jax
import numpy as np
import optax
import pytest
import torch
import transformers

import optstate
from optstate.cli import main
from optstate.converters import Framework
from optstate.errors import OptstateError
from optstate.schema import load, save
from optstate.testing import assert_continues
from optstate.verify import _FRAMEWORKS, OptaxRun

from frameworks import TinyNet, torch_train
from helpers import gradient
from test_progress import run_on_a_terminal, screen_lines


def checkpoint(path, make_optimizer, *, scheduler=None, frozen=False):
    """A TinyNet (float64) trained 4 steps with the optimizer ``make_optimizer(named parameters)`` makes, saved
    as a training script saves it: model, optimizer and, when given, the LR scheduler."""
    model = TinyNet(frozen=frozen)
    opt = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    sched = None if scheduler is None else scheduler(opt)
    for step in range(4):
        torch_train(model, opt, range(step, step + 1))
        if sched is not None:
            sched.step()
    saved = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    if sched is not None:
        saved["lr_scheduler"] = sched.state_dict()
    torch.save(saved, path)
    return path


def two_groups(named, **common):
    return [{"params": named[:2], "lr": 0.05}, {"params": named[2:], "lr": 0.02, "weight_decay": 0.0}]


CASES = {
    "sgd-momentum": (lambda named: torch.optim.SGD(named, lr=0.05, momentum=0.9), None, "out/"),
    "adamw-groups-schedule": (
        lambda named: torch.optim.AdamW(two_groups(named), lr=1e-3),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=10),
        "out/",
    ),
    "adagrad": (lambda named: torch.optim.Adagrad(named, lr=0.05, lr_decay=0.01), None, "s.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_conversions_agree(tmp_path, case):
    make, scheduler, out = CASES[case]
    ckpt = checkpoint(tmp_path / "c.pt", make, scheduler=scheduler, frozen=case == "sgd-momentum")
    optstate.convert(ckpt, f"{tmp_path}/{out}")  # a name ending in / is an Orbax directory
    report = optstate.verify(ckpt, f"{tmp_path}/{out}", steps=3)
    assert report and report.agrees and (report.src_framework, report.dst_framework) == ("torch", "optax")
    tracked = 3 if case == "sgd-momentum" else 4  # fc1.bias is frozen there: not the optimizer's
    assert len(report.params) == tracked and all(p.first_step_off is None for p in report.params)
    slots = {"sgd-momentum": "momentum_buffer", "adamw-groups-schedule": "exp_avg", "adagrad": "sum"}[case]
    assert {p.worst for p in report.params} <= {"param", slots, "exp_avg_sq", "step"}


def test_a_flax_layout_move_is_compared_in_torch_layout(tmp_path):
    ckpt = checkpoint(tmp_path / "c.pt", lambda named: torch.optim.Adam(named, lr=0.01))
    model = TinyNet()
    flax_params = {
        layer: {"kernel": getattr(model, layer).weight.detach().numpy().T.copy(), "bias": np.zeros(n)}
        for layer, n in (("fc1", 5), ("fc2", 2))
    }
    (tmp_path / "t.msgpack").write_bytes(flax.serialization.to_bytes({"params": flax_params}))
    optstate.convert(ckpt, f"{tmp_path}/out/", target_params=str(tmp_path / "t.msgpack"))
    report = optstate.verify(ckpt, tmp_path / "out")
    assert report.agrees, report.format()
    assert {p.name for p in report.params} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # torch's names


# ----------------------------------------------------------------------------- tampered outputs


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    """An Adam checkpoint in two param groups (fc1.*, fc2.*) and its canonical conversion."""
    tmp = tmp_path_factory.mktemp("adam")
    ckpt = checkpoint(tmp / "c.pt", lambda named: torch.optim.Adam(two_groups(named), lr=1e-3))
    optstate.convert(ckpt, tmp / "s.safetensors")
    return ckpt, tmp / "s.safetensors"


def tampered_slot(state):
    slots = dict(state.slots)
    moment = np.array(slots[("first_moment", ("fc2", "bias"))])
    moment[1] *= 1 + 1e-9
    slots[("first_moment", ("fc2", "bias"))] = moment
    return dataclasses.replace(state, slots=slots)


def tampered_lr(state):
    groups = [dict(g) for g in state.param_groups]
    groups[1]["lr"] *= 1.001  # fc2.weight and fc2.bias
    return dataclasses.replace(state, param_groups=tuple(groups))


def tampered_step(state):
    params = tuple(dataclasses.replace(p, step=p.step + 1) if p.path == ("fc2", "bias") else p for p in state.params)
    return dataclasses.replace(state, params=params)


@pytest.mark.parametrize(
    ("tamper", "off"),
    [(tampered_slot, {"fc2.bias"}), (tampered_lr, {"fc2.weight", "fc2.bias"}), (tampered_step, {"fc2.bias"})],
)
def test_a_tampered_output_disagrees_and_names_the_parameter(adam, tmp_path, tamper, off, capsys):
    ckpt, good = adam
    save(tamper(load(good)), tmp_path / "bad.safetensors")
    assert main(["verify", "--quiet", str(ckpt), str(tmp_path / "bad.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES" in out, out
    named = dict(re.findall(r"^  (\S+): .* at step (\d)", out, re.MULTILINE))
    assert set(named) == off, out  # the tampered parameters, and only they
    assert all(step == "1" or "off from step 1" in out for step in named.values()), out  # from the first step


def test_cli_exit_codes_and_json(adam, capsys):
    ckpt, good = adam
    assert main(["verify", "--quiet", "--steps", "2", "--seed", "7", str(ckpt), str(good)]) == 0
    assert "agrees: 4 parameter(s) of Adam" in capsys.readouterr().out
    assert main(["verify", "--json", str(ckpt), str(good)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["agrees"] is True and document["steps"] == 3 and document["dst_framework"] == "optax"
    assert {p["name"] for p in document["params"]} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(p["agrees"] and p["difference"] <= p["tolerance"] for p in document["params"])


def test_torch_to_torch_runs_both_in_torch(adam, tmp_path):
    ckpt, good = adam
    optstate.convert(good, tmp_path / "back.pt")
    report = optstate.verify(ckpt, tmp_path / "back.pt")
    assert report and (report.src_framework, report.dst_framework) == ("torch", "torch")


def test_convert_verify(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "c.pt", lambda named: torch.optim.RMSprop(named, lr=0.01, momentum=0.5))
    assert main(["convert", "--quiet", "--verify", str(ckpt), f"{tmp_path}/out/"]) == 0
    out = capsys.readouterr().out
    assert "RMSprop, 4 parameters" in out and "agrees: 4 parameter(s) of RMSprop" in out


def test_gradients_of_batches_from_a_module_function(adam, tmp_path, monkeypatch, capsys):
    ckpt, good = adam
    (tmp_path / "batches.py").write_text(
        "def gradients():\n"
        "    seen.clear()\n"
        "    return lambda params, step: seen.append(step) or {n: 0.5 * p for n, p in params.items()}\n"
        "seen = []\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "--quiet", "--model-data", "batches:gradients", str(ckpt), str(good)]) == 0
    assert "3 steps of batches:gradients" in capsys.readouterr().out
    import batches

    assert batches.seen == [1, 2, 3]  # called once a step, with the source side's parameters


def test_a_missing_framework_is_one_error_naming_the_extra(adam, monkeypatch, capsys):
    ckpt, good = adam
    monkeypatch.setitem(_FRAMEWORKS, "optax", Framework("no_such_jax", "jax"))
    assert main(["verify", str(ckpt), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'optstate[jax]'" in err and "s.safetensors" in err


def test_large_states_run_a_chunk_at_a_time(adam):
    ckpt, good = adam
    whole = optstate.verify(ckpt, good)
    one_by_one = optstate.verify(ckpt, good, max_chunk_bytes=1)  # each parameter alone
    assert one_by_one.params == whole.params


def test_the_progress_bar_on_a_terminal(adam):
    ckpt, good = adam
    script = (
        "import sys, optstate.progress as p; p.SHOW_AFTER_S = 0; from optstate.cli import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    import sys

    code, output = run_on_a_terminal([sys.executable, "-c", script, "verify", str(ckpt), str(good)])
    assert code == 0, output
    bars = [line for line in screen_lines(output) if line.startswith("verifying")]
    assert len(bars) == 1 and "100%" in bars[0] and "12 checks" in bars[0], output  # 4 parameters x 3 steps


# ----------------------------------------------------------------------------- assert_continues


def test_assert_continues_passes_for_a_converted_state_and_fails_naming_parameter_and_step():
    jax.config.update("jax_enable_x64", True)
    model = TinyNet()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01, weight_decay=0.1)
    torch_train(model, opt, range(3))
    state = optstate.from_torch(opt)
    tx = optstate.optax_transform(state)
    params = {
        layer: {k: getattr(model, layer).get_parameter(k).detach().numpy().copy() for k in ("weight", "bias")}
        for layer in ("fc1", "fc2")
    }
    opt_state = optstate.to_optax(state, tx, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert assert_continues(opt, tx, opt_state, params, steps=3)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the torch side was a copy

    faster = dataclasses.replace(state, param_groups=({**state.param_groups[0], "lr": 0.0101},))
    with pytest.raises(AssertionError, match=r"\n  fc\d\.\w+: param differs by .* off from step 1\)") as failure:
        assert_continues(opt, optstate.optax_transform(faster), opt_state, params)
    assert "does not continue the torch optimizer" in str(failure.value)


# ----------------------------------------------------------------------------- tied weights


def test_tied_weights_are_counted_and_named_once(tmp_path):
    config = transformers.GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    assert len(list(model.named_parameters())) == len(model.state_dict()) - 1  # lm_head.weight is wte's
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # no names saved: aligned by position
    tokens = torch.tensor([[1, 2, 3, 4]])
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")

    report = optstate.inspect(tmp_path / "c.pt")
    assert report.frozen == () and len(report.params) == 28 and report.weights["tensors"] == 28
    assert "lm_head.weight is transformer.wte.weight" in " ".join(report.notes)
    assert report.names == "aligned by position with the model weights"  # 28 tensors against 28 parameters
    assert report.optax == "exact"
    state = optstate.from_torch(tmp_path / "c.pt")
    assert len(state.params) == 28 and state.frozen_paths() == () and ("lm_head", "weight") not in state.weights
    live = optstate.from_torch(opt, model=model)
    assert len(live.params) == 28 and live.frozen_paths() == ()
    optstate.convert(tmp_path / "c.pt", f"{tmp_path}/out/")
    assert optstate.verify(tmp_path / "c.pt", f"{tmp_path}/out/")  # and it continues exactly in Optax


def test_an_optax_only_family_runs_in_optax_on_both_sides(tmp_path):
    """LAMB has no torch.optim counterpart: its canonical file runs in Optax too (Optax to Optax)."""
    jax.config.update("jax_enable_x64", True)
    tx = optax.lamb(1e-2)
    params = {"fc": {"w": np.ones((3, 2)), "b": np.zeros(2)}}
    opt_state = tx.init(params)
    for step in range(2):
        updates, opt_state = tx.update(
            jax.tree.map(lambda p, s=step: np.full(p.shape, 0.1 + s), params), opt_state, params
        )
        params = optax.apply_updates(params, updates)
    state = optstate.from_optax(
        opt_state, params, optimizer="lamb", hyperparams={"lr": 1e-2, "params": ["fc.w", "fc.b"]}
    )
    save(state, tmp_path / "s.safetensors")
    optstate.convert(tmp_path / "s.safetensors", f"{tmp_path}/out/")
    report = optstate.verify(tmp_path / "s.safetensors", f"{tmp_path}/out/")
    assert report and (report.src_framework, report.dst_framework) == ("optax", "optax")


def test_a_canonical_file_with_a_schedule_that_never_settles_verifies_without_a_horizon(tmp_path, capsys):
    # The canonical file keeps torch's StepLR as it is (convert needs no --horizon to write it); run in Optax its
    # schedule is a table that needs an end, and verify has no --horizon: it runs only its own few steps past it.
    ckpt = checkpoint(
        tmp_path / "c.pt",
        lambda named: torch.optim.Adam(named, lr=0.05),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    out = tmp_path / "s.safetensors"
    assert main(["convert", str(ckpt), str(out), "--verify"]) == 0, capsys.readouterr().err
    assert "agrees" in capsys.readouterr().out
    assert optstate.verify(ckpt, out, steps=5)


# ----------------------------------------------------------------------------- float32


def float32_checkpoint(path, make_optimizer):
    """A float32 TinyNet trained 4 steps (lr 0.05: each step moves a parameter by about a tenth of itself, so
    that a relative error of the update shows in the parameters, as it does in a model of small weights)."""
    model = TinyNet().float()
    opt = make_optimizer(list(model.named_parameters()))
    for step in range(4):
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(gradient(step, name, p.detach().double().numpy()).astype(np.float32))
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


FLOAT32 = {
    "Adam": (lambda named: torch.optim.Adam(named, lr=0.05), ()),
    "AdamW": (lambda named: torch.optim.AdamW(named, lr=0.05, weight_decay=0.1), ("decoupled weight decay",)),
    "RAdam": (lambda named: torch.optim.RAdam(named, lr=0.05), ()),  # rectified from its 6th step: steps 5 to 14
    "NAdam": (lambda named: torch.optim.NAdam(named, lr=0.05), ("NAdam adds its gradient term",)),
}


@pytest.mark.parametrize("family", list(FLOAT32))
def test_float32_adam_family_continues_in_optax_over_ten_steps(tmp_path, family):
    # Run as a user of JAX's default (x64 off) runs it: Optax would compute its bias corrections (RAdam's
    # rectification, NAdam's momentum schedule) in float32 and miss torch's Python floats by 3 to 55
    # tolerances here; verify turns x64 on for the Optax side, the arrays staying float32.
    make, notes = FLOAT32[family]
    ckpt = float32_checkpoint(tmp_path / "c.pt", make)
    optstate.convert(ckpt, tmp_path / "s.safetensors")
    with jax.enable_x64(False):
        report = optstate.verify(ckpt, tmp_path / "s.safetensors", steps=10)
        assert jax.numpy.zeros(1).dtype == np.float32  # verify's x64 went with it
    assert report.agrees, report.format()
    assert report.optimizer == family and {p.dtype for p in report.params} == {"float32"}
    # Where torch rounds a parameter twice a step, the report says why its tolerance grows faster.
    assert len(report.notes) == len(notes) and all(n in note for n, note in zip(notes, report.notes, strict=True))
    assert all(note in report.format() for note in report.notes)


def test_a_float32_output_of_another_lr_still_disagrees(tmp_path):
    ckpt = float32_checkpoint(tmp_path / "c.pt", FLOAT32["NAdam"][0])
    state = optstate.from_torch(ckpt)
    save(
        dataclasses.replace(state, param_groups=({**state.param_groups[0], "lr": 0.05 * 1.001},)),
        tmp_path / "s.safetensors",
    )
    report = optstate.verify(ckpt, tmp_path / "s.safetensors", steps=10)
    assert not report.agrees and {p.worst for p in report.disagreeing} == {"param"}, report.format()
    assert all(p.first_step_off == 1 for p in report.disagreeing), report.format()


def test_the_optax_side_must_keep_its_dtypes():
    # A float64 scale under x64 widens a float32 update, and the trace that keeps it: the side would run in
    # float64 and its agreement with torch's float32 mean nothing.
    with jax.enable_x64(True):
        tx = optax.chain(optax.scale(jax.numpy.asarray(-0.1, "float64")), optax.trace(0.9))
        params = {"w": jax.numpy.ones(3, "float32")}
        run = OptaxRun(tx, tx.init(params), params, "sgd", [{"lr": 0.1, "momentum": 0.9, "params": ["w"]}])
        with pytest.raises(OptstateError, match=r"Optax state's \[1\]\[1\]\.trace\['w'\] is float64, expected float32"):
            run.step({("w",): np.ones(3, np.float32)})
