"""Moving an optimizer state between a torch model's layout and a Flax model's.

- :mod:`.moves`: the records (:class:`~.moves.Move`, :class:`~.moves.Layout`, the editable mapping
  file) and moving a state by a layout and back;
- :mod:`.rules`: which Flax leaf each torch tensor is, chosen by the kind of layer, the modules matched
  by name or, where linen numbered them (``Dense_0``), by order of definition and shape;
- :mod:`.transpose`: the bit-exact, cache-blocked axis permutation the moves use;
- :mod:`.targets`: the target model, read from wherever the user has it, and the entry points.
"""
