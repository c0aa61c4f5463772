"""The support matrix, generated from the optimizer table so that it cannot drift from the code.

It reads both halves of each family's row: the schema's (:mod:`optstate.schema.families`: options,
refusals, what is approximate) and the Optax one (:mod:`optstate.converters.jax.families`: the
torch-exact transforms), so making it needs JAX; importing this module does not.

``python -m optstate.support`` prints it; ``docs/support.md`` is its output, and a test checks that
the file is current.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .schema.families import OPTIMIZERS, OptimizerSpec

if TYPE_CHECKING:
    from .converters.jax.families import OptaxFamily

HEADER = (
    "# Support matrix\n\nGenerated from the optimizer table (`optstate/schema/families.py`, and "
    "`optstate/converters/jax/families.py` for Optax) by `python -m optstate.support`; do not edit by hand.\n\n"
    "Exact: continuing after the conversion agrees with staying put to 1e-12 in float64. "
    "tests/test_continuation.py runs every optimizer, and most options, in both directions; the custom "
    "transforms, Optax transforms of `optstate/converters/jax/transforms.py` that reproduce torch's "
    "formula where stock Optax only approximates it, are also tested against torch directly "
    "(tests/test_torch_semantics.py, tests/test_muon.py).\n"
)


def _options(spec: OptimizerSpec) -> Iterator[str]:
    """Hyperparameters that switch a feature on: booleans off by default, and numbers whose default is 0."""
    for name, default in spec.hyperparams.items():
        if default is False or (isinstance(default, (int, float)) and not isinstance(default, bool) and default == 0):
            yield name


def _how(spec: OptimizerSpec, family: OptaxFamily, option: str | None) -> str:
    """How a move is made where nothing refuses it: exactly, with the torch-exact transform if one is used."""
    if spec.approximate:
        return f"approximate, only with `--allow-approximate`: {spec.approximate}"
    custom = family.custom_transforms.get(option) or family.custom_transforms.get(None)
    return f"exact (custom `{custom.__name__}`)" if custom else "exact"


def _status(spec: OptimizerSpec, family: OptaxFamily, option: str | None, to_optax: bool) -> str:
    if not to_optax and not spec.in_torch:
        return "refused: no torch.optim counterpart"
    for refusal in spec.refusals:
        if refusal.hyperparam == option:
            return f"refused: {refusal.feature}"
    if to_optax and any(r.hyperparam == option for r in spec.refusals_before_first_step):
        return "exact once every parameter has its slots"
    return _how(spec, family, option)


def _rows(spec: OptimizerSpec, family: OptaxFamily) -> Iterator[tuple[str, str, str]]:
    """One family's rows: its defaults, each option, then what every family is asked (groups, steps, schedulers)."""

    def qualified(text: str) -> str:
        return _how(spec, family, None) if spec.approximate else text

    yield "defaults", _status(spec, family, None, True), _status(spec, family, None, False)
    for option in _options(spec):
        yield f"`{option}`", _status(spec, family, option, True), _status(spec, family, option, False)
    back = qualified("exact") if spec.in_torch else _status(spec, family, None, False)
    yield "several param groups", qualified("exact (`optax.partition`)"), back
    if spec.has_step:
        yield "parameters at different steps", qualified("exact (one partition per step)"), back
    if spec.in_torch:
        forward = (
            "refused: relative step under a changing lr"
            if spec.lr_in_scaler
            else qualified(
                "exact (`--horizon` unless the lr settles)"
                + ("; assumes one scheduler step per optimizer step" if not spec.has_step else "")
            )
        )
        yield "torch LR scheduler", forward, qualified("exact with `to_torch(..., scheduler=)`")


def support_matrix() -> str:
    """The matrix as Markdown.

    >>> import optax  # the transforms it names are Optax's
    >>> "| Adam | `amsgrad` | exact (custom `scale_by_amsgrad_torch`) |" in support_matrix()
    True
    """
    from .converters.jax.families import optax_family  # JAX is needed here, not to import the module

    lines = [HEADER, "| optimizer | option | torch → Optax | Optax → torch |", "|---|---|---|---|"]
    for spec in OPTIMIZERS.values():
        rows = _rows(spec, optax_family(spec))
        lines.extend(f"| {spec.torch_class} | {option} | {a} | {b} |" for option, a, b in rows)
    lines.append(
        "\nAlso both ways for every optimizer: `optax.inject_hyperparams` states (the injected values "
        "are the torch hyperparameters), `optax.MultiSteps` at accumulation boundaries (refused in "
        "between), frozen parameters (`set_to_zero` partition). Refused by name: any other Optax "
        "state holding numbers, torch's LambdaLR/MultiplicativeLR/ReduceLROnPlateau/CyclicLR, and "
        "torch optimizers not listed (Rprop, ASGD, SparseAdam, LBFGS)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(support_matrix(), end="")
