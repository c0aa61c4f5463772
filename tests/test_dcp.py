"""DCP directories in and out: the same state as the live optimizer, bit-exact round trips, a restore
with torch's own ``dcp.load`` that continues training exactly, a real 2-process sharded checkpoint,
and refusals of malformed or malicious directories."""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import optstate
from optstate.converters.torch.dcp import read_dcp, read_metadata, write_dcp
from optstate.errors import FormatError, MappingError, OptstateError

from helpers import gradient

LAYOUTS = ("nested", "torchtitan", "optimizer-only", "positional")


def _net(dtype=torch.float64, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def _train(model, opt, steps, scheduler=None) -> None:
    for step in steps:
        for name, p in model.named_parameters():
            g = gradient(step, name, p.detach().double().numpy())
            p.grad = torch.from_numpy(g).to(p.dtype)
        opt.step()
        if scheduler is not None:
            scheduler.step()


MAKERS = {
    "sgd-momentum": lambda m: torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),  # no param_names: DCP names them
    "adamw-groups": lambda m: torch.optim.AdamW(
        [
            {"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},
            {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0, "lr": 0.02},
        ],
        lr=0.01,
    ),
}


def _trained(case, steps=3, dtype=torch.float64, scheduler=False):
    model = _net(dtype)
    opt = MAKERS[case](model)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5) if scheduler else None
    _train(model, opt, range(steps), sched)
    return model, opt, sched


def _options(layout):
    return StateDictOptions(flatten_optimizer_state_dict=layout == "torchtitan")


def _save(directory, model, opt, layout="nested", scheduler=None):
    """What a training job writes: FSDP's documented layout, torchtitan's, the optimizer alone, or the
    plain ``state_dict()``s saved with DCP."""
    osd = get_optimizer_state_dict(model, opt, options=_options(layout))
    sd = {
        "optimizer-only": osd,
        "nested": {"model": get_model_state_dict(model), "optimizer": osd},
        "torchtitan": {**get_model_state_dict(model), "optimizer": osd},
        "positional": {"model": model.state_dict(), "optimizer": opt.state_dict()},
    }[layout]
    if scheduler is not None:
        sd["lr_scheduler"] = scheduler.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=directory, no_dist=True)


def _restore(directory, model, opt, layout="nested"):
    """What a training job does to resume: templates from the live objects, dcp.load, set_*_state_dict."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt, options=_options(layout))
    sd = {**msd, "optimizer": osd} if layout == "torchtitan" else {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=directory, no_dist=True)
    set_model_state_dict(model, {k: sd[k] for k in msd} if layout == "torchtitan" else sd["model"])
    set_optimizer_state_dict(model, opt, sd["optimizer"], options=_options(layout))


def _same_array(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same_state(a, b):
    assert (a.optimizer, a.param_groups, a.params, a.buffers) == (b.optimizer, b.param_groups, b.params, b.buffers)
    assert a.slots.keys() == b.slots.keys()
    assert all(_same_array(a.slots[k], b.slots[k]) for k in a.slots), "slots differ"
    assert (a.weights is None) == (b.weights is None)
    if a.weights is not None:
        assert a.weights.keys() == b.weights.keys() and all(_same_array(a.weights[k], b.weights[k]) for k in a.weights)
    assert dataclasses.replace(a.metadata, source=None) == dataclasses.replace(b.metadata, source=None)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", sorted(MAKERS))
def test_dcp_reads_as_from_torch_of_the_live_optimizer(case, layout, tmp_path):
    model, opt, sched = _trained(case, scheduler=case == "adamw-groups")
    _save(tmp_path / "ckpt", model, opt, layout, sched)
    if (case, layout) == ("adamw-groups", "positional"):  # refused as from_torch refuses the same .pt file
        with pytest.raises(MappingError, match="2 param groups and no param_names"):
            read_dcp(tmp_path / "ckpt")
        return
    expected = optstate.from_torch(opt, model=model, scheduler=sched)
    if layout == "optimizer-only":
        expected = dataclasses.replace(expected, weights=None, buffers=())
    _assert_same_state(read_dcp(tmp_path / "ckpt"), expected)


def _shards(rank, world, directory, store):
    """One rank of a 2-process FSDP2 job (gloo, CPU): train, save sharded, restore our conversion, go on."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def sharded(seed):
        model = _net(seed=seed)
        for layer in (model[0], model[2], model):
            fully_shard(layer)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def train(model, opt, steps):
        for step in steps:
            x = torch.from_numpy(gradient(step, str(rank), np.zeros((4, 3))))
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()

    model, opt = sharded(seed=0)
    train(model, opt, range(3))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=f"{directory}/sharded")
    full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(dict(zip(("model", "optimizer"), full, strict=True)), f"{directory}/full.pt")
        write_dcp(read_dcp(f"{directory}/sharded"), f"{directory}/converted")
    dist.barrier()
    fresh, fresh_opt = sharded(seed=1)
    _restore(f"{directory}/converted", fresh, fresh_opt)
    train(model, opt, range(3, 6))
    train(fresh, fresh_opt, range(3, 6))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local()), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert all(torch.equal(getattr(a[k], "_local_tensor", a[k]), getattr(b[k], "_local_tensor", b[k])) for k in a)
    dist.destroy_process_group()


