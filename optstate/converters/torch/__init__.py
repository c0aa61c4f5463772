"""The torch side: what torch and the trainers built on it write, read and written without importing torch
where the bytes allow it.

- :mod:`.state_dict`: an optimizer ``state_dict`` (or a training checkpoint holding one) and the canonical
  state, both ways; the ``torch`` format's reader and writer. NumPy only.
- :mod:`.ptfile`: ``torch.save``'s zip format, read by a restricted pickle interpreter that runs nothing
  from the file, and written one tensor at a time. NumPy only.
- :mod:`.hf_trainer`, :mod:`.accelerate`, :mod:`.deepspeed`: the trainers' checkpoint directories. NumPy
  only (a model named with ``--model`` is built by :mod:`.models`, with torch).
- :mod:`.live`: live torch objects (``from_torch``, ``to_torch``), tensors to arrays and back. Imports torch.
- :mod:`.dcp`: ``torch.distributed.checkpoint`` directories. Imports torch.
- :mod:`.models`: the torch model that names a checkpoint's parameters (``--model``). Imports torch.
"""
