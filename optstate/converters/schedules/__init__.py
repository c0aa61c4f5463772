"""Learning-rate schedules carried between torch and Optax, exactly.

:mod:`.torch_schedulers` holds the entry points; the modules it gathers, in the order data flows:

- :mod:`.identify`: which torch scheduler class a ``state_dict()`` comes from, and which are refused;
- :mod:`.parse`: the state dict, checked once, as a tree of leaf schedulers;
- :mod:`.replay`: each torch class's ``step()``/``get_lr()``, replayed on Python floats;
- :mod:`.history`: the lrs over the steps, from the scheduler's construction or from its saved state;
- :mod:`.optax_schedule`: those lrs as Optax schedules (torch → Optax);
- :mod:`.restore`: the state a torch scheduler holds after steps taken elsewhere (Optax → torch).

Hugging Face transformers' schedules (``get_linear_schedule_with_warmup`` and the like) are
LambdaLRs: torch saves their function as nothing, so :mod:`.identify` refuses a bare LambdaLR.
:mod:`.transformers` holds transformers' functions and how a Trainer's arguments choose one; its
``attach`` records the function and its arguments in the state dict (the caller, which knows them:
:mod:`optstate.converters.torch.hf_trainer`), and from there the state dict converts as any other:
:mod:`.identify` names it ``LambdaLR[transformers]``, :mod:`.parse` checks the record, and the
:class:`~.replay.LeafReplay` of torch's LambdaLR in :mod:`.replay` steps ``base_lr * f(last_epoch)``
with transformers' ``f``.
"""