def test_two_process_fsdp2_checkpoint_is_assembled_and_our_output_restores_sharded(tmp_path):
    # fork, not spawn: the children need no fresh interpreter, and start in well under a second.
    context = mp.start_processes(
        _shards, args=(2, tmp_path, tmp_path / "store"), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process job did not finish in 60 s")
    data_files = sorted(p.name for p in (tmp_path / "sharded").glob("*.distcp"))
    assert data_files == ["__0_0.distcp", "__1_0.distcp"]
    metadata = read_metadata(tmp_path / "sharded")
    fqn = "optimizer.state.0.weight.exp_avg"
    chunks = metadata.state_dict_metadata[fqn].chunks
    files = {info.relative_path for index, info in metadata.storage_data.items() if index.fqn == fqn}
    assert len(chunks) == 2 and len(files) == 2  # one tensor, two chunks, two files

    state = read_dcp(tmp_path / "sharded")
    full = torch.load(tmp_path / "full.pt", weights_only=True)  # torch's own all-gather of the same state
    for info in state.params:
        name = ".".join(info.path)
        saved = full["optimizer"]["state"][name]
        assert info.step == int(saved["step"])
        slots = {state.spec.slot(slot).torch_key: a for (slot, path), a in state.slots.items() if path == info.path}
        assert slots.keys() == saved.keys() - {"step"}
        assert all(_same_array(a, saved[key]) for key, a in slots.items())
        assert _same_array(state.weights[info.path], full["model"][name])


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("layout", ["nested", "torchtitan"])
@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float64) for c in sorted(MAKERS)] + [("adam", torch.bfloat16)],
    ids=[*sorted(MAKERS), "adam-bfloat16"],
)
def test_canonical_to_dcp_to_canonical_is_bit_exact(case, dtype, layout, tmp_path):
    model, opt, sched = _trained(case, dtype=dtype, scheduler=True)
    state = optstate.from_torch(opt, model=model, scheduler=sched)
    write_dcp(state, tmp_path / "out", layout=layout)
    _assert_same_state(read_dcp(tmp_path / "out"), state)


@pytest.mark.parametrize("layout", ["nested", "torchtitan"])
@pytest.mark.parametrize("case", sorted(MAKERS))
def test_training_continues_exactly_after_dcp_canonical_dcp(case, layout, tmp_path):
    model, opt, _ = _trained(case, steps=3)
    _save(tmp_path / "job", model, opt, layout)
    optstate.save(read_dcp(tmp_path / "job"), tmp_path / "state.safetensors")
    write_dcp(optstate.load(tmp_path / "state.safetensors"), tmp_path / "back", layout=layout)

    fresh = _net(seed=1)  # other weights: the restore must bring them
    fresh_opt = MAKERS[case](fresh)
    _restore(tmp_path / "back", fresh, fresh_opt, layout)
    _train(model, opt, range(3, 6))
    _train(fresh, fresh_opt, range(3, 6))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    before, after = opt.state_dict(), fresh_opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, entry in before["state"].items():
        assert all(
            torch.equal(t, after["state"][index][k]) and t.dtype == after["state"][index][k].dtype
            for k, t in entry.items()
        ), index


