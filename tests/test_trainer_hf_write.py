"""Hugging Face Trainer ``checkpoint-N/`` directories written by optstate (the ``hf-trainer`` writer) and resumed by
transformers' own ``Trainer.train(resume_from_checkpoint=...)``: from a Trainer checkpoint read back (the run goes
on as the run that never stopped) and from an AdamW state trained in JAX (the Trainer goes on as JAX does), in
float64, to 1e-12. States whose param groups or schedule the Trainer cannot rebuild are refused by name."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from transformers import Trainer

import optstate
from optstate.cli import main
from optstate.converters.formats import ReadOptions, WriteOptions
from optstate.converters.torch import hf_trainer
from optstate.errors import MappingError, UnsupportedError
from optstate.schema import OptimizerState, ParamInfo
from optstate.schema.state import name_to_path, path_to_name

from test_trainer_hf import CASES, DATA, MAX_STEPS, STEPS, _arguments, _torch_gradients, _train, tiny_model

jax.config.update("jax_enable_x64", True)

TOL = 1e-12
MODEL = "test_trainer_hf:tiny_model"  # the float64 GPT-2 the Trainer trains (tests/ is on sys.path)
LR, DECAY = 1e-2, 0.1  # _arguments' learning_rate and weight_decay


def _params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _resume(output_dir, checkpoint, arguments: dict) -> dict[str, np.ndarray]:
    """The Trainer resumed from ``checkpoint`` under the TrainingArguments the writer named (the common ones of
    test_trainer_hf's runs beside them: batch, data order, no clipping), run to MAX_STEPS."""
    assert (arguments["learning_rate"], arguments["weight_decay"]) == (LR, DECAY)
    assert arguments.get("max_steps", MAX_STEPS) == MAX_STEPS  # a schedule of the training length names it
    case = {k: arguments[k] for k in ("optim", "lr_scheduler_type", "warmup_steps", "lr_scheduler_kwargs")}
    trainer = Trainer(model=tiny_model(), args=_arguments(output_dir, **case), train_dataset=DATA)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == MAX_STEPS
    return _params(trainer.model)


def _assert_close(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], label: str, capsys) -> None:
    assert ours.keys() == theirs.keys()
    worst = max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in ours)
    with capsys.disabled():
        print(f"\n{label}: max |difference| after {MAX_STEPS - STEPS} resumed steps = {worst:.3g}")
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


