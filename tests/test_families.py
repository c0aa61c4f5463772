"""The optimizer table's two halves, the schema's (NumPy only) and the Optax one (real types), agree."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
import optax
import pytest

from optstate.converters.jax import transforms
from optstate.converters.jax.families import OPTAX_FAMILIES, OptaxFamily, optax_family
from optstate.converters.jax.optax import group_transform
from optstate.schema.families import OPTIMIZERS

PARAMS = {"w": np.ones((3, 4), np.float32)}  # a matrix: every family takes one (Muon nothing else)


def _state_nodes(tree: Any) -> list[Any]:
    """Every NamedTuple in a state tree, outermost first."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return [tree, *(node for child in tree for node in _state_nodes(child))]
    if isinstance(tree, (tuple, list)):
        return [node for child in tree for node in _state_nodes(child)]
    if isinstance(tree, dict):
        return [node for child in tree.values() for node in _state_nodes(child)]
    return []


def _options(row: OptaxFamily) -> list[str | None]:
    """None (torch's defaults), and each hyperparameter that switches a feature on: off or 0 by default."""
    off = [name for name, default in row.spec.hyperparams.items() if default is False or default == 0]
    return [None, *sorted(set(off) | {k for k in row.custom_transforms if k is not None})]


def _hyperparams(row: OptaxFamily, option: str | None) -> dict[str, Any]:
    """A group's hyperparameters with ``option`` switched on."""
    if option is None or option == "lr":
        return {"lr": 0.1}
    return {"lr": 0.1, option: True if row.spec.hyperparams[option] is False else 0.1}


def _transform(row: OptaxFamily, option: str | None) -> optax.GradientTransformation:
    return group_transform(row.spec, _hyperparams(row, option))


def _called_with_required_only(transform: Any) -> optax.GradientTransformation:
    required = [p for p in inspect.signature(transform).parameters.values() if p.default is inspect.Parameter.empty]
    return transform(*(0.5 for _ in required))


def test_both_tables_cover_the_same_families():
    assert set(OPTAX_FAMILIES) == set(OPTIMIZERS)
    assert all(row.name == name and row.spec is OPTIMIZERS[name] for name, row in OPTAX_FAMILIES.items())
    assert optax_family(OPTIMIZERS["adamw"]) is optax_family("AdamW") is OPTAX_FAMILIES["adamw"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_slot_has_a_real_state_type_with_its_field(name):
    row, spec = OPTAX_FAMILIES[name], OPTIMIZERS[name]
    assert set(row.slot_states) == {slot.name for slot in spec.slots}
    for slot in spec.slots:
        assert row.slot_states[slot.name], slot.name
        for state_type in row.slot_states[slot.name]:
            assert isinstance(state_type, type) and issubclass(state_type, tuple), state_type
            assert slot.optax_field in state_type._fields, (state_type, slot.optax_field)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_type_in_a_row_is_a_real_class(name):
    row = OPTAX_FAMILIES[name]
    for state_type in row.count_states:
        assert isinstance(state_type, type) and any(f == "count" or f.endswith("_count") for f in state_type._fields)
    for stock, exact in row.stock_states.items():
        assert isinstance(stock, type) and isinstance(exact, type) and stock is not exact
        assert stock._fields == exact._fields, "a stock state is read as the torch-exact one, field for field"
        assert stock.__module__.startswith("optax") and exact.__module__ == transforms.__name__
        assert exact in row.state_types()
    for option, transform in row.custom_transforms.items():
        assert option is None or option in row.spec.hyperparams
        assert inspect.isfunction(transform) and transform.__module__ == transforms.__name__
        assert transform.__name__ in transforms.__all__
    assert callable(row.scaler)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_family_runs_through_group_transform(name):
    """For its defaults and each option: the state holds only types the row names (or an LR schedule's count,
    which every family may have), holds every slot torch keeps, and one update runs."""
    row = OPTAX_FAMILIES[name]
    for option in _options(row):
        tx = _transform(row, option)
        state = tx.init(PARAMS)
        nodes = [n for n in _state_nodes(state) if jax.tree_util.tree_leaves(n)]  # EmptyState holds nothing
        known = row.state_types() | {optax.ScaleByScheduleState}
        unknown = sorted({type(n).__name__ for n in nodes if type(n) not in known})
        assert not unknown, (option, unknown)
        held = {slot.name for node in nodes for slot in row.slots_in(node)}
        assert {slot.name for slot in row.spec.active_slots(_hyperparams(row, option))} <= held, option
        updates, _ = tx.update(PARAMS, state, PARAMS)
        assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("name", [name for name, row in OPTAX_FAMILIES.items() if row.custom_transforms])
def test_the_custom_transforms_a_row_names_are_those_its_scaler_uses(name):
    row = OPTAX_FAMILIES[name]
    for option, transform in row.custom_transforms.items():
        made = type(_called_with_required_only(transform).init(PARAMS))
        assert made in {type(n) for n in _state_nodes(_transform(row, option).init(PARAMS))}, (option, made.__name__)


def test_mixed_dtype_defaults_name_hyperparameters_with_none_among_their_defaults():
    for row in OPTAX_FAMILIES.values():
        for hyperparam, index in row.dtype_defaults:
            assert row.spec.hyperparams[hyperparam][index] is None, (row.name, hyperparam)
