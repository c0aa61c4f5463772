"""The command line, through main(argv) and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest
import torch

import optstate
from optstate.cli import main

from frameworks import TinyNet, jax_train, torch_params, torch_train
from helpers import TOL, flat, max_abs_diff


@pytest.fixture
def ckpt(tmp_path):
    model = TinyNet(frozen=True)
    opt = torch.optim.SGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    torch_train(model, opt, range(5))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path, model, opt


def test_convert_to_optax_and_continue(ckpt, tmp_path, capsys):
    path, model, opt = ckpt
    assert main(["convert", "--from", "torch", "--to", "optax", str(path), str(tmp_path / "out")]) == 0
    assert "SGD, 3 parameters in 1 group(s), with model weights" in capsys.readouterr().out
    params, opt_state, tx = optstate.load_optax(tmp_path / "out")
    params, _ = jax_train(tx, params, opt_state, range(5, 10))
    torch_train(model, opt, range(5, 10))
    assert max_abs_diff(flat(params), torch_params(model)) < TOL


def test_formats_are_guessed_from_names(ckpt, tmp_path):
    path, _, _ = ckpt
    assert main(["convert", str(path), str(tmp_path / "s.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "s.safetensors"), str(tmp_path / "out") + "/"]) == 0
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "back.pt")]) == 0
    assert torch.load(tmp_path / "back.pt", weights_only=True)["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_plain_orbax_restores_what_convert_writes(ckpt, tmp_path):
    """The output is an ordinary Orbax checkpoint (written without Orbax's copies and compression, which
    cost memory): Orbax's own StandardCheckpointer restores it onto the target
    {"params": params, "opt_state": tx.init(params)}."""
    import orbax.checkpoint as ocp

    path, model, _ = ckpt
    assert main(["convert", "--to", "optax", str(path), str(tmp_path / "out")]) == 0
    params, opt_state, _ = optstate.load_optax(tmp_path / "out")
    target = jax.tree.map(jax.numpy.zeros_like, {"params": params, "opt_state": opt_state})
    restored = ocp.StandardCheckpointer().restore((tmp_path / "out").absolute(), target)
    assert max_abs_diff(flat(restored["params"]), torch_params(model)) == 0
    for ours, orbax in zip(jax.tree.leaves(opt_state), jax.tree.leaves(restored["opt_state"]), strict=True):
        assert (ours == orbax).all()


def test_existing_output_needs_force(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    out = tmp_path / "s.safetensors"
    assert main(["convert", str(path), str(out)]) == 0
    assert main(["convert", str(path), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["convert", "--force", str(path), str(out)]) == 0


def test_optax_input_needs_optimizer_and_hparams(tmp_path, capsys):
    import optax
    import orbax.checkpoint as ocp

    params = {"w": jax.numpy.ones(3)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ck", {"params": params, "opt_state": optax.adam(0.1).init(params)})
    checkpointer.wait_until_finished()
    assert main(["convert", "--from", "optax", "--to", "torch", str(tmp_path / "ck"), str(tmp_path / "o.pt")]) == 1
    assert "pass optimizer=" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                "--from",
                "optax",
                "--to",
                "torch",
                str(tmp_path / "ck"),
                str(tmp_path / "o.pt"),
                "--optimizer",
                "adam",
                "--hparams",
                '{"lr": 0.1}',
            ]
        )
        == 0
    )
    assert torch.load(tmp_path / "o.pt", weights_only=True)["optimizer"]["param_groups"][0]["param_names"] == ["w"]


def test_inspect_reports_what_a_restore_loses(ckpt, tmp_path, capsys):
    path, model, _ = ckpt
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer: SGD, 3 parameters" in out and "momentum_buffer: 3 of 3 parameters" in out
    assert "not tracked by the optimizer (frozen): fc1.bias" in out

    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["inspect", "--json", str(tmp_path / "weights.pt")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["optimizer"] is None and facts["weights"]["tensors"] == 4
    assert "no optimizer state" in facts["notes"][0]

    fresh = torch.optim.Adam(model.named_parameters(), lr=0.1)
    torch.save({"optimizer": fresh.state_dict()}, tmp_path / "fresh.pt")
    assert main(["inspect", "--json", str(tmp_path / "fresh.pt")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["optimizer"] == "Adam" and all(p["keys"] == [] for p in facts["params"])
    assert "never stepped" in " ".join(facts["notes"])


def test_inspect_names_an_unsupported_optimizer(tmp_path, capsys):
    model = TinyNet()
    opt = torch.optim.Rprop(model.named_parameters(), lr=0.01)
    torch_train(model, opt, range(2))
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "r.pt")
    assert main(["inspect", str(tmp_path / "r.pt")]) == 0
    out = capsys.readouterr().out
    assert "optimizer: Rprop" in out and "step_size: 4 of 4" in out
    assert "to Optax: refused: optimizer 'Rprop' is not supported yet" in out


def test_errors_are_one_line_with_exit_1(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(tmp_path / "junk.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("optstate: error: ") and "junk.pt" in err and err.count("\n") == 1


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--from", "keras", "a", "b"])
    assert exc.value.code == 2


def test_real_process(ckpt, tmp_path):
    path, _, _ = ckpt
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "optstate",
            "convert",
            "--from",
            "torch",
            "--to",
            "optstate",
            str(path),
            str(tmp_path / "s.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert optstate.load(tmp_path / "s.safetensors").optimizer == "sgd"
    run = subprocess.run(
        [sys.executable, "-m", "optstate", "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True
    )
    assert run.returncode == 1 and "missing.pt: no such file" in run.stderr and "Traceback" not in run.stderr


def test_sharded_canonical_output_and_back(ckpt, tmp_path):
    path, _, opt = ckpt
    index = tmp_path / "state.safetensors.index.json"
    assert main(["convert", "--quiet", "--no-fsync", "--max-shard-size", "100B", str(path), str(index)]) == 0
    shards = sorted(p.name for p in tmp_path.glob("state-*.safetensors"))
    assert len(shards) > 1 and json.loads(index.read_text())["weight_map"]
    assert main(["convert", str(index), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)["optimizer"]["state"]
    for i, entry in opt.state_dict()["state"].items():
        assert torch.equal(back[i]["momentum_buffer"], entry["momentum_buffer"])


def test_progress_line_on_a_terminal(ckpt, tmp_path):
    import io

    from optstate.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path, _, _ = ckpt
    bars = []

    def progress(state):
        bars.append(Progress(1, 1, stream=Terminal(), delay=0))
        return bars[-1]

    state = optstate.convert(path, tmp_path / "s.safetensors", progress=progress)
    bars[0].close()
    assert "tensors" in bars[0].stream.getvalue()
    assert bars[0].tensors == len(state.slots) + len(state.weights)  # one call per tensor written


def run_optstate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """``python -m optstate ARGS`` as a real process, its output captured (a pipe: no terminal)."""
    return subprocess.run([sys.executable, "-m", "optstate", *args], capture_output=True, text=True, cwd=cwd)


def test_version():
    run = run_optstate("--version")
    assert run.returncode == 0 and run.stdout == f"optstate {optstate.__version__}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command(tmp_path, where):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    args = ["inspect", str(tmp_path / "junk.pt")]
    run = run_optstate(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert run.returncode == 1 and "Traceback" in run.stderr
    assert run.stderr.splitlines()[-1].startswith("optstate: error: ")


@pytest.mark.parametrize("command", ["convert", "verify", "map", "inspect"])
def test_help_shows_examples_as_written(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    examples = out[out.index("\nexamples:\n") + 1 :].splitlines()[1:]
    assert examples and all(line.startswith("  optstate ") for line in examples if line)


def test_a_text_file_named_pt_is_one_line(tmp_path):
    (tmp_path / "x.pt").write_text("hello, not a checkpoint\n" * 20)
    run = run_optstate("inspect", str(tmp_path / "x.pt"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"optstate: error: {tmp_path / 'x.pt'}: ") and "not a zip archive" in run.stderr


def test_a_directory_that_is_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    run = run_optstate("inspect", str(tmp_path / "notes"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr  # no absl WARNING lines from Orbax
    assert run.stderr.startswith("optstate: error: ") and "notes" in run.stderr
    assert "WARNING:absl" in run_optstate("inspect", str(tmp_path / "notes"), "--debug").stderr


def test_advice_on_the_command_line_names_its_flags_not_library_keywords(tmp_path, capsys):
    model = TinyNet(frozen=True)  # fc1.bias frozen: 3 tensors in the optimizer, 4 in the weights
    unnamed = [p for p in model.parameters() if p.requires_grad]
    for name, groups in (
        ("one.pt", [{"params": unnamed}]),
        ("two.pt", [{"params": unnamed[:1]}, {"params": unnamed[1:]}]),
    ):
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        torch_train(model, opt, range(2))
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / name)
    assert main(["convert", str(tmp_path / "one.pt"), str(tmp_path / "one.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "--model module:function" in err and "or pass model=" not in err, err
    assert main(["convert", str(tmp_path / "two.pt"), str(tmp_path / "two.safetensors")]) == 1
    err = capsys.readouterr().err  # --model cannot order two groups: the advice is the Python call, said as such
    assert "in Python: optstate.from_torch(optimizer, model=model)" in err and "with model=\n" not in err, err


def test_a_reader_that_stops_early_gets_no_error_line(ckpt):
    path, _, _ = ckpt  # optstate inspect --json ckpt.pt | head -1: the reader has gone before optstate prints
    process = subprocess.Popen(
        [sys.executable, "-m", "optstate", "inspect", "--json", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1 and stderr == "", stderr