# ----------------------------------------------------------------------------- a Trainer checkpoint, back


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A polynomial run (lr_scheduler_kwargs, lr_init = the learning rate) to MAX_STEPS, saving checkpoint-STEPS on
    the way: its final parameters are the run that never stopped."""
    run = tmp_path_factory.mktemp("polynomial")
    trainer = _train(run, dict(CASES["polynomial"]))
    return run / f"checkpoint-{STEPS}", _params(trainer.model)


def test_a_trainer_checkpoint_written_back_resumes_as_the_run_that_never_stopped(uninterrupted, tmp_path, capsys):
    checkpoint, final = uninterrupted
    state = hf_trainer.read(checkpoint, ReadOptions())
    out = tmp_path / f"checkpoint-{STEPS}"
    arguments = hf_trainer.write_checkpoint(state, out, checkpoint)  # the checkpoint directory as the model (config)
    assert arguments == {
        "optim": "adamw_torch",
        "weight_decay": DECAY,
        "lr_scheduler_type": "polynomial",
        "warmup_steps": 2,
        "max_steps": MAX_STEPS,
        "learning_rate": LR,
        "lr_scheduler_kwargs": {"lr_end": 1e-7, "power": 2.0},
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        hf_trainer.RESUME_ARGUMENTS,
        "scheduler.pt",
        "trainer_state.json",
    ]
    # The files are the Trainer's own, as torch.load reads them (the resume below loads them with weights_only).
    theirs, ours = (torch.load(d / "optimizer.pt", weights_only=True) for d in (checkpoint, out))
    assert ours["param_groups"] == theirs["param_groups"]
    for index, entry in theirs["state"].items():
        for key, value in entry.items():
            assert ours["state"][index][key].dtype == value.dtype and torch.equal(ours["state"][index][key], value)
    assert torch.load(out / "scheduler.pt", weights_only=True) == torch.load(
        checkpoint / "scheduler.pt", weights_only=True
    )

    # The run's own bookkeeping, from the checkpoint given as the model: it logs and saves as it did.
    written = json.loads((out / "trainer_state.json").read_text())
    assert (written["global_step"], written["save_steps"], written["train_batch_size"]) == (STEPS, STEPS, 2)

    _assert_close(_resume(tmp_path / "resumed", out, arguments), final, "polynomial, written back", capsys)

    # inspect reads it back: the schedule from the recorded arguments, converting to Optax exactly.
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "(hf-trainer)" in report and "to Optax: exact" in report and "polynomial" in report
    again = hf_trainer.read(out, ReadOptions())
    assert again.metadata.lr_scheduler[hf_trainer.KEY] == state.metadata.lr_scheduler[hf_trainer.KEY]
    for key, array in state.slots.items():
        np.testing.assert_array_equal(np.asarray(again.slots[key]), np.asarray(array))


# ----------------------------------------------------------------------------- an AdamW state trained in JAX


def _jax_tree(named: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in named.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: np.asarray(tree)}


def _trainer_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW hyperparameters as the Trainer builds them: decayed names, then the rest at weight_decay 0."""
    decay, no_decay = hf_trainer.decay_split(model)
    return [{"lr": LR, "weight_decay": DECAY, "params": decay}, {"lr": LR, "weight_decay": 0.0, "params": no_decay}]


