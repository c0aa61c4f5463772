"""The optimizer table: one row per optimizer family.

Each row names the family's slots (by meaning, with the torch state key and the Optax state field
that hold them), its hyperparameters with torch's defaults, and the hyperparameter values that
have no exact Optax counterpart. Adapters read this table instead of branching on the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import UnsupportedError


# Param-group keys that choose torch's implementation or record scheduler bookkeeping; no numerics.
BOOKKEEPING_KEYS = frozenset({"foreach", "capturable", "differentiable", "fused", "initial_lr"})


@dataclass(frozen=True)
class Slot:
    """One per-parameter state array: its canonical name and where each framework keeps it."""

    name: str
    torch_key: str
    optax_field: str


@dataclass(frozen=True)
class Refusal:
    """A hyperparameter value that no exact conversion supports yet."""

    hyperparam: str
    supported: Any
    feature: str


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the adapters need to know about one optimizer family."""

    name: str
    torch_class: str
    hyperparams: Mapping[str, Any]  # torch constructor arguments and their defaults
    slots: tuple[Slot, ...]
    optax_state: str  # the Optax NamedTuple type that holds the slots
    has_step: bool  # torch keeps a per-parameter `step`; Optax a `count`
    decoupled_weight_decay: bool  # AdamW-style decay (after the scaler) versus L2 on the gradient
    must_give: tuple[str, ...] = ("lr",)  # no default shared by torch and Optax: never assumed
    slots_need: str | None = None  # hyperparameter that must be non-zero for any slot to exist
    refusals: tuple[Refusal, ...] = ()
    # Values that are exact only once every parameter has its slots: torch's first step differs.
    refusals_before_first_step: tuple[Refusal, ...] = ()

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    def keeps_slots(self, hyperparams: Mapping[str, Any]) -> bool:
        """Whether a group with these hyperparameters keeps per-parameter slots (SGD needs momentum)."""
        return bool(self.slots) and (self.slots_need is None or bool(self.with_defaults(hyperparams)[self.slots_need]))

    def with_defaults(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        """Torch's defaults overlaid with ``hyperparams``; extra keys are kept."""
        return {**self.hyperparams, **hyperparams}

    def check_supported(self, hyperparams: Mapping[str, Any], where: str, *, all_stepped: bool = True) -> None:
        """Raise UnsupportedError naming the first feature without an exact counterpart."""
        refusals = self.refusals if all_stepped else self.refusals + self.refusals_before_first_step
        for refusal in refusals:
            value = hyperparams.get(refusal.hyperparam, self.hyperparams.get(refusal.hyperparam))
            if value != refusal.supported:
                raise UnsupportedError(
                    f"{where}: {self.torch_class}({refusal.hyperparam}={value!r}) uses "
                    f"{refusal.feature}, which has no exact conversion yet"
                )


_ADAM_SLOTS = (
    Slot("first_moment", "exp_avg", "mu"),
    Slot("second_moment", "exp_avg_sq", "nu"),
)
_AMSGRAD = Refusal("amsgrad", False, "AMSGrad (Optax keeps the max of the bias-corrected second moment, torch of the raw one)")

OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        OptimizerSpec(
            name="sgd",
            torch_class="SGD",
            hyperparams=MappingProxyType({"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                                          "nesterov": False, "maximize": False}),
            slots=(Slot("momentum", "momentum_buffer", "trace"),),
            optax_state="TraceState",
            has_step=False,
            decoupled_weight_decay=False,
            slots_need="momentum",
            refusals_before_first_step=(Refusal(
                "dampening", 0.0, "dampening on a parameter without a momentum buffer (torch's first step "
                "stores the undampened gradient)"),),
        ),
        OptimizerSpec(
            name="adam",
            torch_class="Adam",
            hyperparams=MappingProxyType({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                          "amsgrad": False, "maximize": False, "decoupled_weight_decay": False}),
            slots=_ADAM_SLOTS,
            optax_state="ScaleByAdamState",
            has_step=True,
            decoupled_weight_decay=False,
            refusals=(_AMSGRAD,),
        ),
        OptimizerSpec(
            name="adamw",
            torch_class="AdamW",
            hyperparams=MappingProxyType({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                                          "amsgrad": False, "maximize": False, "decoupled_weight_decay": True}),
            slots=_ADAM_SLOTS,
            optax_state="ScaleByAdamState",
            has_step=True,
            decoupled_weight_decay=True,
            must_give=("lr", "weight_decay"),
            refusals=(_AMSGRAD,),
        ),
    )
})


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table row for an optimizer family, by torch class name or lower-case name.

    >>> optimizer_spec("AdamW").slots[0].torch_key
    'exp_avg'
    """
    spec = OPTIMIZERS.get(name.lower())
    if spec is None:
        known = ", ".join(s.torch_class for s in OPTIMIZERS.values())
        raise UnsupportedError(f"optimizer {name!r} is not supported yet (supported: {known})")
    return spec


def is_decoupled(spec: OptimizerSpec, hyperparams: Mapping[str, Any]) -> bool:
    """Whether weight decay is decoupled (AdamW-style) for this group."""
    return spec.decoupled_weight_decay or bool(hyperparams.get("decoupled_weight_decay", False))
