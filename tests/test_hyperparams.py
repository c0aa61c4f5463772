"""Hyperparameters on restore: saved ones win by default; kept live ones are reported; slots reset on purpose."""

from __future__ import annotations

import pytest
import torch

import optstate
from optstate.cli import main

from frameworks import TinyNet, torch_train


def _adam_state(**kw):
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), **kw)
    torch_train(model, opt, range(3))
    return model, optstate.from_torch(opt)


def test_saved_hyperparameters_win_by_default():
    model, state = _adam_state(lr=0.01, betas=(0.9, 0.999))
    live = torch.optim.Adam(model.named_parameters(), lr=0.1, betas=(0.5, 0.9))
    optstate.to_torch(state, live)
    assert live.param_groups[0]["lr"] == 0.01 and live.param_groups[0]["betas"] == (0.9, 0.999)


def test_keep_hyperparams_reports_each_difference():
    model, state = _adam_state(lr=0.01, betas=(0.9, 0.999))
    live = torch.optim.Adam(model.named_parameters(), lr=0.1, betas=(0.5, 0.9))
    with pytest.warns(UserWarning) as caught:
        optstate.to_torch(state, live, keep_hyperparams=True)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith("param group 0 keeps the live betas=(0.5, 0.9) (saved (0.9, 0.999)): the stored")
    assert messages[1] == "param group 0 keeps the live lr=0.1 (saved 0.01)"
    assert live.param_groups[0]["lr"] == 0.1
    assert float(live.state_dict()["state"][0]["step"]) == 3


def test_reset_zeroes_a_slot_on_purpose(tmp_path, capsys):
    model = TinyNet()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    torch_train(model, opt, range(3))
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "a.pt")
    assert main(["convert", "--reset", "exp_avg", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 0
    assert "reset exp_avg: back to its initial value on every parameter" in capsys.readouterr().out
    before = opt.state_dict()["state"]
    after = torch.load(tmp_path / "b.pt", weights_only=True)["optimizer"]["state"]
    for i in before:
        assert not after[i]["exp_avg"].any()
        assert torch.equal(after[i]["exp_avg_sq"], before[i]["exp_avg_sq"])
        assert torch.equal(after[i]["step"], before[i]["step"])
    assert main(["convert", "--reset", "momentum_buffer", str(tmp_path / "a.pt"), str(tmp_path / "c.pt")]) == 1
    assert "AdamW has no slot 'momentum_buffer'" in capsys.readouterr().err