def _jax_adamw(groups: list[dict], model: torch.nn.Module) -> optax.GradientTransformation:
    """optstate's torch-exact AdamW for the two groups (an Optax partition), constant lr."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    params = tuple(
        ParamInfo(name_to_path(n), shapes[n], "float64", gi) for gi, g in enumerate(groups) for n in g["params"]
    )
    blank = OptimizerState("adamw", tuple({k: v for k, v in g.items() if k != "params"} for g in groups), params, {})
    return optstate.optax_transform(blank)


def _jax_steps(tx, params, opt_state, trainer: Trainer, steps: range):
    for step in steps:
        grads = _jax_tree(_torch_gradients(trainer, _flat(params), step))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def test_an_optax_adamw_state_converted_on_the_command_line_resumes_in_the_trainer(tmp_path, capsys):
    model = tiny_model()
    groups = _trainer_groups(model)
    tx = _jax_adamw(groups, model)
    helper = Trainer(model=tiny_model(), args=_arguments(tmp_path / "unused"), train_dataset=DATA)  # loss, batches
    helper.model.train()
    params = _jax_tree(_params(model))
    params, opt_state = _jax_steps(tx, params, tx.init(params), helper, range(STEPS))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()

    out = tmp_path / f"checkpoint-{STEPS}"
    hparams = json.dumps(groups)
    command = ["convert", "--from", "optax", "--to", "hf-trainer", "--optimizer", "adamw", "--optstate-transform"]
    assert main([*command, "--hparams", hparams, "--model", MODEL, str(tmp_path / "orbax"), str(out)]) == 0
    assert "resume with TrainingArguments(optim='adamw_torch'" in capsys.readouterr().err
    arguments = json.loads((out / hf_trainer.RESUME_ARGUMENTS).read_text())["TrainingArguments"]
    assert arguments["lr_scheduler_type"] == "constant" and arguments["learning_rate"] == LR
    assert "max_steps" not in arguments  # a constant lr does not fix the training length
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS

    theirs = _resume(tmp_path / "resumed", out, arguments)
    ours, _ = _jax_steps(tx, params, opt_state, helper, range(STEPS, MAX_STEPS))
    moved = max(float(np.max(np.abs(theirs[n] - _flat(params)[n]))) for n in theirs)
    assert moved > 1e-3  # the resumed steps did move the parameters
    _assert_close(_flat(ours), theirs, "JAX AdamW -> Trainer", capsys)

    # A module:function model leaves no config.json: inspect says to name the model, as convert was told it.
    assert main(["inspect", str(out)]) == 1
    assert "no config.json to build the model from" in capsys.readouterr().err
    assert main(["inspect", "--model", MODEL, str(out)]) == 0
    assert "step 4" in capsys.readouterr().out


# ----------------------------------------------------------------------------- another trainer's names


def _prefixed(state: OptimizerState, prefix: str) -> OptimizerState:
    """``state`` under a wrapper's names, as another trainer saves it (a LightningModule's ``net.``)."""

    def move(path: tuple[str, ...]) -> tuple[str, ...]:
        return name_to_path(prefix + path_to_name(path))

    return dataclasses.replace(
        state,
        params=tuple(dataclasses.replace(p, path=move(p.path)) for p in state.params),
        slots={(slot, move(path)): a for (slot, path), a in state.slots.items()},
        weights={move(path): a for path, a in state.weights.items()},
        buffers=tuple(move(path) for path in state.buffers),
    )


def test_a_state_under_another_trainers_prefix_is_written_under_the_models_names(uninterrupted, tmp_path):
    """A LightningModule's ``net.transformer.h.0...`` is the Trainer's model's ``transformer.h.0...``: the files
    are those of the state under the model's own names (the Trainer loads optimizer.pt by position and
    model.safetensors by name)."""
    checkpoint, _ = uninterrupted
    state = hf_trainer.read(checkpoint, ReadOptions())
    plain, wrapped = tmp_path / "plain" / f"checkpoint-{STEPS}", tmp_path / "wrapped" / f"checkpoint-{STEPS}"
    hf_trainer.write_checkpoint(state, plain, MODEL)
    hf_trainer.write_checkpoint(_prefixed(state, "net."), wrapped, MODEL)
    for name in ("model.safetensors", "trainer_state.json"):
        assert (wrapped / name).read_bytes() == (plain / name).read_bytes(), name
    # the .pt files as torch reads them (a .pt's serialization_id is random per file)
    assert torch.load(wrapped / "scheduler.pt", weights_only=True) == torch.load(
        plain / "scheduler.pt", weights_only=True
    )
    ours, theirs = (torch.load(d / "optimizer.pt", weights_only=True) for d in (wrapped, plain))
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert all(torch.equal(ours["state"][index][key], value) for key, value in entry.items()), index


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def state(uninterrupted) -> OptimizerState:
    return hf_trainer.read(uninterrupted[0], ReadOptions())


def _refused(state: OptimizerState, tmp_path, error, match: str, **options) -> None:
    out = tmp_path / f"checkpoint-{STEPS}"
    with pytest.raises(error, match=match):
        hf_trainer.write(state, out, WriteOptions(**{"model": MODEL, **options}))
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_state_without_weights_is_refused_naming_what_to_do(state, tmp_path):
    _refused(
        dataclasses.replace(state, weights=None), tmp_path, UnsupportedError, "holds no model weights.*convert from"
    )


def test_groups_the_trainer_cannot_build_are_refused(state, tmp_path):
    # One group decaying everything (optax.adamw's default): LayerNorm and biases are in the Trainer's undecayed group.
    one = dataclasses.replace(
        state,
        param_groups=(state.param_groups[0],),
        params=tuple(dataclasses.replace(p, group=0) for p in state.params),
        metadata=dataclasses.replace(
            state.metadata, lr_scheduler={**state.metadata.lr_scheduler, "base_lrs": [LR], "_last_lr": [LR]}
        ),
    )
    _refused(one, tmp_path, MappingError, r"'transformer.h.0.ln_1.weight' has weight_decay 0.1, but .*undecayed")
    # Two groups with different betas: the Trainer builds both with one set.
    betas = dataclasses.replace(
        state, param_groups=(state.param_groups[0], {**state.param_groups[1], "betas": (0.8, 0.9)})
    )
    _refused(betas, tmp_path, MappingError, r"has betas=\(0.8, 0.9\) where 'transformer.wte.weight' has \(0.9, 0.999\)")
    # Another model: a parameter the state does not track.
    _refused(state, tmp_path, MappingError, "not tracked by the state", model=_bigger_model())


def _bigger_model() -> torch.nn.Module:
    model = tiny_model()
    model.extra = torch.nn.Linear(2, 2, dtype=torch.float64)
    return model


def test_a_schedule_the_trainer_cannot_name_is_refused(state, tmp_path):
    linear_lr = {"start_factor": 0.5, "end_factor": 1.0, "total_iters": 5, "base_lrs": [LR, LR], "last_epoch": STEPS,
                 "_step_count": STEPS + 1, "_is_initial": False, "_get_lr_called_within_step": False,
                 "_last_lr": [LR, LR]}  # fmt: skip
    _refused(state.with_metadata(lr_scheduler=linear_lr), tmp_path, UnsupportedError, "LinearLR.*LambdaLR")
    unsaved = state.with_metadata(lr_scheduler=None)  # the groups' initial_lr shows a scheduler was attached
    _refused(unsaved, tmp_path, UnsupportedError, "LR schedule that it does not carry.*--constant-lr")


def test_no_model_a_misnamed_directory_and_torch_adam_are_refused(state, tmp_path):
    with pytest.raises(optstate.OptstateError, match="--model"):
        hf_trainer.write(state, tmp_path / "checkpoint-4", WriteOptions())
    with pytest.raises(optstate.OptstateError, match="name it checkpoint-4"):
        hf_trainer.write(state, tmp_path / "checkpoint-5", WriteOptions(model=MODEL))
    adam = OptimizerState("adam", state.param_groups, state.params, {}, state.weights, metadata=state.metadata)
    _refused(adam, tmp_path, UnsupportedError, "optimizer Adam: the Trainer builds")  # it builds AdamW, not Adam


def test_a_scheduler_count_of_another_type_is_still_the_step(state, tmp_path):
    """``last_epoch`` read as a NumPy integer counts as the scheduler's step: one that disagrees with the
    optimizer's is refused, not passed over."""
    sd = state.metadata.lr_scheduler
    ahead = state.with_metadata(lr_scheduler={**sd, "last_epoch": np.int64(STEPS + 1)})
    _refused(ahead, tmp_path, UnsupportedError, rf"steps disagree: the optimizer's step count {STEPS}, .* {STEPS + 1}")


def _model_directory(path, **dtype) -> str:
    """A Hugging Face model directory of the tiny GPT-2: its config.json, with ``dtype`` as given (or none)."""
    config = tiny_model().config.to_dict()
    document = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**document, "architectures": ["GPT2LMHeadModel"], **dtype}))
    return str(path)


def test_a_config_without_dtype_is_checked_against_the_models_dtype(state, tmp_path):
    """A model directory whose config.json names no dtype builds in the default float32: the float64 state would
    be cast by the Trainer's load_state_dict, so it is refused; with ``dtype: float64`` it is written."""
    bare = _model_directory(tmp_path / "bare")
    out = tmp_path / f"checkpoint-{STEPS}"
    with pytest.raises(MappingError, match=r"is float32 \[.*\] in the model, float64 \[.*\] in the state"):
        hf_trainer.write(state, out, WriteOptions(model=bare))
    assert not out.exists()
    with pytest.warns(UserWarning, match="resume with TrainingArguments"):
        hf_trainer.write(state, out, WriteOptions(model=_model_directory(tmp_path / "f64", dtype="float64")))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float64"
