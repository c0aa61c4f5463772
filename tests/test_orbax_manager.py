"""Orbax ``CheckpointManager`` directories (``ROOT/<step>/<item>``), written by Orbax itself, read by the ``optax``
format: the latest step by default, ``--step`` to choose, a step directory given directly, a named item."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optstate
from optstate.api import read
from optstate.atomic import checked_before_commit
from optstate.cli import main
from optstate.converters.jax.orbax import manager_steps, save_optax_dir

HPARAMS = '{"lr": 0.1}'
READING = ("--optimizer", "adam", "--hparams", HPARAMS)


def _train_and_save(root, wrap) -> dict[int, dict]:
    """Three Adam steps saved at steps 1, 2, 3 by a CheckpointManager; what each step saved, as NumPy."""
    params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.zeros(2)}
    tx = optax.adam(0.1)
    opt_state = tx.init(params)
    saved = {}
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    for step in (1, 2, 3):
        grads = jax.tree.map(lambda p, s=step: jnp.full_like(p, s) + p, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        tree = {"params": params, "opt_state": opt_state}
        manager.save(step, args=wrap(tree))
        saved[step] = jax.tree.map(np.asarray, tree)
    manager.wait_until_finished()
    manager.close()
    return saved


@pytest.fixture(scope="module")
def default_item(tmp_path_factory):
    root = tmp_path_factory.mktemp("default") / "ckpts"
    return root, _train_and_save(root, ocp.args.StandardSave)


@pytest.fixture(scope="module")
def named_item(tmp_path_factory):
    root = tmp_path_factory.mktemp("named") / "ckpts"
    return root, _train_and_save(root, lambda tree: ocp.args.Composite(state=ocp.args.StandardSave(tree)))


def _inspect_json(path, *extra, capsys) -> dict:
    assert main(["inspect", str(path), *READING, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _read(path, step=None) -> optstate.OptimizerState:
    return read(path, "optax", optimizer="adam", hyperparams=json.loads(HPARAMS), step=step)


def test_the_root_reads_the_latest_step(default_item, capsys):
    root, _ = default_item
    facts = _inspect_json(root, capsys=capsys)
    assert {p["step"] for p in facts["params"]} == {3}


def test_step_chooses_a_step(default_item, capsys):
    root, saved = default_item
    facts = _inspect_json(root, "--step", "2", capsys=capsys)
    assert {p["step"] for p in facts["params"]} == {2}
    state = _read(root, step=2)
    mu = saved[2]["opt_state"][0].mu
    for name in ("w", "b"):
        np.testing.assert_array_equal(
            np.asarray(state.slots[("first_moment", (name,))]).reshape(mu[name].shape), mu[name]
        )
    assert not np.array_equal(saved[2]["opt_state"][0].mu["b"], saved[3]["opt_state"][0].mu["b"])


def test_a_step_directory_converts(default_item, tmp_path, capsys):
    root, saved = default_item
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(root / "3"), str(out), *READING]) == 0
    state = read(out)
    assert {p.step for p in state.params} == {3}
    nu = saved[3]["opt_state"][0].nu["b"]
    np.testing.assert_array_equal(np.asarray(state.slots[("second_moment", ("b",))]), nu)


def test_a_named_item_is_found(named_item, capsys):
    root, saved = named_item
    assert {p["step"] for p in _inspect_json(root, capsys=capsys)["params"]} == {3}
    state = _read(root / "2")
    np.testing.assert_array_equal(np.asarray(state.slots[("first_moment", ("b",))]), saved[2]["opt_state"][0].mu["b"])


def test_a_missing_step_is_refused_naming_the_steps(default_item, capsys):
    root, _ = default_item
    assert main(["inspect", str(root), *READING, "--step", "7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("optstate: error: ") and err.count("\n") == 1
    assert str(root) in err and "[1, 2, 3]" in err


def test_step_on_one_checkpoint_is_refused(default_item, capsys):
    root, _ = default_item
    assert main(["inspect", str(root / "3"), *READING, "--step", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(root / "3") in err and "--step" in err


def test_several_items_without_one_optimizer_item_are_refused_by_name(tmp_path, capsys):
    root = tmp_path / "ckpts"
    tree = {"w": np.ones(2, np.float32)}
    manager = ocp.CheckpointManager(root)
    manager.save(1, args=ocp.args.Composite(a=ocp.args.StandardSave(tree), b=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    manager.close()
    assert main(["inspect", str(root), *READING]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(root / "1") in err and "['a', 'b']" in err and "name the item" in err


def test_one_dict_of_hyperparameters_reads_without_an_order_warning(default_item):
    """One group: its membership does not depend on the order, and what a conversion writes names each parameter."""
    root, _ = default_item
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _read(root)
    assert not [w for w in caught if "order is inferred" in str(w.message)]


def test_groups_given_by_position_warn_and_take_the_inferred_order(default_item):
    root, _ = default_item
    groups = [{"lr": 0.1, "params": [1]}, {"lr": 0.2, "params": [0]}]  # positions, as in a torch state_dict
    with pytest.warns(UserWarning, match="param groups given by position take their members from it"):
        state = read(root, "optax", optimizer="adam", hyperparams=groups)
    assert [(p.path, p.group) for p in state.params] == [(("w",), 0), (("b",), 1)]  # registration order: b, w


def test_several_groups_without_params_are_refused_in_one_line(default_item):
    root, _ = default_item
    with pytest.raises(optstate.OptstateError, match=r"param group 1 of 2 lists no 'params'"):
        read(root, "optax", optimizer="adam", hyperparams=[{"lr": 0.1, "params": ["b"]}, {"lr": 0.2}])


def _refuse() -> None:
    raise optstate.OptstateError("the output did not verify")


@pytest.mark.parametrize("step", [None, 7])
def test_a_failed_write_leaves_no_directory_it_made(default_item, step, tmp_path):
    """A write that fails at its end (a check before the commit, as convert --verify runs) leaves nothing behind,
    not even the directories made to hold it."""
    root, _ = default_item
    state = _read(root)
    out = tmp_path / "a" / "b" / "ckpts"
    with checked_before_commit(_refuse), pytest.raises(optstate.OptstateError, match="did not verify"):
        save_optax_dir(state, out, step=step)
    assert list(tmp_path.iterdir()) == []
    save_optax_dir(state, out, step=step)  # the same write, not refused, reads back
    assert {p.step for p in _read(out, step=step).params} == {3}


def test_a_failed_step_keeps_the_steps_already_there(default_item, tmp_path):
    root, _ = default_item
    state = _read(root)
    save_optax_dir(state, tmp_path / "ckpts", step=3)
    with checked_before_commit(_refuse), pytest.raises(optstate.OptstateError, match="did not verify"):
        save_optax_dir(state, tmp_path / "ckpts", step=4)
    assert manager_steps(tmp_path / "ckpts") == [3]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["3"]


# ----------------------------------------------------------------------------- faults, through the command line


def _adam_state(values: int) -> optstate.OptimizerState:
    """An Adam state of two float64 parameters, ``values`` numbers each, with first and second moments."""
    params = tuple(optstate.ParamInfo((name,), (values,), "float64", 0, 3) for name in ("w", "b"))
    rng = np.random.default_rng(0)
    slots = {(slot, p.path): rng.random(values) for slot in ("first_moment", "second_moment") for p in params}
    return optstate.OptimizerState("adam", ({"lr": 1e-3},), params, slots)


def _run_cli(*args: str, file_size_kib: int | None = None) -> subprocess.CompletedProcess:
    """``python -m optstate ARGS`` in a child process; with ``file_size_kib``, no file it writes may grow past
    that many KiB (the shell's ``ulimit -f``, SIGXFSZ ignored), so a write fails as on a full disk. A shell
    sets the limit: a ``preexec_fn`` would fork this multithreaded (JAX) process."""
    command = [sys.executable, "-m", "optstate", *args]
    if file_size_kib is not None:
        command = ["bash", "-c", f'ulimit -f {file_size_kib}; trap "" XFSZ; exec "$@"', "bash", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_full_disk_while_writing_orbax_is_one_line_and_leaves_nothing(tmp_path):
    """The write fails inside Orbax's threads (TensorStore: ``File too large``, as ENOSPC would): one error line
    naming the output, the array and the OS error; no traceback, no absl log, no temporary directory."""
    src = tmp_path / "state.safetensors"
    optstate.save(_adam_state(2000), src)
    out = tmp_path / "out"
    done = _run_cli("convert", "--to", "optax", str(src), str(out), file_size_kib=8)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("optstate: error: "), done.stderr
    assert f"{out}: writing the Orbax checkpoint failed at " in done.stderr
    assert "File too large (errno 27)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_a_truncated_orbax_data_file_is_refused_naming_the_array(tmp_path):
    out = tmp_path / "out"
    save_optax_dir(_adam_state(2000), out)
    data = max((out / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(100)
    done = _run_cli("inspect", str(out))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"optstate: error: {out}: "), done.stderr
    assert re.search(r"the data of \S+ is cut short: bytes \d+ to \d+ of a data file needed, 100 there", done.stderr)


def _largest_data_file(out):
    return max((out / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            lambda out: _largest_data_file(out).unlink(),
            r"the data of \S+ is missing or cut short",
        ),
        (lambda out: (out / "manifest.ocdbt").unlink(), r"tree metadata cannot be read: one of _METADATA, manifest"),
    ],
)
def test_a_damaged_orbax_checkpoint_is_refused_naming_what_is_missing(damage, said, tmp_path, capsys):
    out = tmp_path / "out"
    save_optax_dir(_adam_state(2000), out)
    damage(out)
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"optstate: error: {out}: ") and re.search(said, err), err
