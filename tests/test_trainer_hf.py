"""Hugging Face Trainer ``checkpoint-N/`` directories, written by transformers' own Trainer: converted to Optax
with no flags (names, groups and the LR schedule read from the directory), the run continues in Optax as
``trainer.train(resume_from_checkpoint=...)`` continues it, in float64, to 1e-12."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import optax
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import optstate
from optstate.cli import main
from optstate.converters.formats import ReadOptions
from optstate.converters.schedules.transformers import KEY
from optstate.converters.torch import hf_trainer
from optstate.report import format_report

jax.config.update("jax_enable_x64", True)

STEPS, MAX_STEPS = 4, 10  # the checkpoint is taken at STEPS; the resumed run goes on to MAX_STEPS
TOL = 1e-12
BATCH = 2

# Deterministic data: 4 batches of 2 sequences, read in order (train_sampling_strategy="sequential").
IDS = np.random.default_rng(0).integers(0, 64, (4 * BATCH, 12))
DATA = [{"input_ids": torch.from_numpy(row), "labels": torch.from_numpy(row)} for row in IDS]

# id: TrainingArguments beyond the common ones. warmup_steps < 1 is a ratio of max_steps (transformers 5's
# warmup_ratio): ceil(0.25 * 10) = 3 steps.
CASES = {
    "linear": {"lr_scheduler_type": "linear", "warmup_steps": 3},
    "cosine": {"lr_scheduler_type": "cosine", "warmup_steps": 2},
    "cosine-warmup-ratio-fused": {"lr_scheduler_type": "cosine", "warmup_steps": 0.25, "optim": "adamw_torch_fused"},
    "polynomial": {"lr_scheduler_type": "polynomial", "warmup_steps": 2, "lr_scheduler_kwargs": {"power": 2.0}},
}
WARMUP = {"linear": 3, "cosine": 2, "cosine-warmup-ratio-fused": 3, "polynomial": 2}  # num_warmup_steps


def tiny_config() -> GPT2Config:
    # No dropout: the Trainer's resumed run and the Optax run must see the same function of the parameters.
    return GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config()).to(torch.float64)


def _arguments(output_dir, **case) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=STEPS,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim=case.pop("optim", "adamw_torch"),
        # Clipping is the training loop's, not the optimizer's: off, so that the Optax run needs none.
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **case,
    )


def _train(output_dir, case, *, resume=None, optimizers=(None, None)) -> Trainer:
    trainer = Trainer(
        model=tiny_model(), args=_arguments(output_dir, **case), train_dataset=DATA, optimizers=optimizers
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


@pytest.fixture(scope="module", params=sorted(CASES))
def case_checkpoint(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param)
    _train(run, dict(CASES[request.param]), resume=None)
    return request.param, run / f"checkpoint-{STEPS}"


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("linear")
    _train(run, dict(CASES["linear"]))
    return run / f"checkpoint-{STEPS}"


# ----------------------------------------------------------------------------- the two continuations


def _trainer_continues(case: str, checkpoint, output_dir) -> dict[str, np.ndarray]:
    trainer = _train(output_dir, dict(CASES[case]), resume=checkpoint)
    assert trainer.state.global_step == MAX_STEPS
    return {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}


def _torch_gradients(trainer: Trainer, params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """The gradients the Trainer takes at ``step`` (0-based), at ``params``: the same batch and the Trainer's
    own loss (``compute_loss``, divided by the token count ``_get_num_items_in_batch`` gives, whose rule
    differs between transformers versions)."""
    model = trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.array(params[name])))
    inputs = trainer.data_collator(DATA[(step % (len(DATA) // BATCH)) * BATCH :][:BATCH])
    model.zero_grad()
    count = trainer._get_num_items_in_batch([inputs], torch.device("cpu"))
    trainer.compute_loss(model, inputs, num_items_in_batch=count).backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def _name(path) -> str:
    return ".".join(str(k.key) for k in path)


def _flat(tree) -> dict[str, np.ndarray]:
    return {_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shaped_like(tree, flat: dict[str, np.ndarray]):
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[_name(path)], tree)


def _optax_continues(directory, case: str, output_dir) -> dict[str, np.ndarray]:
    params, opt_state, tx = optstate.load_optax(directory)
    trainer = Trainer(model=tiny_model(), args=_arguments(output_dir, **dict(CASES[case])), train_dataset=DATA)
    trainer.model.train()
    for step in range(STEPS, MAX_STEPS):
        grads = _shaped_like(params, _torch_gradients(trainer, _flat(params), step))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


def test_trainer_checkpoint_continues_exactly_in_optax(case_checkpoint, tmp_path):
    case, checkpoint = case_checkpoint
    assert main(["convert", "--to", "optax", str(checkpoint), str(tmp_path / "out")]) == 0  # no flags
    ours = _optax_continues(tmp_path / "out", case, tmp_path / "unused")
    theirs = _trainer_continues(case, checkpoint, tmp_path / "resumed")
    assert ours.keys() == theirs.keys()
    moved = max(float(np.max(np.abs(theirs[n] - _flat(optstate.load_optax(tmp_path / "out")[0])[n]))) for n in ours)
    assert moved > 1e-3  # the continuation is not trivially equal
    worst = max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in ours)
    print(f"{case}: max |optax - trainer| after {MAX_STEPS - STEPS} steps = {worst:.3g}")
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TOL, err_msg=name)


def test_the_state_names_groups_and_schedule_from_the_directory(case_checkpoint):
    case, checkpoint = case_checkpoint
    state = hf_trainer.read(checkpoint, ReadOptions())
    assert [g["weight_decay"] for g in state.param_groups] == [0.1, 0.0]
    by_group = {p.path: p.group for p in state.params}
    assert by_group[("transformer", "wte", "weight")] == 0 and by_group[("transformer", "ln_f", "bias")] == 1
    assert by_group[("transformer", "h", "0", "ln_1", "weight")] == 1  # LayerNorm weights are not decayed
    assert ("lm_head", "weight") not in by_group  # tied to wte, listed once
    assert state.common_step() == STEPS
    schedule = state.metadata.lr_scheduler[KEY]
    assert schedule["type"] == CASES[case]["lr_scheduler_type"]
    assert schedule["kwargs"]["num_warmup_steps"] == WARMUP[case]
    assert state.metadata.lr_horizon == MAX_STEPS


# ----------------------------------------------------------------------------- inspect, refusals, --model


def test_inspect_with_no_flags_says_what_the_directory_holds(linear_checkpoint, capsys):
    assert main(["inspect", str(linear_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "(hf-trainer)" in out and "AdamW, 28 parameters, step 4" in out and "to Optax: exact" in out
    notes = "\n".join(hf_trainer.inspect(str(linear_checkpoint)).notes)
    assert "global_step 4 of max_steps 10" in notes
    assert "group 0 weight decay (10 params), group 1 no weight decay (18 params)" in notes
    assert "linear (num_warmup_steps=3, num_training_steps=10)" in notes
    assert "not carried: rng_state.pth" in notes
    print(format_report(hf_trainer.inspect(str(linear_checkpoint))))


def test_a_scheduler_type_not_reproduced_is_refused_by_name(tmp_path, capsys):
    """reduce_lr_on_plateau follows the evaluation metric: no schedule of the step count reproduces it."""
    case = {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps", "eval_steps": 2}
    trainer = Trainer(model=tiny_model(), args=_arguments(tmp_path, **case), train_dataset=DATA, eval_dataset=DATA)
    trainer.train()
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert main(["convert", "--to", "optax", str(checkpoint), str(tmp_path / "out")]) == 1
    assert "'reduce_lr_on_plateau'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert "reduce_lr_on_plateau" in hf_trainer.inspect(str(checkpoint)).optax


def test_a_scheduler_the_arguments_do_not_describe_is_refused(tmp_path, capsys):
    """A Trainer given its own optimizer (built from named parameters: param_names are saved) and a LambdaLR of
    its own: training_args.bin still says "linear", which does not give the lr the scheduler saved."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step)
    trainer = Trainer(
        model=model, args=_arguments(tmp_path, **CASES["linear"]), train_dataset=DATA, optimizers=(opt, sched)
    )
    trainer.train()
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert main(["convert", "--to", "optax", str(checkpoint), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "training_args.bin" in err and "do not describe this scheduler" in err


def _model_directory(directory, config: GPT2Config):
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(directory)
    return directory


def test_model_overrides_config_json(linear_checkpoint, tmp_path, capsys):
    """--model names the model where the directory has no config.json, and replaces the one it has."""
    bare = tmp_path / "checkpoint-4"
    shutil.copytree(linear_checkpoint, bare)
    (bare / "config.json").unlink()
    assert main(["convert", "--to", "optax", str(bare), str(tmp_path / "refused")]) == 1
    assert "config.json" in capsys.readouterr().err

    model_dir = _model_directory(tmp_path / "model", tiny_config())  # config.json only, no weights
    assert main(["convert", "--to", "optax", "--model", str(model_dir), str(bare), str(tmp_path / "out")]) == 0

    bigger = tiny_config()
    bigger.n_layer = 3
    other = _model_directory(tmp_path / "other", bigger)
    assert main(["convert", "--to", "optax", "--model", str(other), str(linear_checkpoint), str(tmp_path / "x")]) == 1
    assert "param group 0, weight decay" in capsys.readouterr().err
