"""A small GPT, written once in torch and once in Flax linen, with the same names where it matters.

The two compute the same function when the Flax parameters are the torch ones moved to Flax's
layout (Linear weights transposed, attention's packed q/k/v split into heads), which is exactly
what ``optstate convert --target-params`` does to the parameters and to every optimizer slot.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

VOCAB_TEXT = (
    "optimizer state is the memory of a training run: momentum, adam moments, the step count. "
    "move a run from one framework to another and that memory is lost unless it is moved too. "
)
CHARS = sorted(set(VOCAB_TEXT))
DIM, HEADS, LAYERS, CONTEXT, BATCH = 32, 4, 2, 24, 16
DTYPE = torch.float64  # float64 in both frameworks, so that any difference is the conversion's, not rounding's


def tokens() -> np.ndarray:
    return np.array([CHARS.index(c) for c in VOCAB_TEXT * 4], dtype=np.int64)


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and next-character targets of training step ``step``, the same in both frameworks."""
    data = tokens()
    starts = np.random.default_rng(step).integers(0, len(data) - CONTEXT - 1, size=BATCH)
    x = np.stack([data[s : s + CONTEXT] for s in starts])
    y = np.stack([data[s + 1 : s + CONTEXT + 1] for s in starts])
    return x, y


# ----------------------------------------------------------------------------- torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(DIM, dtype=DTYPE)
        self.attn = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True, dtype=DTYPE)
        self.ln2 = torch.nn.LayerNorm(DIM, dtype=DTYPE)
        self.fc = torch.nn.Linear(DIM, 4 * DIM, dtype=DTYPE)
        self.proj = torch.nn.Linear(4 * DIM, DIM, dtype=DTYPE)

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TorchGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(len(CHARS), DIM, dtype=DTYPE)
        self.pos = torch.nn.Embedding(CONTEXT, DIM, dtype=DTYPE)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = torch.nn.LayerNorm(DIM, dtype=DTYPE)
        self.head = torch.nn.Linear(DIM, len(CHARS), bias=False, dtype=DTYPE)

    def forward(self, x):
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)  # True: may not attend
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln_f(h))


def torch_optimizer(model: TorchGPT) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW, no weight decay on biases, norms and embeddings (as nanoGPT), with a linear warm-up."""
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and "tok" not in n and "pos" not in n]
    rest = [(n, p) for n, p in model.named_parameters() if (n, p) not in decay]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95)
    )
    return opt, torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=40)


def torch_train(model, opt, scheduler, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = map(torch.from_numpy, batch(step))
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, len(CHARS)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def train_and_checkpoint(path, steps: range = range(15)) -> tuple[TorchGPT, torch.optim.Optimizer, object]:
    """Train from a fixed seed for ``steps`` and ``torch.save`` model, optimizer and scheduler to ``path``
    (how examples/gpt_adamw.pt was made: ``python examples/gpt.py``)."""
    torch.manual_seed(0)
    model = TorchGPT()
    opt, scheduler = torch_optimizer(model)
    torch_train(model, opt, scheduler, steps)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": scheduler.state_dict()}, path
    )
    return model, opt, scheduler


# ----------------------------------------------------------------------------- Flax


class FlaxBlock(fnn.Module):
    @fnn.compact
    def __call__(self, x, mask):
        h = fnn.LayerNorm(epsilon=1e-5, name="ln1")(x)
        x = x + fnn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, mask=mask)
        h = fnn.Dense(4 * DIM, name="fc")(fnn.LayerNorm(epsilon=1e-5, name="ln2")(x))
        return x + fnn.Dense(DIM, name="proj")(fnn.gelu(h, approximate=True))


class FlaxGPT(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        mask = fnn.make_causal_mask(x)  # True: may attend
        h = fnn.Embed(len(CHARS), DIM, name="tok")(x) + fnn.Embed(CONTEXT, DIM, name="pos")(jnp.arange(x.shape[1]))
        for i in range(LAYERS):
            h = FlaxBlock(name=f"blocks_{i}")(h, mask)
        return fnn.Dense(len(CHARS), use_bias=False, name="head")(fnn.LayerNorm(epsilon=1e-5, name="ln_f")(h))


def flax_variables() -> dict:
    """The Flax model's ``init`` output: what ``--target-params examples/gpt.py:flax_variables`` names."""
    x = jnp.zeros((1, CONTEXT), jnp.int32)
    return FlaxGPT().init(jax.random.key(0), x)


@jax.jit
def flax_loss_and_grads(params, x, y):
    def loss(p):
        logits = FlaxGPT().apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.value_and_grad(loss)(params)


def flax_train(tx, params, opt_state, steps: range) -> tuple[list[float], dict]:
    losses = []
    for step in steps:
        loss, grads = flax_loss_and_grads(params, *map(jnp.asarray, batch(step)))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params


if __name__ == "__main__":
    from pathlib import Path

    train_and_checkpoint(Path(__file__).parent / "gpt_adamw.pt")
