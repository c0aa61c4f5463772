"""Writes the bundled example checkpoint: an MLP trained 30 steps in torch with AdamW, no decay on biases."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model import batches, dataset, torch_model

STEPS = 30


def optimizer(model):
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if not n.endswith("bias")], "weight_decay": 0.05},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ],
        lr=3e-2,
        betas=(0.9, 0.99),
    )


def train(model, opt, steps: range) -> list[float]:
    x, y = dataset()
    losses = []
    for step in steps:
        xb, yb = map(torch.from_numpy, batches(step, x, y))
        loss = torch.mean((model(xb) - yb) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "mlp_adamw.pt")
    model = torch_model()
    opt = optimizer(model)
    train(model, opt, range(STEPS))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": STEPS}, out)
    print(f"wrote {out}")
