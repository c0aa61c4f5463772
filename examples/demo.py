"""The main job, end to end: a GPT trained in torch, converted with the CLI, continued in Flax.

A small GPT (examples/gpt.py, written once in torch and once in Flax linen) trains in torch with
AdamW, two param groups and a linear warm-up, and is checkpointed the usual way (``torch.save`` of
model, optimizer and scheduler). ``optstate convert --target-params`` moves it to the Flax model's
layout (kernels transposed, attention's packed q/k/v split into heads, moments and all). Training
then continues three ways: staying in torch, in Flax with the converted state, and in Flax with
fresh optimizer state (what a run that moves frameworks gets today). Prints the losses and plots
them to demo-out/gpt_loss.png, and ends with ``optstate verify`` of the checkpoint against its
conversion, which must agree.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gpt import flax_train, torch_train, train_and_checkpoint

import optstate

jax.config.update("jax_enable_x64", True)
OUT = Path("demo-out")
BEFORE, AFTER = range(0, 15), range(15, 75)  # converted mid-warm-up: the schedule must carry over too


def cli(*args: str) -> None:
    print(f"$ optstate {shlex.join(args)}")
    subprocess.run([sys.executable, "-m", "optstate", *args], check=True)
    print()


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ({"lw": 4, "alpha": 0.4}, {"lw": 1.2, "ls": "--"}, {"lw": 1.2})
    for (label, losses), style in zip(curves.items(), styles, strict=True):
        ax.plot(list(AFTER), losses, label=label, **style)
    ax.set_xlabel("training step (converted at step 15)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("A GPT moved from torch to Flax mid-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    ckpt = OUT / "gpt.pt"
    model, opt, scheduler = train_and_checkpoint(ckpt, BEFORE)
    torch_losses = torch_train(model, opt, scheduler, AFTER)

    cli(
        "convert",
        "--from",
        "torch",
        "--to",
        "optax",
        "--force",
        str(ckpt),
        str(OUT / "gpt-flax"),
        "--target-params",
        "examples.gpt:flax_variables",
    )
    params, opt_state, tx = optstate.load_optax(OUT / "gpt-flax")
    flax_losses, flax_params = flax_train(tx, params, opt_state, AFTER)
    fresh_losses, _ = flax_train(tx, params, tx.init(params), AFTER)

    print(f"{'step':>5} {'torch':>10} {'Flax, converted':>16} {'Flax, fresh state':>18}")
    for i in [*range(4), *range(6, len(AFTER), 8)]:
        print(f"{AFTER[i]:>5} {torch_losses[i]:>10.6f} {flax_losses[i]:>16.6f} {fresh_losses[i]:>18.6f}")
    kernel = np.asarray(flax_params["blocks_1"]["fc"]["kernel"])
    param_diff = float(np.max(np.abs(kernel - model.blocks[1].fc.weight.detach().numpy().T)))
    loss_diff = max(abs(a - b) for a, b in zip(torch_losses, flax_losses, strict=True))
    gap = max(abs(f - t) for f, t in zip(fresh_losses, torch_losses, strict=True))
    print(
        f"\nafter {len(AFTER)} more steps: max |Flax - torch| over losses {loss_diff:.1e}, "
        f"over blocks_1/fc/kernel {param_diff:.1e}"
    )
    print(f"fresh optimizer state instead: losses off torch's by up to {gap:.3f} (the restart optstate removes)")
    plot(
        {
            "torch (stays)": torch_losses,
            "Flax, converted state": flax_losses,
            "Flax, fresh optimizer state": fresh_losses,
        },
        OUT / "gpt_loss.png",
    )
    print(f"plot: {OUT / 'gpt_loss.png'}")
    if loss_diff > 1e-10 or param_diff > 1e-10:
        raise SystemExit("demo FAILED: the conversion did not continue exactly")
    print()
    # The tool's own proof, for any checkpoint: both sides run a few steps of the same gradients and every
    # parameter and moment is compared (in torch's layout); exit status 1, and the demo fails, if any differs.
    cli("verify", "--quiet", str(ckpt), str(OUT / "gpt-flax"))


if __name__ == "__main__":
    main()
