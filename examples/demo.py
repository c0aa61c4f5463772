"""The main job, end to end: a torch checkpoint converted with the CLI and continued in JAX.

Continues the bundled checkpoint (an MLP after 30 AdamW steps in torch) for 30 more steps three ways:
staying in torch, in JAX with the converted optimizer state, and in JAX with fresh optimizer state.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import torch

import optstate

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoint import STEPS, optimizer, train  # noqa: E402
from model import batches, dataset, jax_loss, torch_model  # noqa: E402

jax.config.update("jax_enable_x64", True)
HERE = Path(__file__).parent
CKPT = HERE / "mlp_adamw.pt"
OUT = Path("demo-out")
MORE = range(STEPS, 2 * STEPS)


def cli(*args: str) -> None:
    print(f"$ optstate {shlex.join(args)}")
    subprocess.run([sys.executable, "-m", "optstate", *args], check=True)
    print()


def continue_in_torch() -> tuple[list[float], dict[str, np.ndarray]]:
    ckpt = torch.load(CKPT, weights_only=True)
    model = torch_model()
    model.load_state_dict(ckpt["model"])
    opt = optimizer(model)
    opt.load_state_dict(ckpt["optimizer"])
    losses = train(model, opt, MORE)
    return losses, {n: p.detach().numpy() for n, p in model.named_parameters()}


def continue_in_jax(params, opt_state, tx) -> tuple[list[float], dict]:
    x, y = dataset()
    losses = []
    for step in MORE:
        loss, grads = jax.value_and_grad(jax_loss)(params, *batches(step, x, y))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params


def main() -> None:
    cli("inspect", str(CKPT))
    cli("convert", "--from", "torch", "--to", "optax", "--force", str(CKPT), str(OUT / "optax"))

    torch_losses, torch_params = continue_in_torch()
    params, opt_state, tx = optstate.load_optax(OUT / "optax")
    jax_losses, jax_params = continue_in_jax(params, opt_state, tx)
    fresh_losses, _ = continue_in_jax(params, tx.init(params), tx)

    print(f"{'step':>5} {'torch':>12} {'JAX, converted':>15} {'JAX, fresh state':>17}")
    for i in [*range(4), *range(5, len(MORE), 5)]:
        print(f"{MORE[i]:>5} {torch_losses[i]:>12.6f} {jax_losses[i]:>15.6f} {fresh_losses[i]:>17.6f}")
    diff = max(float(np.max(np.abs(jax_params[layer][leaf] - torch_params[f"{layer}.{leaf}"])))
               for layer in jax_params for leaf in jax_params[layer])
    loss_diff = max(abs(a - b) for a, b in zip(torch_losses, jax_losses))
    print(f"\nafter {len(MORE)} more steps: max |JAX - torch| over parameters {diff:.1e}, over losses {loss_diff:.1e}")
    gap = max(abs(f - t) for f, t in zip(fresh_losses, torch_losses))
    print(f"fresh optimizer state instead: losses off torch's by up to {gap:.3f} (the restart optstate removes)\n")

    cli("convert", "--from", "optax", "--to", "torch", "--force", str(OUT / "optax"), str(OUT / "back.pt"))
    before = torch.load(CKPT, weights_only=True)["optimizer"]["state"]
    after = torch.load(OUT / "back.pt", weights_only=True)["optimizer"]["state"]
    same = all(torch.equal(before[i][k], after[i][k]) for i in before for k in before[i])
    print(f"torch -> Optax -> torch round trip bit-exact: {same}")
    if diff > 1e-10 or not same:
        raise SystemExit("demo FAILED: the conversion did not continue exactly")


if __name__ == "__main__":
    main()
