"""optstate never replaces its input, whatever the flags: not the same path, not through a link, not a
directory around it or inside it. A refused conversion leaves the input's bytes exactly as they were."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import optstate
from optstate.cli import main
from optstate.errors import OptstateError
from optstate.schema import load

from frameworks import TinyNet, torch_train


def digest(path: Path) -> str:
    """A hash of a file, or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(os.fsencode(f.relative_to(path) if path.is_dir() else f.name))
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A training checkpoint holding more than the optimizer: what a lost input would lose."""
    model = TinyNet(frozen=True)
    opt = torch.optim.SGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    torch_train(model, opt, range(3))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7}, path)
    return path


def refused(capsys, *argv: str) -> str:
    """Run ``optstate convert argv``, assert it failed, return its one-line error."""
    assert main(["convert", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("optstate: error: ") and "\n" not in err
    return err


def test_same_torch_path_with_force(ckpt, capsys):
    before = digest(ckpt)
    err = refused(capsys, "--to", "torch", str(ckpt), str(ckpt), "--force")
    assert f"{ckpt} is the input {ckpt}" in err and "even with --force" in err
    assert digest(ckpt) == before
    assert torch.load(ckpt, weights_only=True)["epoch"] == 7


def test_same_canonical_path_with_force(ckpt, tmp_path, capsys):
    canonical = tmp_path / "s.safetensors"
    optstate.convert(ckpt, canonical)
    before = digest(canonical)
    err = refused(capsys, str(canonical), str(canonical), "--force")
    assert str(canonical) in err and "is the input" in err
    assert digest(canonical) == before


def test_sharded_canonical_index_is_the_input(ckpt, tmp_path, capsys):
    optstate.convert(ckpt, tmp_path / "s.safetensors", max_shard_bytes=64)
    index = tmp_path / "s.safetensors.index.json"
    shards = sorted(tmp_path.glob("s-*.safetensors"))
    assert index.is_file() and len(shards) > 1
    before = {p: digest(p) for p in [index, *shards]}
    # Naming the stem: the writer would replace the index and its shards.
    err = refused(capsys, str(index), str(tmp_path / "s.safetensors"), "--max-shard-size", "64", "--force")
    assert f"would replace {index}" in err and "is the input" in err
    # Naming another stem whose old shards are the input's: a hard link among them is caught too.
    os.link(shards[0], tmp_path / "t-00001-of-00009.safetensors")
    err = refused(capsys, str(index), str(tmp_path / "t.safetensors.index.json"), "--force")
    assert "is a hard link to the input" in err and str(shards[0]) in err
    assert {p: digest(p) for p in before} == before


def test_same_optax_directory_with_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    optstate.convert(ckpt, out, dst_format="optax")
    before = digest(out)
    err = refused(capsys, "--to", "optax", str(out), str(out), "--force")
    assert f"{out} is the input {out}" in err
    assert digest(out) == before


def test_output_directory_holding_the_input(ckpt, tmp_path, capsys):
    before = digest(ckpt)
    err = refused(capsys, "--to", "optax", str(ckpt), str(tmp_path), "--force")
    assert f"{tmp_path} is a directory holding the input {ckpt}" in err
    assert digest(ckpt) == before


def test_output_inside_the_input_directory(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    optstate.convert(ckpt, out, dst_format="optax")
    before = digest(out)
    err = refused(capsys, "--from", "optax", str(out), str(out / "inner.safetensors"))
    assert f"{out / 'inner.safetensors'} lies inside the input directory {out}" in err
    assert digest(out) == before


def test_hard_link_to_the_input(ckpt, tmp_path, capsys):
    link = tmp_path / "link.pt"
    os.link(ckpt, link)
    before = digest(ckpt)
    err = refused(capsys, "--to", "torch", str(ckpt), str(link), "--force")
    assert f"{link} is a hard link to the input {ckpt}" in err
    assert digest(ckpt) == before


def test_symlink_to_the_input(ckpt, tmp_path, capsys):
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    before = digest(ckpt)
    err = refused(capsys, "--to", "torch", str(ckpt), str(link), "--force")
    assert f"{link} is the input {ckpt}" in err
    assert digest(ckpt) == before and link.is_symlink()


def test_library_refuses_too(ckpt):
    before = digest(ckpt)
    with pytest.raises(OptstateError, match="is the input"):
        optstate.convert(ckpt, ckpt, dst_format="torch", force=True)
    assert digest(ckpt) == before


@pytest.mark.parametrize("force", [False, True])
def test_dangling_symlink_output(ckpt, tmp_path, capsys, force):
    link = tmp_path / "dangling.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    before = digest(ckpt)
    err = refused(capsys, str(ckpt), str(link), *(["--force"] if force else []))
    assert f"{link} is a symbolic link" in err and "never through a link" in err
    assert not (tmp_path / "nowhere.safetensors").exists() and link.is_symlink()
    assert digest(ckpt) == before


def test_force_over_another_existing_output_still_works(ckpt, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"an old output")
    before = digest(ckpt)
    assert main(["convert", str(ckpt), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(out), "--force"]) == 0
    assert load(out).optimizer == "sgd"
    assert digest(ckpt) == before