def test_writing_from_a_memory_mapped_file_copies_no_array(tmp_path):
    """DCP's writer keeps every tensor of a file until the file is done, so tensors copied from the
    state would hold all of it in memory: they view the memory-mapped arrays instead. NumPy reports
    its allocations to tracemalloc; 48 MB of moments must not show up there."""
    import tracemalloc

    rng = np.random.default_rng(0)
    shapes = {f"layer{i}.weight": (1024, 1024) for i in range(6)}
    params = tuple(optstate.ParamInfo(tuple(n.split(".")), s, "float32", 0, 1) for n, s in shapes.items())
    slots = {
        (slot, p.path): np.abs(rng.standard_normal(p.shape, dtype=np.float32))
        for p in params
        for slot in ("first_moment", "second_moment")
    }
    optstate.save(optstate.OptimizerState("adam", ({"lr": 1e-3},), params, slots), tmp_path / "s.safetensors")
    state = optstate.load(tmp_path / "s.safetensors")
    tracemalloc.start()
    try:
        write_dcp(state, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated while writing 48 MiB of memory-mapped arrays"
    back = read_dcp(tmp_path / "out")
    assert back.slots.keys() == slots.keys()
    assert all(np.array_equal(back.slots[k], a) for k, a in slots.items())


def test_lazy_arrays_are_made_one_at_a_time_on_the_way_to_dcp(tmp_path):
    """A layout move back to torch's layout (or a tensor on an accelerator) is an array made when it is
    read; DCP would hold all of them, so they go through a memory-mapped file one at a time."""
    import tracemalloc

    from optstate.schema.state import Deferred

    rng = np.random.default_rng(0)
    params = tuple(optstate.ParamInfo((f"layer{i}", "weight"), (512, 1024), "float32", 0, 1) for i in range(8))
    sources = {
        (slot, p.path): np.abs(rng.standard_normal((1024, 512), dtype=np.float32))
        for p in params
        for slot in ("first_moment", "second_moment")
    }
    slots = {
        k: Deferred((512, 1024), np.dtype(np.float32), lambda a=a: np.ascontiguousarray(a.T))
        for k, a in sources.items()
    }
    state = optstate.OptimizerState("adam", ({"lr": 1e-3},), params, slots)
    out = tmp_path / "staged.safetensors"  # a name the staged file must not take
    tracemalloc.start()
    try:
        write_dcp(state, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated while writing 32 MiB of lazy arrays"
    back = read_dcp(out)
    assert all(np.array_equal(back.slots[k], a.T) for k, a in sources.items())
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the staged file went with the temporary


def test_existing_output_is_replaced_only_with_force(tmp_path):
    model, opt, _ = _trained("sgd-momentum")
    state = optstate.from_torch(opt, model=model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OptstateError, match="exists"):
        write_dcp(state, tmp_path / "out")
    assert (tmp_path / "out" / "keep").exists()
    write_dcp(state, tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left beside it


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def ckpt(tmp_path):
    model, opt, _ = _trained("adam")
    _save(tmp_path / "ckpt", model, opt)
    return tmp_path / "ckpt"


class Boom:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_metadata_that_would_run_code_is_refused_and_not_run(ckpt, tmp_path):
    Boom.marker = tmp_path / "ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(FormatError, match=rf"refused: global {os.system.__module__}\.system is not DCP metadata"):
        read_dcp(ckpt)
    assert not Boom.marker.exists()


def test_value_that_would_run_code_is_refused_and_not_run(tmp_path):
    Boom.marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            {"optimizer": {"param_groups": [{"lr": Boom(), "params": []}]}}, checkpoint_id=tmp_path / "c", no_dist=True
        )
    global_name = rf"{os.system.__module__}\.system"
    with pytest.raises(FormatError, match=rf"optimizer\.param_groups\.0\.lr .*refused: .*{global_name}"):
        read_dcp(tmp_path / "c")
    assert not Boom.marker.exists()


def test_missing_data_file(ckpt):
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(FormatError, match=r"__0_0\.distcp: missing; \.metadata stores"):
        read_dcp(ckpt)


def test_truncated_data_file(ckpt):
    data = ckpt / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(FormatError, match="past the end of the file"):
        read_dcp(ckpt)


def test_corrupted_data_blob(ckpt):
    data = ckpt / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)
    with pytest.raises(FormatError, match=r"not a readable torch.save blob"):
        read_dcp(ckpt)


def _edit_metadata(directory, edit):
    with open(directory / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own test's file: trusted
    edit(metadata)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize(
    "chunks,message",
    [
        ([([0, 0], [5, 3]), ([3, 0], [2, 3])], r"chunks at \[0, 0\] and \[3, 0\] overlap"),
        ([([0, 0], [4, 3])], r"chunks cover 12 of the tensor's 15 elements"),
        ([([0, 0], [6, 3])], r"chunk at \[0, 0\] of shape \[6, 3\] lies outside the tensor's shape \[5, 3\]"),
    ],
)
def test_chunks_must_cover_the_tensor_once(ckpt, chunks, message):
    def edit(metadata):
        metadata.state_dict_metadata["optimizer.state.0.weight.exp_avg"].chunks = [
            ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks
        ]

    _edit_metadata(ckpt, edit)
    with pytest.raises(FormatError, match=rf"optimizer\.state\.0\.weight\.exp_avg: {message}"):
        read_dcp(ckpt)


def test_chunk_whose_bytes_disagree_with_metadata(ckpt):
    def edit(metadata):
        meta = metadata.state_dict_metadata["optimizer.state.0.weight.exp_avg"]
        meta.properties.dtype = torch.float32

    _edit_metadata(ckpt, edit)
    with pytest.raises(
        FormatError,
        match=r"exp_avg chunk at \[0, 0\] holds torch.float64 \[5, 3\], "
        r"\.metadata says torch.float32 \[5, 3\]",
    ):
        read_dcp(ckpt)


def test_data_file_outside_the_directory_is_refused(ckpt):
    def edit(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../__0_0.distcp"

    _edit_metadata(ckpt, edit)
    with pytest.raises(FormatError, match="not a file of the checkpoint directory"):
        read_dcp(ckpt)


@pytest.mark.parametrize("content", [None, b"", b"\x80\x04garbage", pickle.dumps({"not": "metadata"})])
def test_not_a_dcp_directory(tmp_path, content):
    if content is not None:
        (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(FormatError, match=r"not a DCP checkpoint directory|not readable DCP metadata|not DCP Metadata"):
        read_dcp(tmp_path)


def test_model_only_checkpoint_names_what_is_missing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": _net().state_dict()}, checkpoint_id=tmp_path / "c", no_dist=True)
    with pytest.raises(FormatError, match=r"no optimizer state .* top-level keys: \['model'\]"):
        read_dcp(tmp_path / "c")


def test_cli_torch_to_dcp_and_back(tmp_path):
    from optstate.cli import main

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.named_parameters(), lr=1e-2)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    assert main(["convert", "--to", "dcp", str(tmp_path / "c.pt"), str(tmp_path / "dcp")]) == 0
    assert (tmp_path / "dcp" / ".metadata").is_file()
    assert main(["convert", str(tmp_path / "dcp"), str(tmp_path / "back.pt")]) == 0  # DCP told from Orbax by .metadata
    back = torch.load(tmp_path / "back.pt", weights_only=True)["optimizer"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back["state"][0][key], opt.state_dict()["state"][0][key])
