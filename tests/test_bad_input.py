"""Bad input gets a clear error naming the file and the parameter, and loses nothing."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

import optstate
from optstate.errors import FormatError, MappingError, UnsupportedError

from frameworks import TinyNet, torch_train


def _checkpoint(tmp_path, make=lambda m: torch.optim.Adam(m.named_parameters(), lr=0.01), steps=2, **extra):
    model = TinyNet()
    opt = make(model)
    torch_train(model, opt, range(steps))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path)
    return path, model, opt


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {Boom.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_not_run(tmp_path):
    Boom.marker = tmp_path / "pwned"
    torch.save({"optimizer": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match=r"evil\.pt: refused: loading it would run code.*system"):
        optstate.from_torch(tmp_path / "evil.pt")
    assert not Boom.marker.exists()


@pytest.mark.parametrize("keep", [0, 7, 200])
def test_truncated_torch_file(tmp_path, keep):
    path, _, _ = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(FormatError, match=r"ckpt\.pt: not a readable torch checkpoint"):
        optstate.from_torch(path)


def _canonical(tmp_path):
    path, _, _opt = _checkpoint(tmp_path)
    out = tmp_path / "s.safetensors"
    optstate.convert(path, out, src_format="torch", dst_format="optstate")
    return out


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_truncated_canonical_file(tmp_path, cut):
    out = _canonical(tmp_path)
    out.write_bytes(out.read_bytes()[:cut])
    with pytest.raises(FormatError, match=r"s\.safetensors: (truncated|header length|tensors cover)"):
        optstate.load(out)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def test_unknown_format_version_names_both(tmp_path):
    out = _canonical(tmp_path)

    def bump(header):
        meta = json.loads(header["__metadata__"]["optstate"])
        header["__metadata__"]["optstate"] = json.dumps({**meta, "format_version": 7})

    _rewrite_header(out, bump)
    with pytest.raises(FormatError, match=r"format_version 7 is not supported.*format_version 1"):
        optstate.load(out)


def test_tensor_whose_shape_disagrees_with_its_parameter(tmp_path):
    out = _canonical(tmp_path)

    def reshape(header):
        entry = header["first_moment/fc1/weight"]
        entry["shape"] = [3, 5]

    _rewrite_header(out, reshape)
    with pytest.raises(FormatError, match=r"fc1\.weight: slot 'first_moment' has shape \[3, 5\], expected .*\[5, 3\]"):
        optstate.load(out)


def test_overlapping_offsets(tmp_path):
    out = _canonical(tmp_path)
    _rewrite_header(out, lambda h: h["first_moment/fc1/bias"].update(data_offsets=[0, 40]))
    with pytest.raises(FormatError, match="overlapping or non-contiguous"):
        optstate.load(out)


def test_non_finite_moment_is_named(tmp_path):
    path, model, opt = _checkpoint(tmp_path)
    sd = opt.state_dict()
    sd["state"][2]["exp_avg_sq"][0, 0] = float("nan")
    torch.save({"model": model.state_dict(), "optimizer": sd}, path)
    with pytest.raises(FormatError, match=r"ckpt\.pt: fc2\.weight: slot 'second_moment' holds non-finite"):
        optstate.from_torch(path)


def test_state_shape_disagrees_with_model_weight(tmp_path):
    path, model, opt = _checkpoint(tmp_path)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3, 5, dtype=torch.float64)
    torch.save({"model": model.state_dict(), "optimizer": sd}, path)
    with pytest.raises(
        FormatError, match=r"ckpt\.pt: fc1\.weight: slot 'first_moment' has shape \[3, 5\], expected \[5, 3\]"
    ):
        optstate.from_torch(path)


def test_missing_slot_is_named_when_writing_torch(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    state = optstate.from_torch(path)
    del state.slots[("second_moment", ("fc2", "bias"))]
    with pytest.raises(FormatError, match=r"fc2\.bias: slot\(s\) \['second_moment'\] missing"):
        optstate.to_torch_state_dict(state)


def test_parameter_count_mismatch_without_names(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(list(model.parameters())[:3], lr=0.01)
    torch_train(model, opt, range(1))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(MappingError, match=r"tracks 3 tensors and .*model weights has 4 trainable tensors"):
        optstate.from_torch(tmp_path / "ckpt.pt")


def test_names_are_aligned_with_checkpoint_weights_when_unambiguous(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch_train(model, opt, range(1))
    state = optstate.from_torch({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert [".".join(p.path) for p in state.params] == [n for n, _ in model.named_parameters()]


def test_several_groups_without_names_are_refused(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(
        [{"params": [model.fc1.bias]}, {"params": [model.fc1.weight, model.fc2.weight, model.fc2.bias]}], lr=0.01
    )
    torch_train(model, opt, range(1))
    with pytest.raises(MappingError, match="2 param groups and no param_names"):
        optstate.from_torch({"model": model.state_dict(), "optimizer": opt.state_dict()})


def test_positional_names_warn(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch_train(model, opt, range(1))
    with pytest.warns(UserWarning, match="named by position"):
        state = optstate.from_torch(opt.state_dict())
    assert [p.path for p in state.params] == [("0",), ("1",), ("2",), ("3",)]


@pytest.mark.parametrize(
    "make, feature",
    [
        (lambda m: torch.optim.Rprop(m.parameters(), lr=0.01), "Rprop"),
        (lambda m: torch.optim.ASGD(m.named_parameters(), lr=0.01), "ASGD"),
    ],
)
def test_unsupported_optimizers_are_refused_by_name(tmp_path, make, feature):
    path, _, _ = _checkpoint(tmp_path, make)
    with pytest.raises(UnsupportedError, match=feature):
        optstate.convert(path, tmp_path / "out", src_format="torch", dst_format="optax")
    assert not (tmp_path / "out").exists()


def test_scheduler_that_never_settles_needs_a_horizon_and_is_kept_for_torch(tmp_path):
    model = TinyNet()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    torch_train(model, opt, range(3))
    for _ in range(3):
        sched.step()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()},
        tmp_path / "ckpt.pt",
    )
    with pytest.raises(UnsupportedError, match=r"StepLR: its learning rate never stops changing.*horizon"):
        optstate.convert(tmp_path / "ckpt.pt", tmp_path / "out", src_format="torch", dst_format="optax")
    optstate.convert(tmp_path / "ckpt.pt", tmp_path / "s.safetensors", src_format="torch", dst_format="optstate")
    optstate.convert(tmp_path / "s.safetensors", tmp_path / "b.pt", src_format="optstate", dst_format="torch")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["lr_scheduler"] == sched.state_dict()


def test_scheduler_stepped_per_epoch_is_refused(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4])
    torch_train(model, opt, range(4))
    sched.step()
    state = optstate.from_torch(opt, scheduler=sched)
    with pytest.raises(UnsupportedError, match="stepped 1 times and the optimizer 4"):
        optstate.optax_transform(state)


def test_lambda_scheduler_is_refused_by_name(tmp_path):
    model = TinyNet()
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch)
    torch_train(model, opt, range(2))
    sched.step()
    sched.step()
    with pytest.raises(UnsupportedError, match="LambdaLR"):
        optstate.optax_transform(optstate.from_torch(opt, scheduler=sched))


def test_dampening_without_buffers_is_refused(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9, dampening=0.5)
    state = optstate.from_torch(opt, model=model)  # the canonical file can hold it: torch -> torch is exact
    with pytest.raises(UnsupportedError, match="dampening"):
        optstate.optax_transform(state)


def test_existing_output_is_kept_without_force(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(optstate.OptstateError, match="exists; pass --force"):
        optstate.convert(path, out, src_format="torch", dst_format="optstate")
    assert out.read_bytes() == b"precious"
    optstate.convert(path, out, src_format="torch", dst_format="optstate", force=True)
    assert optstate.load(out).optimizer == "adam"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_failed_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
    path, _, _ = _checkpoint(tmp_path)
    import optstate.schema.fileformat as ff

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ff, "_write_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        optstate.convert(path, tmp_path / "s.safetensors", src_format="torch", dst_format="optstate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_optax_hyperparameters_with_different_defaults_must_be_given(tmp_path):
    import optax

    params = {"w": np.zeros(3)}
    opt_state = optax.adamw(0.1).init(params)
    with pytest.raises(UnsupportedError, match=r"give \['weight_decay'\] explicitly"):
        optstate.from_optax(opt_state, params, optimizer="adamw", hyperparams={"lr": 0.1})
    with pytest.raises(UnsupportedError, match="pass optimizer="):
        optstate.from_optax(opt_state, params, hyperparams={"lr": 0.1})


def test_unknown_optax_state_is_refused_by_type(tmp_path):
    import optax

    params = {"w": np.zeros(3)}
    tx = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=3)
    with pytest.raises(UnsupportedError, match="ApplyIfFiniteState"):
        optstate.from_optax(tx.init(params), params, optimizer="adam", hyperparams={"lr": 0.1})


def test_multisteps_mid_accumulation_is_refused():
    import optax

    params = {"w": np.zeros(3)}
    tx = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
    opt_state = tx.init(params)
    _, opt_state = tx.update({"w": np.ones(3)}, opt_state, params)
    with pytest.raises(UnsupportedError, match="1 micro-steps into an accumulation; convert at a boundary"):
        optstate.from_optax(opt_state, params, optimizer="adam", hyperparams={"lr": 0.1})


def test_stock_rmsprop_momentum_trace_is_refused():
    import optax

    params = {"w": np.zeros(3)}
    opt_state = optax.rmsprop(0.1, eps_in_sqrt=False, momentum=0.9).init(params)
    with pytest.raises(UnsupportedError, match=r"-lr \* torch's momentum_buffer"):
        optstate.from_optax(
            opt_state, params, optimizer="rmsprop", hyperparams={"lr": 0.1, "alpha": 0.9, "momentum": 0.9}
        )
