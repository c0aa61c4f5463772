"""The JAX side: Optax states and transforms, Orbax checkpoints, Flax models. Every module imports JAX.

- :mod:`.families`: the optimizer table's Optax half: each family's scaler and the Optax state types
  that hold its slots, as real types.
- :mod:`.transforms`: torch-exact Optax transforms, where stock Optax's formula is not torch's.
- :mod:`.optax`: Optax trees and the canonical state, both ways (``optax_transform``, ``to_optax``,
  ``from_optax``); states are found by type and path, never by position.
- :mod:`.orbax`: Orbax checkpoint directories (the ``optax`` format; ``load_optax``, ``load_flax``).
- :mod:`.flax`: Flax NNX models and optimizers; parameter trees from msgpack and Orbax.
- :mod:`.nnx`: the ``nnx`` and ``train-state`` formats' writers: the trees the Flax docs save and restore.
"""
