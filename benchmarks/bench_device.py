#!/usr/bin/env python
"""The in-memory migration on one accelerator: ``optstate.to_optax(optstate.from_torch(opt), tx, params)``
with torch CUDA tensors, against the device's own copy bandwidth and the host round trip.

One process, one device shared by torch and JAX (JAX with CUDA: ``pip install "jax[cuda12]"``). It
builds an Adam state of ``--gb`` GB (weights and both moments, float32, Linear layers of 4096 x 4096)
on the device with one real ``opt.step()``, then times, ``--repeats`` times each, median reported:

- ``device copy``      ``torch.clone`` of every tensor: the bandwidth to compare with;
- ``borrow + DLPack``  ``from_torch(opt, model=model, copy=False)`` then ``to_optax``: JAX takes the
                       tensors themselves;
- ``copy + DLPack``    ``from_torch(opt, model=model)`` (the default: a copy made on the device) then
                       ``to_optax``;
- ``borrow + Flax``    the same as ``borrow + DLPack`` with the layout moved to a Flax model
                       (``relayout``: every kernel transposed, by JAX on the device);
- ``host round trip``  ``.cpu().numpy()`` then ``jax.device_put`` for every tensor: what it replaces.

It checks that JAX's arrays hold the tensors' values (and, borrowed, their memory), and prints GB/s
(state bytes / seconds) and the ratio to the device copy (the issue's target: at least 0.5).
``--device cpu --gb 0.2`` runs the same code on the host (a dry run of the script).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np
import torch

import optstate
from optstate.converters.jax.optax import nest
from optstate.converters.layout.targets import relayout

WIDTH = 4096


def build(gb: float, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    layers = max(1, round(gb * 1e9 / 12 / (WIDTH * WIDTH + WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device)
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.nbytes for t in model.state_dict().values())
    nbytes += sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    return model, opt, nbytes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())  # dropped before the next repeat: never two copies at once
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), fn()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=8.0, help="state size in GB (default 8)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for a dry run)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device for torch; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    jax_device = jax.devices()[0]
    if args.device.startswith("cuda") and jax_device.platform != "gpu":
        print(f"JAX has no GPU (its first device is {jax_device}); install jax[cuda12]", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__} on {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}; "
        f"jax {jax.__version__} on {jax_device}"
    )
    model, opt, nbytes = build(args.gb, args.device)
    tensors = [*model.state_dict().values(), *(t for s in opt.state.values() for k, t in s.items() if k != "step")]
    print(f"state: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB")
    params = {name: jax.dlpack.from_dlpack(p.detach()) for name, p in model.named_parameters()}
    params = nest({tuple(n.split(".")): a for n, a in params.items()})
    tx = optstate.optax_transform(optstate.from_torch(opt, model=model, copy=False))

    def migrate(copy: bool):
        return lambda: optstate.to_optax(optstate.from_torch(opt, model=model, copy=copy), tx, params)

    zero = np.float32(0)
    target = {
        name: {"kernel": np.broadcast_to(zero, (WIDTH, WIDTH)), "bias": np.broadcast_to(zero, (WIDTH,))}
        for name, _ in model.named_children()
    }
    flax_tx = optstate.optax_transform(relayout(optstate.from_torch(opt, model=model, copy=False), target=target))
    flax_params = {
        name: {"kernel": jax.numpy.transpose(params[name]["weight"]), "bias": params[name]["bias"]} for name in target
    }

    def migrate_to_flax():
        state = relayout(optstate.from_torch(opt, model=model, copy=False), target=target)
        return optstate.to_optax(state, flax_tx, flax_params)

    rows = {}
    rows["device copy"], _ = timed(lambda: [t.clone() for t in tensors], args.device, args.repeats)
    rows["borrow + DLPack"], borrowed = timed(migrate(False), args.device, args.repeats)
    rows["copy + DLPack"], copied = timed(migrate(True), args.device, args.repeats)
    rows["borrow + Flax"], flax = timed(migrate_to_flax, args.device, args.repeats)
    rows["host round trip"], _ = timed(
        lambda: [jax.device_put(t.cpu().numpy(), jax_device) for t in tensors], args.device, args.repeats
    )

    live = opt.state[model[0].weight]["exp_avg"]
    for opt_state in (borrowed, copied):
        mu = opt_state[0].mu["0"]["weight"]
        assert np.array_equal(np.asarray(mu), live.cpu().numpy()), "JAX's moment differs from torch's"
    assert borrowed[0].mu["0"]["weight"].unsafe_buffer_pointer() == live.data_ptr(), "borrowed, yet copied"
    assert np.array_equal(np.asarray(flax[0].mu["0"]["kernel"]), live.cpu().numpy().T), "Flax moment differs"

    copy_s = rows["device copy"]
    print(f"\n{'path':<18} {'seconds':>9} {'GB/s':>9} {'x device copy':>14}")
    for name, seconds in rows.items():
        print(f"{name:<18} {seconds:>9.4f} {nbytes / 1e9 / seconds:>9.1f} {copy_s / seconds:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
