"""Learning-rate schedules carried between torch and Optax, exactly.

:mod:`.torch_schedulers` holds the entry points; the modules it gathers, in the order data flows:

- :mod:`.identify`: which torch scheduler class a ``state_dict()`` comes from, and which are refused;
- :mod:`.parse`: the state dict, checked once, as a tree of leaf schedulers;
- :mod:`.replay`: each torch class's ``step()``/``get_lr()``, replayed on Python floats;
- :mod:`.history`: the lrs over the steps, from the scheduler's construction or from its saved state;
- :mod:`.optax_schedule`: those lrs as Optax schedules (torch → Optax);
- :mod:`.restore`: the state a torch scheduler holds after steps taken elsewhere (Optax → torch).

Hugging Face transformers' schedules (``get_linear_schedule_with_warmup`` and the like) are
LambdaLRs: torch saves their function as ``None``, so :mod:`.identify` refuses them. Reproducing
them belongs in a module of its own beside these: the caller names the transformers function and
its arguments (the state dict cannot tell them), and that module supplies the
:class:`~.replay.LeafReplay` whose ``get_lr`` computes it as transformers does.
"""
