"""Orbax output restored straight onto several devices (8 CPU devices stand in for a multi-host job)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

for _framework in ("torch", "jax", "orbax"):  # the script below runs them in a subprocess
    pytest.importorskip(_framework)

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np, torch
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optstate
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    net = torch.nn.Sequential(torch.nn.Linear(16, 8, dtype=torch.float64), torch.nn.Linear(8, 8, dtype=torch.float64))
    opt = torch.optim.AdamW(net.named_parameters(), lr=1e-2)
    net(torch.ones(3, 16, dtype=torch.float64)).square().sum().backward()
    opt.step()
    out = sys.argv[1]
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, out + ".pt")
    optstate.convert(out + ".pt", out + "/")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    def shard(path, leaf):  # split the first axis where it divides, replicate the rest
        spec = P("data") if leaf.shape and leaf.shape[0] % 8 == 0 else P()
        return NamedSharding(mesh, spec)
    params, opt_state, tx = optstate.load_optax(out, sharding=shard)
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    split = [x for x in leaves if x.ndim and x.shape[0] % 8 == 0]
    assert split and all(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in split)
    expected = opt.state[net[0].weight]["exp_avg"].numpy()
    found = [np.asarray(x) for x in leaves if x.shape == expected.shape and np.array_equal(np.asarray(x), expected)]
    assert found, "exp_avg of 0.weight not restored bit-exactly"
    print("ok", len(split))
""")


def test_restore_with_a_sharding_onto_eight_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
