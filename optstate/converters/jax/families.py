"""The optimizer table, its Optax half: one row per family, holding real Optax types and functions.

The framework-neutral half of each row (torch's state keys, the slots by meaning, hyperparameters
and their defaults, refusals) is :mod:`optstate.schema.families`, which imports NumPy only so that
``import optstate`` does. A row here holds what exists only once optax is imported: the scaler, the
part of the update torch multiplies by the learning rate, and the state types that hold the
family's slots and counts. The Optax adapter reads these rows instead of branching on the family,
so adding a family is one row in each table (a test checks the two cover the same families).

Each scaler is built the way :mod:`optax`'s aliases are, from stock transforms where their formula
is torch's and from the torch-exact ones of :mod:`.transforms` where it is not.

>>> [t.__name__ for t in optax_family("rmsprop").slot_states["second_moment"]]
['ScaleByRmsTorchState', 'ScaleByRStdDevTorchState']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import optax

from ...schema.families import OptimizerSpec, Slot, optimizer_spec
from . import transforms as torch_exact

Hyperparams = Mapping[str, Any]
SlotDtypes = Mapping[str, np.dtype]  # slot name -> the dtype the state stores it in
Scaler = Callable[[Hyperparams, SlotDtypes], optax.GradientTransformation]


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class OptaxFamily:
    """How Optax runs one optimizer family, and which Optax states keep what torch keeps.

    >>> row = optax_family("adam")
    >>> row.spec.torch_class, [t.__name__ for t in row.count_states]
    ('Adam', ['ScaleByAdamState', 'ScaleByAmsgradTorchState'])
    """

    name: str  # the family, as the schema table names it
    # The part of a group's update that torch multiplies by the learning rate, from the group's
    # hyperparameters (torch's defaults filled in) and the dtypes the state keeps its slots in.
    scaler: Scaler
    # Slot name -> the state types whose field ``Slot.optax_field`` holds it: several where options
    # change the transform (Adam's amsgrad, RMSprop's centered).
    slot_states: Mapping[str, tuple[type, ...]]
    count_states: tuple[type, ...] = ()  # state types whose count is torch's per-parameter step
    # Stock Optax state types whose formula differs from torch's, by the torch-exact type with the
    # same fields that they are read as: only with --allow-approximate.
    stock_states: Mapping[type, type] = field(default_factory=_empty)
    # The torch-exact transforms the scaler uses where stock Optax only approximates torch, by the
    # hyperparameter that calls for one (None: always).
    custom_transforms: Mapping[str | None, Callable[..., optax.GradientTransformation]] = field(default_factory=_empty)
    # Hyperparameter entries (name, index) whose None the torch-exact transform resolves from each
    # parameter's dtype, where torch resolves it once from the group's first parameter: a group of
    # mixed dtypes with such a None has no exact counterpart.
    dtype_defaults: tuple[tuple[str, int], ...] = ()

    @property
    def spec(self) -> OptimizerSpec:
        """The family's framework-neutral row.

        >>> optax_family("adagrad").spec.slot("sum_of_squares").torch_key
        'sum'
        """
        return optimizer_spec(self.name)

    def state_types(self) -> frozenset[type]:
        """Every state type that holds one of the family's slots or its step count.

        >>> sorted(t.__name__ for t in optax_family("sgd").state_types())
        ['TraceState']
        """
        return frozenset(t for types in self.slot_states.values() for t in types) | frozenset(self.count_states)

    def slots_in(self, node: Any) -> tuple[Slot, ...]:
        """The family's slots that a state node holds, by the node's type.

        >>> import jax.numpy as jnp
        >>> [s.name for s in optax_family("lion").slots_in(optax.scale_by_lion().init(jnp.zeros(2)))]
        ['first_moment']
        """
        return tuple(s for s in self.spec.slots if type(node) in self.slot_states.get(s.name, ()))

    def counts_step(self, node: Any) -> bool:
        """Whether ``node``'s count is torch's per-parameter step.

        >>> optax_family("sgd").counts_step(optax.ScaleByScheduleState(count=0))
        False
        """
        return type(node) in self.count_states


# ----------------------------------------------------------------------------- scalers


def _sgd(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    if not hp["momentum"]:
        return optax.identity()
    trace = optax.trace(decay=hp["momentum"], nesterov=bool(hp["nesterov"]))
    # torch: buf = momentum * buf + (1 - dampening) * g; Optax's trace has no dampening argument.
    return optax.chain(optax.scale(1.0 - hp["dampening"]), trace) if hp["dampening"] else trace


def _adam(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    if hp["amsgrad"]:
        return torch_exact.scale_by_amsgrad_torch(b1=b1, b2=b2, eps=hp["eps"])
    return optax.scale_by_adam(b1=b1, b2=b2, eps=hp["eps"], eps_root=0.0)


def _adamax(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return optax.scale_by_adamax(b1=b1, b2=b2, eps=hp["eps"])


def _rmsprop(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    scaler = torch_exact.scale_by_rms_torch(alpha=hp["alpha"], eps=hp["eps"], centered=bool(hp["centered"]))
    # torch's buffer is momentum * buf + g / avg, before the lr: trace after the scaler, lr after the trace.
    return optax.chain(scaler, optax.trace(decay=hp["momentum"])) if hp["momentum"] else scaler


def _adagrad(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    scaler = torch_exact.scale_by_rss_torch(initial_accumulator_value=hp["initial_accumulator_value"], eps=hp["eps"])
    # lr / (1 + (step - 1) * lr_decay), with a count of its own: the parameter's step, not the scheduler's.
    return optax.chain(scaler, torch_exact.scale_by_lr_decay_torch(hp["lr_decay"])) if hp["lr_decay"] else scaler


def _adadelta(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    return optax.scale_by_adadelta(rho=hp["rho"], eps=hp["eps"])


def _nadam(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    # torch keeps mu_product in its default dtype (float32 unless set to float64), whatever the params'.
    return torch_exact.scale_by_nadam_torch(
        b1=b1,
        b2=b2,
        eps=hp["eps"],
        momentum_decay=hp["momentum_decay"],
        mu_product_dtype=dtypes.get("momentum_product", np.dtype("float32")),
    )


def _radam(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return torch_exact.scale_by_radam_torch(b1=b1, b2=b2, eps=hp["eps"])


def _adafactor(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    eps1, eps2 = hp["eps"]
    scaler = torch_exact.scale_by_adafactor_torch(beta2_decay=hp["beta2_decay"], eps1=eps1, eps2=eps2, d=hp["d"])
    return optax.chain(scaler, torch_exact.scale_by_relative_step_torch(hp["lr"]))  # min(lr, 1/sqrt(t)) as the lr


def _muon(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    return torch_exact.scale_by_muon_torch(  # bfloat16 Newton-Schulz, as torch
        momentum=hp["momentum"],
        nesterov=hp["nesterov"],
        ns_coefficients=tuple(hp["ns_coefficients"]),
        eps=hp["eps"],
        ns_steps=hp["ns_steps"],
        adjust_lr_fn=hp["adjust_lr_fn"],
    )


def _lamb(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    # optax.lamb: the decay joins the Adam direction before the trust ratio rescales both.
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=hp["eps"], eps_root=0.0),
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.scale_by_trust_ratio(),
    )


def _lion(hp: Hyperparams, dtypes: SlotDtypes) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return optax.scale_by_lion(b1=b1, b2=b2)


# ----------------------------------------------------------------------------- the table


def _table(*rows: OptaxFamily) -> Mapping[str, OptaxFamily]:
    return MappingProxyType({row.name: row for row in rows})


def _held_by(state_type: type, *slots: str) -> Mapping[str, tuple[type, ...]]:
    """``slot_states`` for slots that one state type holds."""
    return MappingProxyType(dict.fromkeys(slots, (state_type,)))


_ADAM_STATES = (optax.ScaleByAdamState, torch_exact.ScaleByAmsgradTorchState)
_ADAM_SLOT_STATES = MappingProxyType(
    {
        "first_moment": _ADAM_STATES,
        "second_moment": _ADAM_STATES,
        "max_second_moment": (torch_exact.ScaleByAmsgradTorchState,),
    }
)
_AMSGRAD: Mapping[str | None, Callable[..., optax.GradientTransformation]] = MappingProxyType(
    {"amsgrad": torch_exact.scale_by_amsgrad_torch}
)
_AMSGRAD_STOCK = MappingProxyType({optax.ScaleByAmsgradState: torch_exact.ScaleByAmsgradTorchState})
_RMS_STATES = (torch_exact.ScaleByRmsTorchState, torch_exact.ScaleByRStdDevTorchState)

OPTAX_FAMILIES: Mapping[str, OptaxFamily] = _table(
    OptaxFamily("sgd", _sgd, _held_by(optax.TraceState, "momentum")),
    OptaxFamily(
        "adam",
        _adam,
        _ADAM_SLOT_STATES,
        count_states=_ADAM_STATES,
        stock_states=_AMSGRAD_STOCK,
        custom_transforms=_AMSGRAD,
    ),
    OptaxFamily(
        "adamw",
        _adam,
        _ADAM_SLOT_STATES,
        count_states=_ADAM_STATES,
        stock_states=_AMSGRAD_STOCK,
        custom_transforms=_AMSGRAD,
    ),
    OptaxFamily(
        "adamax",
        _adamax,
        _held_by(optax.ScaleByAdamState, "first_moment", "infinity_norm"),
        count_states=(optax.ScaleByAdamState,),
    ),
    OptaxFamily(
        "nadam",
        _nadam,
        _held_by(torch_exact.ScaleByNadamTorchState, "first_moment", "second_moment", "momentum_product"),
        count_states=(torch_exact.ScaleByNadamTorchState,),
        custom_transforms=MappingProxyType({None: torch_exact.scale_by_nadam_torch}),
    ),
    OptaxFamily(
        "radam",
        _radam,
        _held_by(torch_exact.ScaleByRAdamTorchState, "first_moment", "second_moment"),
        count_states=(torch_exact.ScaleByRAdamTorchState,),
        stock_states=MappingProxyType({optax.ScaleByAdamState: torch_exact.ScaleByRAdamTorchState}),
        custom_transforms=MappingProxyType({None: torch_exact.scale_by_radam_torch}),
    ),
    OptaxFamily(
        "adafactor",
        _adafactor,
        _held_by(torch_exact.FactoredTorchState, "row_variance", "column_variance", "second_moment"),
        count_states=(torch_exact.FactoredTorchState, torch_exact.ScaleByRelativeStepTorchState),
        stock_states=MappingProxyType({optax.FactoredState: torch_exact.FactoredTorchState}),
        custom_transforms=MappingProxyType(
            {None: torch_exact.scale_by_adafactor_torch, "lr": torch_exact.scale_by_relative_step_torch}
        ),
        dtype_defaults=(("eps", 0),),
    ),  # eps1 = finfo(dtype).eps
    OptaxFamily(
        "lion", _lion, _held_by(optax.ScaleByLionState, "first_moment"), count_states=(optax.ScaleByLionState,)
    ),
    OptaxFamily(
        "lamb",
        _lamb,
        _held_by(optax.ScaleByAdamState, "first_moment", "second_moment"),
        count_states=(optax.ScaleByAdamState,),
    ),
    OptaxFamily(
        "muon",
        _muon,
        _held_by(torch_exact.ScaleByMuonTorchState, "momentum"),
        custom_transforms=MappingProxyType({None: torch_exact.scale_by_muon_torch}),
    ),
    OptaxFamily(
        "rmsprop",
        _rmsprop,
        MappingProxyType(
            {
                "second_moment": _RMS_STATES,
                "first_moment": (torch_exact.ScaleByRStdDevTorchState,),
                "momentum": (optax.TraceState,),
            }
        ),
        stock_states=MappingProxyType(
            {
                optax.ScaleByRmsState: torch_exact.ScaleByRmsTorchState,
                optax.ScaleByRStdDevState: torch_exact.ScaleByRStdDevTorchState,
            }
        ),
        custom_transforms=MappingProxyType({None: torch_exact.scale_by_rms_torch}),
    ),
    OptaxFamily(
        "adagrad",
        _adagrad,
        _held_by(torch_exact.ScaleByRssTorchState, "sum_of_squares"),
        count_states=(torch_exact.ScaleByLrDecayTorchState,),  # absent without lr_decay
        stock_states=MappingProxyType({optax.ScaleByRssState: torch_exact.ScaleByRssTorchState}),
        custom_transforms=MappingProxyType(
            {None: torch_exact.scale_by_rss_torch, "lr_decay": torch_exact.scale_by_lr_decay_torch}
        ),
    ),
    OptaxFamily("adadelta", _adadelta, _held_by(optax.ScaleByAdaDeltaState, "second_moment", "update_second_moment")),
)


def optax_family(family: OptimizerSpec | str) -> OptaxFamily:
    """The Optax row of a family, by its schema row or its name (torch class or lower-case).

    >>> optax_family("AdamW").name
    'adamw'
    """
    name = family.name if isinstance(family, OptimizerSpec) else optimizer_spec(family).name
    return OPTAX_FAMILIES[name]
