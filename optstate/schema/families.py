"""The optimizer table: one row per optimizer family, its framework-neutral half.

Each row names the family's slots (by meaning, with the torch state key and the Optax state field
that hold them), its hyperparameters with torch's defaults, and the hyperparameter values that
have no exact Optax counterpart. Adapters read this table instead of branching on the family.

This module imports NumPy only, so that ``import optstate`` does; the Optax half of each row, which
holds real Optax types and transforms, is ``optstate.converters.jax.families``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import UnsupportedError

# Param-group keys that choose torch's implementation, or that LR schedulers keep there; the
# optimizer's own numerics do not read them.
BOOKKEEPING_KEYS = frozenset(
    {
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_momentum",
        "max_momentum",
    }
)


@dataclass(frozen=True)
class Slot:
    """One per-parameter state array: its canonical name and where each framework keeps it.

    ``torch_key`` is its key in torch's per-parameter state; ``optax_field`` the field of the Optax
    state that holds it (RMSprop's ``square_avg`` is ``nu``, centered or not). Which Optax state
    types those are is the Optax half of the table (``optstate.converters.jax.families``): real
    types, which this module cannot import. ``needs`` names the hyperparameter that must be truthy
    for torch to keep the slot at all.

    >>> Slot("row_variance", "row_var", "v_row", shape="rows").torch_shape((4, 3))
    (4, 1)
    """

    name: str
    torch_key: str
    optax_field: str
    needs: str | None = None
    # "param": the parameter's shape. "scalar": one value per parameter (NAdam's mu_product), one per
    # Optax state. "rows"/"cols": Adafactor's factored statistics, torch's shape keeping a size-1
    # axis (-1 for rows, -2 for columns) that Optax squeezes away.
    shape: str = "param"
    min_ndim: int = 0  # the parameter ranks torch keeps this slot for
    max_ndim: int = 64
    initial: float = 0.0  # its value before the first step ...
    initial_from: str | None = None  # ... or the hyperparameter that gives it

    @property
    def scalar(self) -> bool:
        """Whether the slot is one value per parameter (NAdam's ``mu_product``) rather than an array like it.

        >>> optimizer_spec("nadam").slot("momentum_product").scalar
        True
        """
        return self.shape == "scalar"

    @property
    def optax_axis(self) -> int | None:
        """The size-1 axis Optax leaves out, for factored statistics.

        >>> optimizer_spec("adafactor").slot("column_variance").optax_axis
        -2
        """
        return {"rows": -1, "cols": -2}.get(self.shape)

    def applies(self, param_shape: tuple[int, ...]) -> bool:
        """Whether torch keeps this slot for a parameter of ``param_shape`` (Muon's only for matrices).

        >>> optimizer_spec("muon").slot("momentum").applies((3,))
        False
        """
        return self.min_ndim <= len(param_shape) <= self.max_ndim

    def torch_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The slot's shape in torch (and in the canonical state) for a parameter of ``param_shape``."""
        if self.shape == "scalar":
            return ()
        if self.shape == "rows":
            return (*param_shape[:-1], 1)
        if self.shape == "cols":
            return (*param_shape[:-2], 1, param_shape[-1])
        return tuple(param_shape)


@dataclass(frozen=True)
class Refusal:
    """A hyperparameter value that no exact conversion supports yet."""

    hyperparam: str
    supported: Any
    feature: str


@dataclass(frozen=True)
class OptimizerSpec:
    """The framework-neutral half of one optimizer family's row: what torch keeps and takes.

    The Optax half (the transform, and the state types that hold each slot) is
    ``optstate.converters.jax.families``, one row per family of this table.

    >>> optimizer_spec("rmsprop").active_slots({"centered": True})[1].torch_key
    'grad_avg'
    """

    name: str
    torch_class: str
    hyperparams: Mapping[str, Any]  # torch constructor arguments and their defaults
    slots: tuple[Slot, ...]
    has_step: bool  # torch keeps a per-parameter `step`
    decoupled_weight_decay: bool  # AdamW-style decay (after the scaler) versus L2 on the gradient
    must_give: tuple[str, ...] = ("lr",)  # no default shared by torch and Optax: never assumed
    moment_hyperparams: tuple[str, ...] = ()  # changing these changes what the stored slots mean
    refusals: tuple[Refusal, ...] = ()
    # Values that are exact only once every parameter has its slots: torch's first step differs.
    refusals_before_first_step: tuple[Refusal, ...] = ()
    # optax.inject_hyperparams names -> (torch hyperparameter, index into it or None); a torch name
    # of None pins the Optax value (eps_root has no torch counterpart and must stay 0).
    optax_hyperparams: Mapping[str, tuple[str | None, int | None]] = field(default_factory=lambda: MappingProxyType({}))
    in_torch: bool = True  # False for Optax-native families: canonical file and Optax only
    decay_in_scaler: bool = False  # the scaler applies weight decay itself (LAMB: before its trust ratio)
    lr_in_scaler: bool = False  # the scaler takes its own step size (Adafactor's relative step)
    approximate: str | None = None  # why a move between frameworks is not bit-exact; None when it is
    # What one update reads beyond the element it updates, and so which layout moves (transpose, reshape,
    # split of a packed tensor) and which partitions (ZeRO's flat shards) keep it exact: "elementwise" all;
    # "per_tensor" (a trust ratio over the whole tensor) all moves but a split;
    # "factored" (statistics of the last two axes) a permutation that keeps those axes last;
    # "matrix" (an update that depends on the matrix's orientation) none.
    update_scope: str = "elementwise"

    def check_exact(self, allowed: bool) -> None:
        """Refuse a family whose cross-framework continuation is only approximate, unless ``allowed``.

        >>> optimizer_spec("muon").check_exact(allowed=True)
        """
        if self.approximate and not allowed:
            raise UnsupportedError(
                f"{self.torch_class}: {self.approximate}; pass --allow-approximate "
                "(allow_approximate=True) to convert anyway, recorded in the output"
            )

    def slot(self, name: str) -> Slot:
        """The slot of this family named ``name``.

        >>> optimizer_spec("adam").slot("second_moment").torch_key
        'exp_avg_sq'
        """
        return {s.name: s for s in self.slots}[name]

    def active_slots(self, hyperparams: Mapping[str, Any]) -> tuple[Slot, ...]:
        """The slots torch keeps for a group with these hyperparameters (SGD keeps none without momentum)."""
        hp = self.with_defaults(hyperparams)
        return tuple(s for s in self.slots if s.needs is None or hp[s.needs])

    def injected_value(self, optax_name: str, hyperparams: Mapping[str, Any]) -> Any:
        """The value torch's hyperparameters give an ``inject_hyperparams`` entry; UnsupportedError if none.

        >>> optimizer_spec("adam").injected_value("b2", {"betas": (0.9, 0.95)})
        0.95
        """
        if optax_name not in self.optax_hyperparams:
            raise UnsupportedError(
                f"{self.torch_class} has no counterpart of the injected Optax hyperparameter {optax_name!r}"
            )
        torch_name, index = self.optax_hyperparams[optax_name]
        if torch_name is None:
            return 0.0
        value = self.with_defaults(hyperparams)[torch_name]
        return value if index is None else value[index]

    def with_defaults(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        """Torch's defaults overlaid with ``hyperparams``; extra keys are kept.

        >>> optimizer_spec("sgd").with_defaults({"lr": 0.1})["momentum"]
        0.0
        """
        return {**self.hyperparams, **hyperparams}

    def check_supported(self, hyperparams: Mapping[str, Any], where: str, *, all_stepped: bool = True) -> None:
        """Raise UnsupportedError naming the first feature without an exact counterpart.

        >>> optimizer_spec("sgd").check_supported({"dampening": 0.1}, "g0")
        >>> optimizer_spec("sgd").check_supported({"dampening": 0.1}, "g0", all_stepped=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        optstate.errors.UnsupportedError: g0: SGD(dampening=0.1) uses dampening on a parameter ...
        """
        refusals = self.refusals if all_stepped else self.refusals + self.refusals_before_first_step
        for refusal in refusals:
            value = hyperparams.get(refusal.hyperparam, self.hyperparams.get(refusal.hyperparam))
            if value != refusal.supported:
                raise UnsupportedError(
                    f"{where}: {self.torch_class}({refusal.hyperparam}={value!r}) uses "
                    f"{refusal.feature}, which has no exact conversion yet"
                )


def _table(*specs: OptimizerSpec) -> Mapping[str, OptimizerSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


_ADAM_SLOTS = (
    Slot("first_moment", "exp_avg", "mu"),
    Slot("second_moment", "exp_avg_sq", "nu"),
    Slot("max_second_moment", "max_exp_avg_sq", "nu_max", needs="amsgrad"),
)
_ADAM_HYPERPARAMS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False}
_ADAM_INJECTED = MappingProxyType(
    {
        "learning_rate": ("lr", None),
        "b1": ("betas", 0),
        "b2": ("betas", 1),
        "eps": ("eps", None),
        "eps_root": (None, None),
        "weight_decay": ("weight_decay", None),
    }
)

OPTIMIZERS: Mapping[str, OptimizerSpec] = _table(
    OptimizerSpec(
        name="sgd",
        torch_class="SGD",
        hyperparams=MappingProxyType(
            {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
        ),
        slots=(Slot("momentum", "momentum_buffer", "trace", needs="momentum"),),
        optax_hyperparams=MappingProxyType({"learning_rate": ("lr", None), "momentum": ("momentum", None)}),
        has_step=False,
        decoupled_weight_decay=False,
        moment_hyperparams=("momentum", "dampening"),
        refusals_before_first_step=(
            Refusal(
                "dampening",
                0.0,
                "dampening on a parameter without a momentum buffer (torch's first step "
                "stores the undampened gradient)",
            ),
        ),
    ),
    OptimizerSpec(
        name="adam",
        torch_class="Adam",
        hyperparams=MappingProxyType({**_ADAM_HYPERPARAMS, "weight_decay": 0.0, "decoupled_weight_decay": False}),
        slots=_ADAM_SLOTS,
        has_step=True,
        decoupled_weight_decay=False,
        moment_hyperparams=("betas", "amsgrad"),
        optax_hyperparams=_ADAM_INJECTED,
    ),
    OptimizerSpec(
        name="adamw",
        torch_class="AdamW",
        hyperparams=MappingProxyType({**_ADAM_HYPERPARAMS, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
        slots=_ADAM_SLOTS,
        has_step=True,
        decoupled_weight_decay=True,
        must_give=("lr", "weight_decay"),
        moment_hyperparams=("betas", "amsgrad"),
        optax_hyperparams=_ADAM_INJECTED,
    ),
    OptimizerSpec(
        name="adamax",
        torch_class="Adamax",
        hyperparams=MappingProxyType(
            {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
        ),
        slots=(Slot("first_moment", "exp_avg", "mu"), Slot("infinity_norm", "exp_inf", "nu")),
        has_step=True,
        decoupled_weight_decay=False,
        moment_hyperparams=("betas", "eps"),  # eps enters the stored infinity norm
        optax_hyperparams=_ADAM_INJECTED,
    ),
    OptimizerSpec(
        name="nadam",
        torch_class="NAdam",
        hyperparams=MappingProxyType(
            {
                "lr": 2e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "momentum_decay": 4e-3,
                "decoupled_weight_decay": False,
                "maximize": False,
            }
        ),
        slots=(
            Slot("first_moment", "exp_avg", "mu"),
            Slot("second_moment", "exp_avg_sq", "nu"),
            Slot("momentum_product", "mu_product", "mu_product", shape="scalar", initial=1.0),
        ),
        has_step=True,
        decoupled_weight_decay=False,
        must_give=("lr", "momentum_decay"),
        moment_hyperparams=("betas", "momentum_decay"),
    ),
    OptimizerSpec(
        name="radam",
        torch_class="RAdam",
        hyperparams=MappingProxyType(
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "decoupled_weight_decay": False,
                "maximize": False,
            }
        ),
        slots=(Slot("first_moment", "exp_avg", "mu"), Slot("second_moment", "exp_avg_sq", "nu")),
        has_step=True,
        decoupled_weight_decay=False,
        moment_hyperparams=("betas",),
    ),
    OptimizerSpec(
        name="adafactor",
        torch_class="Adafactor",
        hyperparams=MappingProxyType(
            {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0, "maximize": False}
        ),
        slots=(
            Slot("row_variance", "row_var", "v_row", shape="rows", min_ndim=2),
            Slot("column_variance", "col_var", "v_col", shape="cols", min_ndim=2),
            Slot("second_moment", "variance", "v", max_ndim=1),
        ),
        has_step=True,
        decoupled_weight_decay=True,
        lr_in_scaler=True,
        moment_hyperparams=("beta2_decay", "eps"),
        update_scope="factored",
    ),
    OptimizerSpec(
        name="lion",
        torch_class="Lion",  # Optax's; torch.optim has none
        hyperparams=MappingProxyType({"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 1e-3, "maximize": False}),
        slots=(Slot("first_moment", "exp_avg", "mu"),),
        has_step=True,
        decoupled_weight_decay=True,
        must_give=("lr", "weight_decay"),
        moment_hyperparams=("betas",),
        optax_hyperparams=MappingProxyType(
            {
                "learning_rate": ("lr", None),
                "b1": ("betas", 0),
                "b2": ("betas", 1),
                "weight_decay": ("weight_decay", None),
            }
        ),
        in_torch=False,
    ),
    OptimizerSpec(
        name="lamb",
        torch_class="LAMB",  # Optax's; torch.optim has none
        hyperparams=MappingProxyType(
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "maximize": False}
        ),
        slots=_ADAM_SLOTS[:2],
        has_step=True,
        decoupled_weight_decay=True,
        must_give=("lr",),
        moment_hyperparams=("betas",),
        optax_hyperparams=_ADAM_INJECTED,
        in_torch=False,
        decay_in_scaler=True,
        update_scope="per_tensor",
    ),
    OptimizerSpec(
        name="muon",
        torch_class="Muon",
        hyperparams=MappingProxyType(
            {
                "lr": 1e-3,
                "weight_decay": 0.1,
                "momentum": 0.95,
                "nesterov": True,
                "ns_coefficients": (3.4445, -4.775, 2.0315),
                "eps": 1e-7,
                "ns_steps": 5,
                "adjust_lr_fn": None,
            }
        ),
        slots=(Slot("momentum", "momentum_buffer", "momentum_buffer", min_ndim=2, max_ndim=2),),
        has_step=False,
        decoupled_weight_decay=True,
        must_give=("lr", "weight_decay"),
        moment_hyperparams=("momentum",),
        approximate=(
            "torch's bfloat16 Newton-Schulz is not reproducible bit for bit (bit-identical on small "
            "matrices on CPU; a few bfloat16 ulps, ~3e-3 per step, on 128x256)"
        ),
        update_scope="matrix",
    ),
    OptimizerSpec(
        name="rmsprop",
        torch_class="RMSprop",
        hyperparams=MappingProxyType(
            {
                "lr": 1e-2,
                "alpha": 0.99,
                "eps": 1e-8,
                "weight_decay": 0.0,
                "momentum": 0.0,
                "centered": False,
                "maximize": False,
            }
        ),
        slots=(
            Slot("second_moment", "square_avg", "nu"),
            Slot("first_moment", "grad_avg", "mu", needs="centered"),
            Slot("momentum", "momentum_buffer", "trace", needs="momentum"),
        ),
        has_step=True,  # torch counts it but never reads it; Optax keeps no count
        decoupled_weight_decay=False,
        must_give=("lr", "alpha"),
        moment_hyperparams=("alpha", "centered", "momentum"),
        optax_hyperparams=MappingProxyType(
            {
                "learning_rate": ("lr", None),
                "decay": ("alpha", None),
                "eps": ("eps", None),
                "initial_scale": (None, None),
                "momentum": ("momentum", None),
            }
        ),
    ),
    OptimizerSpec(
        name="adagrad",
        torch_class="Adagrad",
        hyperparams=MappingProxyType(
            {
                "lr": 1e-2,
                "lr_decay": 0.0,
                "weight_decay": 0.0,
                "initial_accumulator_value": 0.0,
                "eps": 1e-10,
                "maximize": False,
            }
        ),
        slots=(Slot("sum_of_squares", "sum", "sum_of_squares", initial_from="initial_accumulator_value"),),
        has_step=True,
        decoupled_weight_decay=False,
        must_give=("lr", "eps"),
        moment_hyperparams=("initial_accumulator_value",),
    ),
    OptimizerSpec(
        name="adadelta",
        torch_class="Adadelta",
        hyperparams=MappingProxyType({"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}),
        slots=(Slot("second_moment", "square_avg", "e_g"), Slot("update_second_moment", "acc_delta", "e_x")),
        has_step=True,  # torch counts it but never reads it; Optax keeps no count
        decoupled_weight_decay=False,
        moment_hyperparams=("rho", "eps"),  # eps enters the stored update moment
        optax_hyperparams=MappingProxyType(
            {
                "learning_rate": ("lr", None),
                "rho": ("rho", None),
                "eps": ("eps", None),
                "weight_decay": ("weight_decay", None),
            }
        ),
    ),
)


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
    """Whether weight decay is decoupled (AdamW-style) for this group.

    >>> is_decoupled(optimizer_spec("adam"), {"decoupled_weight_decay": True})
    True
    """
    return bool(hyperparams.get("decoupled_weight_decay", spec.decoupled_weight_decay))
