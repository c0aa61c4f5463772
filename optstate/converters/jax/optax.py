"""Optax adapter: the ``GradientTransformation`` that continues a state, and its state trees.

Optax states are found by type and by path in the tree, never by position in a chain: the Optax
half of the optimizer table (:mod:`.families`) names the NamedTuple types holding each family's
slots (``ScaleByAdamState``, ``TraceState``), and the schema half the field holding each slot.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

try:  # inject_hyperparams' per-schedule state; optax keeps it in a private module
    from optax.schedules._inject import WrappedScheduleState
except ImportError:  # pragma: no cover - a later optax moved it: such states are then refused by type

    class WrappedScheduleState(NamedTuple):  # type: ignore[no-redef]
        count: Any


from ...errors import FormatError, MappingError, UnsupportedError
from ...schema.families import BOOKKEEPING_KEYS, OPTIMIZERS, OptimizerSpec, Slot, is_decoupled, optimizer_spec
from ...schema.state import Deferred, Metadata, OptimizerState, ParamInfo, ParamPath, numpy_dtype, path_to_name
from ..schedules.identify import attached_scheduler
from ..schedules.torch_schedulers import last_epoch, optax_schedules
from .families import OptaxFamily, optax_family

FROZEN = "frozen"
_CONTAINERS = (optax.MaskedState, optax.PartitionState)
_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# States that wrap other states and keep counters or hyperparameters of their own.
_WRAPPERS = (*_INJECT, optax.MultiStepsState, WrappedScheduleState)
_WRAPPED_FIELDS = ("inner_state", "inner_opt_state", "hyperparams_states")


# ----------------------------------------------------------------------------- transforms


def group_transform(
    spec: OptimizerSpec,
    hyperparams: Mapping[str, Any],
    dtypes: Mapping[str, np.dtype] | None = None,
    schedule: Callable | None = None,
) -> optax.GradientTransformation:
    """The Optax chain that does what torch does for one param group (``schedule``: its LR schedule).

    >>> from optstate.schema import optimizer_spec
    >>> tx = group_transform(optimizer_spec("adamw"), {"lr": 1e-3, "weight_decay": 0.1})
    >>> type(tx).__name__
    'GradientTransformationExtraArgs'
    """
    hp = spec.with_defaults(hyperparams)
    decay = 0.0 if spec.decay_in_scaler else hp["weight_decay"]
    decoupled = is_decoupled(spec, hp)
    parts = []
    if hp.get("maximize"):
        parts.append(optax.scale(-1.0))  # torch negates the gradient before adding L2 decay
    if decay and not decoupled:
        parts.append(optax.add_decayed_weights(decay))
    parts.append(optax_family(spec).scaler(hp, dtypes or {}))
    if spec.lr_in_scaler:  # the scaler took its own (negative) step; torch decays weights by lr * wd
        return optax.chain(*parts, *([optax.add_decayed_weights(-hp["lr"] * decay)] if decay else []))
    if decay and decoupled:
        parts.append(optax.add_decayed_weights(decay))
    parts.append(optax.scale_by_learning_rate(hp["lr"] if schedule is None else schedule))
    return optax.chain(*parts)


def key_path_to_path(key_path: Sequence[Any]) -> ParamPath:
    """A JAX key path (dict keys, sequence indices, attributes) as an optstate path.

    >>> key_path_to_path(jax.tree_util.tree_flatten_with_path({"layers": [{"w": 0}]})[0][0][0])
    ('layers', '0', 'w')
    """
    parts = []
    for key in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def param_labels(state: OptimizerState) -> dict[ParamPath, str]:
    """The ``optax.partition`` label of every parameter: its group, split by step where steps differ.

    torch skips a parameter whose gradient is ``None``, so parameters of one group can have taken
    different numbers of steps; Optax keeps one count per transform, so each step gets its own.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> params = (ParamInfo(("a",), (2,), "float32", 0, 3), ParamInfo(("b",), (2,), "float32", 0, 5))
    >>> param_labels(OptimizerState("adam", ({"lr": 1e-3},), params, {}))
    {('a',): 'group_0_step_3', ('b',): 'group_0_step_5'}
    """
    labels = {}
    for gi in range(len(state.param_groups)):
        members = state.group_params(gi)
        steps = {p.step or 0 for p in members} if state.spec.has_step else {0}
        for p in members:
            labels[p.path] = f"group_{gi}_step_{p.step or 0}" if len(steps) > 1 else f"group_{gi}"
    labels.update(dict.fromkeys(state.frozen_paths(), FROZEN))
    return labels


def _labels(labels: Mapping[ParamPath, str], params: Any) -> Any:
    def label(key_path, _):
        # An nnx.Optimizer labels an nnx.State: each array is its Variable's attribute `value`.
        if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
            key_path = key_path[:-1]
        path = key_path_to_path(key_path)
        if path not in labels:
            raise MappingError(f"{path_to_name(path)}: a parameter the optimizer state knows nothing of")
        return labels[path]

    return jax.tree_util.tree_map_with_path(label, params)


def _refuse_unsupported(state: OptimizerState) -> None:
    state.spec.check_exact(state.metadata.approximate is not None)
    family = optax_family(state.spec)
    for gi, hp in enumerate(state.param_groups):
        members = state.group_params(gi)
        _refuse_mixed_dtype_defaults(family, hp, {p.dtype for p in members}, gi)
        stepped = all(state.has_state(p.path) for p in members) or not state.spec.active_slots(hp)
        state.spec.check_supported(hp, f"param group {gi}", all_stepped=stepped)


def _refuse_mixed_dtype_defaults(
    family: OptaxFamily, hyperparams: Mapping[str, Any], dtypes: set[str], gi: int
) -> None:
    """Refuse a default that torch takes from the group's first parameter's dtype, for all of them (Adafactor's
    ``eps[0]=None``), in a group of several dtypes: the torch-exact transform takes each parameter's own."""
    if len(dtypes) < 2:
        return
    spec = family.spec
    hp = spec.with_defaults(hyperparams)
    for name, index in family.dtype_defaults:
        if hp[name][index] is None:
            shown = ", ".join("None" if i == index else "..." for i in range(len(hp[name])))
            raise UnsupportedError(
                f"param group {gi}: {spec.torch_class}({name}=({shown})) over parameters of "
                f"dtypes {sorted(dtypes)}; give {name}[{index}] explicitly"
            )


def _refuse_unknown_schedule(state: OptimizerState) -> None:
    """Refuse a state whose param groups show an LR scheduler drove them, when the scheduler's state did not
    come with it: the lr the run would take next is the scheduler's, and continuing at the groups' ``lr``
    would be a different run. The user may say that the lr stays put (``constant_lr``)."""
    attached = attached_scheduler(state.param_groups)
    if attached is not None and not state.metadata.constant_lr:
        raise UnsupportedError(
            f"{attached}: an LR scheduler was attached, and its state is not in this checkpoint, so the "
            "learning rate it sets next is unknown; convert from the checkpoint that holds the scheduler (or "
            "pass the live one: from_torch(..., scheduler=)), or, if the lr stays at its current value, say "
            "so: --constant-lr (state.with_metadata(constant_lr=True) in a script)"
        )


def _schedules(state: OptimizerState, horizon: int | None) -> Sequence[Callable[[Any], Any]] | None:
    """The torch LR scheduler's exact per-group schedules, when the state carries one."""
    sd = state.metadata.lr_scheduler
    if sd is None:
        _refuse_unknown_schedule(state)
        return None

    scheduled = last_epoch(sd)
    steps = {p.step for p in state.params if p.step is not None}
    if state.spec.has_step and steps and scheduled != max(steps):
        raise UnsupportedError(
            f"the LR scheduler has stepped {scheduled} times and the optimizer {max(steps)}: "
            "optstate maps schedulers stepped once per optimizer step"
        )
    if not state.spec.has_step:
        warnings.warn(
            f"{state.spec.torch_class} keeps no step count: assuming the LR scheduler stepped once per optimizer step",
            stacklevel=3,
        )
    if state.spec.lr_in_scaler:
        raise UnsupportedError(
            f"{state.spec.torch_class} with an LR scheduler: its relative step "
            "min(lr, 1/sqrt(t)) under a changing lr has no exact mapping yet"
        )
    horizon = horizon if horizon is not None else state.metadata.lr_horizon
    return optax_schedules(sd, horizon=horizon, param_groups=state.param_groups)


def optax_transform(state: OptimizerState, *, horizon: int | None = None) -> optax.GradientTransformation:
    """The Optax ``GradientTransformation`` that continues ``state`` exactly.

    One chain per torch param group; several groups, parameters at different steps, or frozen
    model parameters become an ``optax.partition`` with labels ``group_0``, ``group_1``, ...
    (``group_0_step_7``, ... where a group's steps differ) and ``frozen``. A torch LR scheduler
    in the state becomes each group's exact schedule; one whose lr never settles (cosine, step,
    exponential) needs ``horizon``, the largest step count training will reach.

    >>> import numpy as np, optstate
    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float32", 0),), {})
    >>> tx = optstate.optax_transform(s)
    >>> type(tx.init({"w": np.zeros(2, np.float32)})[0]).__name__
    'TraceState'
    """
    _refuse_unsupported(state)
    labels = param_labels(state)
    group_of = {labels[p.path]: p.group for p in state.params}
    dtypes: dict[int, dict[str, np.dtype]] = {g: {} for g in range(len(state.param_groups))}
    for (slot, path), array in state.slots.items():
        dtypes[state.param(path).group][slot] = array.dtype
    schedules = _schedules(state, horizon)
    transforms = {
        label: group_transform(
            state.spec, state.param_groups[g], dtypes[g], None if schedules is None else schedules[g]
        )
        for label, g in group_of.items()
    }
    if set(labels.values()) == {"group_0"}:
        return transforms["group_0"]
    if FROZEN in labels.values():
        transforms[FROZEN] = optax.set_to_zero()
    return optax.partition(transforms, partial(_labels, labels))


# ----------------------------------------------------------------------------- walking state trees


def _map_states(
    tree: Any, state_types: tuple[type, ...], visit: Callable[[Any, ParamPath], Any], path: ParamPath = ()
) -> Any:
    """Rebuild ``tree`` with every node of ``state_types`` replaced by ``visit(node, path)``.

    Chains (tuples), partitions and masks are walked; stateless nodes are kept; any other node
    that holds arrays is refused by name, since it is state this conversion would lose.
    """
    if isinstance(tree, state_types):
        return visit(tree, path)
    if isinstance(tree, _WRAPPERS):  # not asked for: walk what it wraps, keep its own counters
        return tree._replace(
            **{
                f: _map_states(getattr(tree, f), state_types, visit, path + (f,))
                for f in _WRAPPED_FIELDS
                if f in tree._fields
            }
        )
    if isinstance(tree, _CONTAINERS):
        return type(tree)(*(_map_states(getattr(tree, f), state_types, visit, path + (f,)) for f in tree._fields))
    if (isinstance(tree, tuple) and not hasattr(tree, "_fields")) or isinstance(tree, list):
        return type(tree)(_map_states(c, state_types, visit, path + (str(i),)) for i, c in enumerate(tree))
    if isinstance(tree, dict):
        return {k: _map_states(v, state_types, visit, path + (str(k),)) for k, v in tree.items()}
    if not jax.tree_util.tree_leaves(tree):
        return tree  # EmptyState, MaskedNode, None: nothing to carry
    names = ", ".join(t.__name__ for t in state_types)
    raise UnsupportedError(
        f"Optax state at {'/'.join(path) or '<root>'} is a {type(tree).__name__}, which optstate cannot carry "
        f"over for this optimizer (it carries {names} and their chains, masks and partitions)"
    )


def _state_types(family: OptaxFamily) -> tuple[type, ...]:
    # An LR schedule's count, inject_hyperparams and MultiSteps travel with every family. Sorted by
    # name, so that a message listing them reads the same every time.
    found = sorted(family.state_types() | {optax.ScaleByScheduleState}, key=lambda cls: cls.__name__)
    return (*found, *_WRAPPERS)


def _typed(
    raw: Any, state_types: tuple[type, ...], choose: Callable[[list[type], ParamPath], type], path: ParamPath = ()
) -> Any:
    """A state tree restored by Orbax without a target (NamedTuples as dicts, tuples as lists), retyped;
    ``choose`` picks among the types whose fields a dict has, when more than one does."""
    if isinstance(raw, list):
        return tuple(_typed(c, state_types, choose, path + (str(i),)) for i, c in enumerate(raw))
    if not isinstance(raw, dict):
        return raw
    matches = [cls for cls in (*state_types, *_CONTAINERS) if set(raw) == set(cls._fields)]
    if not matches:
        return {k: _typed(v, state_types, choose, path + (str(k),)) for k, v in raw.items()}
    cls = matches[0] if len(matches) == 1 else choose(matches, path)
    if cls in _CONTAINERS or cls in _WRAPPERS:
        return cls(**{k: _typed(v, state_types, choose, path + (k,)) for k, v in raw.items()})
    return cls(**raw)  # slot trees stay as restored: their None leaves are masked parameters


def recorded_types(tree: Any, path: ParamPath = ()) -> dict[str, str]:
    """``{path: NamedTuple type name}`` of a state tree: what Orbax forgets, for ``optstate.json``.

    >>> recorded_types((optax.ScaleByAdamState(0, {"w": 1}, {"w": 1}), optax.EmptyState()))
    {'0': 'ScaleByAdamState'}
    """
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        found = {"/".join(path): type(tree).__name__} if tree._fields else {}
        for field in tree._fields:
            found.update(recorded_types(getattr(tree, field), path + (field,)))
        return found
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, child in children for k, v in recorded_types(child, path + (str(key),)).items()}


def _slot_leaves(node: Any, family: OptaxFamily) -> dict[str, dict[ParamPath, Any]]:
    """``{slot name: {param path: leaf}}`` of one state node; masked parameters have no leaf."""
    out = {}
    for slot in family.slots_in(node):
        if not slot.scalar:
            leaves = jax.tree_util.tree_flatten_with_path(getattr(node, slot.optax_field))[0]
            out[slot.name] = {key_path_to_path(kp): leaf for kp, leaf in leaves}
    return out


def _partition_prefix(path: ParamPath) -> ParamPath:
    """The part of a state path that names its partition label (empty outside partitions)."""
    positions = [i for i, key in enumerate(path[:-1]) if key == "inner_states"]
    return path[: positions[-1] + 2] if positions else ()


def _count_field(node: Any) -> str | None:
    """The field that counts steps: ``count``, or ``*_count`` in optstate's counter-only states."""
    return next((f for f in node._fields if f == "count" or f.endswith("_count")), None)


# ----------------------------------------------------------------------------- canonical -> Optax


def fill_state(state: OptimizerState, template: Any, as_array: Callable[[np.ndarray], Any]) -> Any:
    """``template`` (``tx.init(params)`` or its ``jax.eval_shape``) with every slot and count set from ``state``.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> s = OptimizerState("sgd", ({"lr": 0.1, "momentum": 0.9},), (ParamInfo(("w",), (2,), "float32", 0),),
    ...                    {("momentum", ("w",)): np.ones(2, np.float32)})
    >>> fill_state(s, optax_transform(s).init({"w": np.zeros(2, np.float32)}), np.asarray)[0].trace["w"].tolist()
    [1.0, 1.0]
    """
    family = optax_family(state.spec)
    types = _state_types(family)
    filling = _Filling(
        state,
        family,
        types,
        as_array,
        _partitions(template, family, types),
        {p.path: p for p in state.params},
        param_labels(state),
    )
    filled = _map_states(template, types, filling.visit)
    filling.check_complete()
    return filled


@dataclass(frozen=True)
class _Filling:
    """One :func:`fill_state`: the state it reads, where its parameters are, and the slots filled so far."""

    state: OptimizerState
    family: OptaxFamily
    types: tuple[type, ...]  # the state types to fill: see _state_types
    as_array: Callable[[np.ndarray], Any]
    partitions: Mapping[ParamPath, set[ParamPath]]  # partition prefix -> the parameters whose slots it holds
    by_path: Mapping[ParamPath, ParamInfo]
    labels: Mapping[ParamPath, str]  # param_labels(state)
    filled: set[tuple[str, ParamPath]] = field(default_factory=set)

    def visit(self, node: Any, where: ParamPath) -> Any:
        """``node`` with its slots and count taken from the state: the visitor of :func:`_map_states`."""
        if isinstance(node, _WRAPPERS):
            return self.wrapper(node, where)
        fields = {slot.optax_field: self.slot_field(slot, node, where) for slot in self.family.slots_in(node)}
        name = _count_field(node)
        if name is not None and (self.family.counts_step(node) or isinstance(node, optax.ScaleByScheduleState)):
            fields[name] = self.as_array(_count(self.step_of(node, where), getattr(node, name)))
        return node._replace(**fields)

    def slot_field(self, slot: Slot, node: Any, where: ParamPath) -> Any:
        """``node``'s field for ``slot``: a tree of one array per parameter, or one scalar for all of them."""
        leaves = getattr(node, slot.optax_field)
        if slot.scalar:
            return self.scalar_value(slot.name, node, where, leaves)
        return jax.tree_util.tree_map_with_path(
            lambda kp, leaf: self.slot_value(slot, key_path_to_path(kp), leaf), leaves
        )

    def slot_value(self, slot: Slot, path: ParamPath, leaf: Any) -> Any:
        """The state's ``slot`` of the parameter at ``path``, shaped as Optax keeps it, for the template's ``leaf``."""
        info = self.by_path.get(path)
        if info is None:
            raise MappingError(
                f"{path_to_name(path)}: the Optax state has a {slot.name} slot for a parameter the "
                "torch optimizer does not track (frozen?); leave it out of this transform, e.g. "
                "with optstate.optax_transform on a state that holds the model weights, which "
                "labels frozen parameters 'frozen'"
            )
        if not slot.applies(info.shape):
            return self.as_array(np.zeros(leaf.shape, leaf.dtype))  # Optax's placeholder where torch keeps no such slot
        array = self.state.slots.get((slot.name, path))  # may be lazy (a layout move): made by as_array, if at all
        if array is None:
            array = np.zeros(slot.torch_shape(info.shape), numpy_dtype(info.dtype))
        if slot.optax_axis is not None:
            array = np.asarray(array).squeeze(slot.optax_axis)
        _check_leaf_fits(self.state.spec, slot, path, leaf, array)
        self.filled.add((slot.name, path))
        return self.as_array(array)

    def scalar_value(self, slot: str, node: Any, where: ParamPath, leaf: Any) -> Any:
        """The one value of a scalar slot (NAdam's ``mu_product``) that the parameters sharing ``node`` share."""
        covered = self.covered(node, where)
        values = {
            self.state.slots[(slot, p.path)].tobytes(): self.state.slots[(slot, p.path)]
            for p in covered
            if (slot, p.path) in self.state.slots
        }
        if len(values) > 1:
            raise UnsupportedError(f"{slot} differs between parameters that share one Optax state at {'/'.join(where)}")
        self.filled.update((slot, p.path) for p in covered)
        if not values:
            return leaf  # no parameter has stepped: the template's initial value is torch's too
        (array,) = values.values()
        if np.dtype(leaf.dtype) != array.dtype:
            names = [path_to_name(p.path) for p in covered]
            shared = f" (shared with {len(names) - 1} more, at {'/'.join(where)})" if len(names) > 1 else ""
            raise MappingError(
                f"{self.state.spec.torch_class} {slot} of {names[0]}{shared}: the Optax template keeps it as "
                f"{np.dtype(leaf.dtype)}, the state holds {array.dtype}{_x64_hint(array.dtype, leaf.dtype)}"
            )
        return self.as_array(array)

    def covered(self, node: Any, where: ParamPath) -> tuple[ParamInfo, ...]:
        """The parameters a node's counts and scalars belong to: those in its slot trees, else its partition's."""
        in_trees = (
            {p for leaves in _slot_leaves(node, self.family).values() for p in leaves} if node is not None else ()
        )
        if in_trees:
            return tuple(self.by_path[p] for p in in_trees)
        prefix = _partition_prefix(where)
        if not prefix:
            return self.state.params
        if prefix in self.partitions:
            return tuple(self.by_path[p] for p in self.partitions[prefix] if p in self.by_path)
        if prefix[-1] in set(self.labels.values()):
            return tuple(p for p in self.state.params if self.labels[p.path] == prefix[-1])
        raise MappingError(
            f"cannot tell which parameters the count at {'/'.join(where)} belongs to: its partition "
            "keeps no slots and its label is not one of optstate's"
        )

    def wrapper(self, node: Any, where: ParamPath) -> Any:
        """A state wrapping others (inject_hyperparams, MultiSteps, a schedule's): what it wraps filled, and
        its own counters and hyperparameters set."""
        inner = {
            f: _map_states(getattr(node, f), self.types, self.visit, where + (f,))
            for f in _WRAPPED_FIELDS
            if f in node._fields
        }
        if isinstance(node, optax.MultiStepsState):
            return self.multi_steps(node, where, inner)
        # An optimizer without a step count (SGD, Muon) has taken an unknown number: 0 unless a scheduler says.
        fields = {"count": self.as_array(_count(self.step_of(node, where, unknown=0), node.count)), **inner}
        if isinstance(node, _INJECT):
            fields["hyperparams"] = self.injected(node, where)
        return node._replace(**fields)

    def multi_steps(self, node: optax.MultiStepsState, where: ParamPath, inner: Mapping[str, Any]) -> Any:
        """``optax.MultiSteps`` at an accumulation boundary, where a conversion happens: nothing accumulated."""
        zeros = jax.tree_util.tree_map(lambda leaf: self.as_array(np.zeros(leaf.shape, leaf.dtype)), node.acc_grads)
        # gradient_step counts optimizer steps: the most any parameter has taken.
        steps = [p.step for p in self.covered(None, where) if p.step is not None]
        return node._replace(
            mini_step=self.as_array(_count(0, node.mini_step)),
            acc_grads=zeros,
            gradient_step=self.as_array(_count(max(steps, default=0), node.gradient_step)),
            **inner,
        )

    def injected(self, node: Any, where: ParamPath) -> dict[str, Any]:
        """``inject_hyperparams``' values: the torch hyperparameters of the one param group it covers."""
        groups = {p.group for p in self.covered(None, where)}
        if len(groups) != 1:
            raise UnsupportedError(f"inject_hyperparams at {'/'.join(where)} spans param groups {sorted(groups)}")
        hyperparams = self.state.param_groups[groups.pop()]
        spec = self.state.spec
        return {
            name: self.as_array(np.asarray(spec.injected_value(name, hyperparams), np.dtype(leaf.dtype)))
            for name, leaf in node.hyperparams.items()
        }

    def step_of(self, node: Any, where: ParamPath, unknown: int | None = None) -> int | None:
        """The step a count in ``node`` stands for: the LR scheduler's where it counts, else its parameters'."""
        scheduler = self.state.metadata.lr_scheduler
        if scheduler is not None and (
            isinstance(node, (optax.ScaleByScheduleState, WrappedScheduleState)) or not self.state.spec.has_step
        ):
            return last_epoch(scheduler)
        step = self.state.common_step(self.covered(node, where))
        return unknown if step is None else step

    def check_complete(self) -> None:
        """Refuse a template that had no place for a slot the state holds."""
        state = self.state
        expected = {
            (s.name, p.path)
            for p in state.params
            for s in state.spec.active_slots(state.param_groups[p.group])
            if s.applies(p.shape)
        }
        missing = sorted(expected - self.filled)
        if missing:
            raise MappingError(
                "the Optax state has no place for "
                + ", ".join(f"{slot} of {path_to_name(p)}" for slot, p in missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )


def _check_leaf_fits(spec: OptimizerSpec, slot: Slot, path: ParamPath, leaf: Any, array: Any) -> None:
    """Refuse a slot array whose shape or dtype is not the template leaf's, naming the family, slot and parameter."""
    if tuple(leaf.shape) != tuple(array.shape) or np.dtype(leaf.dtype) != np.dtype(array.dtype):
        raise MappingError(
            f"{spec.torch_class} {slot.name} of {path_to_name(path)}: the Optax template expects shape "
            f"{list(leaf.shape)} {np.dtype(leaf.dtype)}, the state holds {list(array.shape)} "
            f"{np.dtype(array.dtype)}{_x64_hint(array.dtype, leaf.dtype)}"
        )


def _x64_hint(held: Any, expected: Any) -> str:
    """Why a 64-bit array meets a 32-bit template, where JAX's 64-bit mode being off is the reason.

    >>> _x64_hint(np.float32, np.float32)
    ''
    """
    held, expected = np.dtype(held), np.dtype(expected)
    if held.itemsize != 8 or expected.itemsize != 4 or jax.config.jax_enable_x64:  # type: ignore[attr-defined]
        return ""
    return (
        "; JAX's 64-bit mode is off (jax_enable_x64), so the template was made in 32 bits: call "
        "jax.config.update('jax_enable_x64', True) before building the params and tx"
    )


def _partitions(template: Any, family: OptaxFamily, types: tuple[type, ...]) -> dict[ParamPath, set[ParamPath]]:
    """Partition prefix -> the parameters whose slots it holds, for a template of any labels."""
    found: dict[ParamPath, set[ParamPath]] = {}

    def visit(node: Any, where: ParamPath) -> Any:
        paths = {p for leaves in _slot_leaves(node, family).values() for p in leaves}
        found.setdefault(_partition_prefix(where), set()).update(paths)
        return node

    _map_states(template, tuple(t for t in types if t not in _WRAPPERS), visit)
    return {prefix: paths for prefix, paths in found.items() if paths}


def _count(value: int | None, leaf: Any) -> np.ndarray:
    dtype = np.dtype(leaf.dtype)
    if value is None:
        raise UnsupportedError("the Optax state keeps a count (a schedule?) that this optimizer state does not record")
    if value > np.iinfo(dtype).max:
        raise UnsupportedError(f"step {value} does not fit Optax's {dtype} count")
    return np.asarray(value, dtype)


def nest(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    """A nested dict from ``{path: leaf}``.

    >>> nest({("a", "0", "w"): 1, ("a", "0", "b"): 2, ("c",): 3})
    {'a': {'0': {'w': 1, 'b': 2}}, 'c': 3}
    """
    root: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = root
        for i, key in enumerate(path[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise MappingError(
                    f"{path_to_name(path[: i + 1])} is both a parameter and a prefix of {path_to_name(path)}"
                )
        if path[-1] in node:
            raise MappingError(f"{path_to_name(path)} is both a parameter and a prefix of another")
        node[path[-1]] = leaf
    return root


def param_shapes(state: OptimizerState) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Every parameter of the JAX side (tracked and frozen; buffers are not parameters), as shapes.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> param_shapes(OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float64", 0),), {}))
    {('w',): ShapeDtypeStruct(shape=(2,), dtype=float64)}
    """
    shapes = {p.path: jax.ShapeDtypeStruct(p.shape, numpy_dtype(p.dtype)) for p in state.params}
    weights = state.weights or {}  # without weights there is no frozen parameter
    for path in state.frozen_paths():
        w = weights[path]
        shapes[path] = jax.ShapeDtypeStruct(w.shape, w.dtype)
    return shapes


def template(state: OptimizerState) -> tuple[optax.GradientTransformation, Any, Any]:
    """``(tx, params, opt_state)`` for ``state``, as shapes: ``jax.ShapeDtypeStruct`` leaves, float64 kept.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> s = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("w",), (2,), "float64", 0),), {})
    >>> template(s)[2][0].mu["w"]
    ShapeDtypeStruct(shape=(2,), dtype=float64)
    """
    tx = optax_transform(state)
    params = nest(param_shapes(state))
    with jax.enable_x64(True):  # shapes only: float64 must stay float64
        return tx, params, jax.eval_shape(tx.init, params)


def dry_run(state: OptimizerState) -> None:
    """Meet every refusal a conversion to Optax would meet, without making an array.

    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> dry_run(OptimizerState("sgd", ({"lr": 0.1},), (ParamInfo(("w",), (2,), "float32", 0),), {}))
    """
    fill_state(state, template(state)[2], lambda array: array)


def to_optax(state: OptimizerState, tx: optax.GradientTransformation, params: Any) -> Any:
    """Fill the template ``tx.init(params)`` from ``state`` and return it.

    >>> import jax, numpy as np, optstate
    >>> from optstate.schema import OptimizerState, ParamInfo
    >>> s = OptimizerState("adam", ({"lr": 1e-3},), (ParamInfo(("w",), (2,), "float32", 0, 3),),
    ...     {("first_moment", ("w",)): np.ones(2, np.float32), ("second_moment", ("w",)): np.ones(2, np.float32)})
    >>> params = {"w": np.zeros(2, np.float32)}
    >>> opt_state = optstate.to_optax(s, optstate.optax_transform(s), params)
    >>> int(opt_state[0].count), opt_state[0].mu["w"].tolist()
    (3, [1.0, 1.0])
    """
    # The template's shapes, not its arrays: tx.init would allocate every moment only for it to be
    # replaced (on an accelerator, as much memory again as the state). Where the state leaves a leaf
    # at its initial value (NAdam's mu_product before the first step), the real init supplies it.
    try:
        filled = fill_state(state, jax.eval_shape(tx.init, params), to_jax)
    except TypeError:  # an init that cannot be traced (NumPy on its inputs, a leaf JAX has no type for)
        return fill_state(state, tx.init(params), to_jax)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(filled)):
        filled = fill_state(state, tx.init(params), to_jax)
    return filled


def _on_device(array: Any) -> bool:
    """Whether ``array`` is a tensor left on its accelerator (see :func:`to_jax`)."""
    return isinstance(array, Deferred) and array.dlpack is not None


def to_jax(array: Any) -> jax.Array:
    """``array`` as a JAX array on the default device, handed over by DLPack (no copy) where the
    array already lives there in a form JAX takes as it is; copied otherwise.

    The state's arrays are its own (copies of a live optimizer's, unless ``from_torch(..., copy=False)``
    borrowed them), so sharing their memory with JAX costs nothing and copies nothing.

    A tensor that ``from_torch`` left on its accelerator (:class:`Deferred` with ``dlpack`` set) goes
    to JAX on that device, by DLPack, when JAX has it; through the host otherwise. A layout move of
    such a tensor (``moved``) is made by JAX, on the device.

    >>> to_jax(np.arange(3.0)).tolist()
    [0.0, 1.0, 2.0]
    """
    if isinstance(array, Deferred) and array.moved is not None and _on_device(array.moved[0]):
        source, move = array.moved
        return move.apply(to_jax(source), transpose=jax.numpy.transpose)
    if _on_device(array):
        try:
            taken = jax.dlpack.from_dlpack(array.dlpack)
        except (BufferError, TypeError, ValueError, RuntimeError):  # no such device in this JAX: via the host
            taken = None
        if taken is not None and taken.shape == array.shape and np.dtype(taken.dtype) == array.dtype:
            return taken
    array = np.asarray(array)
    if jax.default_backend() == "cpu" and array.flags.c_contiguous and array.flags.writeable:
        try:
            return jax.dlpack.from_dlpack(array)  # JAX copies only what it cannot take as it is (misaligned)
        except (BufferError, TypeError, ValueError, RuntimeError):  # a dtype this JAX does not import
            pass
    return jax.numpy.asarray(array)


# ----------------------------------------------------------------------------- Optax -> canonical


def _same_kind(default: Any, value: Any) -> bool:
    """Whether ``value`` is of the kind torch takes where its default is ``default``."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list)) and len(value) == len(default)
    return True


def _check_group(spec: OptimizerSpec, group: Mapping[str, Any], gi: int) -> None:
    missing = [k for k in spec.must_give if k not in group]
    if missing:
        raise UnsupportedError(
            f"param group {gi}: give {missing} explicitly: torch and Optax default "
            f"them differently for {spec.torch_class}"
        )
    unknown = sorted(set(group) - set(spec.hyperparams) - BOOKKEEPING_KEYS)
    if unknown:
        raise UnsupportedError(f"param group {gi}: {spec.torch_class} has no hyperparameter(s) {unknown}")
    for key, value in group.items():
        default = spec.hyperparams.get(key)
        if not _same_kind(default, value):
            raise UnsupportedError(
                f"param group {gi}: {key}={value!r} is not of the type torch takes (default {default!r})"
            )
    spec.check_supported(group, f"param group {gi}")


_STOCK_RMS = (optax.ScaleByRmsState, optax.ScaleByRStdDevState)


def _refuse_trace_after_learning_rate(tree: Any) -> None:
    """``optax.rmsprop(momentum=m)`` chains the trace after the learning rate, so its trace is
    ``-lr * buf``, not torch's ``buf``: refuse that layout rather than mistake one for the other."""
    if isinstance(tree, (tuple, list, dict)):
        children = list(tree.values() if isinstance(tree, dict) else tree)
        for i, child in enumerate(children):
            if isinstance(child, _STOCK_RMS) and any(isinstance(c, optax.TraceState) for c in children[i + 2 :]):
                raise UnsupportedError(
                    "this RMSprop state keeps its momentum trace after the learning rate, as "
                    "optax.rmsprop(momentum=...) does, so the trace holds -lr * torch's momentum_buffer; convert a "
                    "state of chain(scale_by_rms(...), trace(momentum), scale_by_learning_rate(lr)) instead"
                )
        for child in children:
            _refuse_trace_after_learning_rate(child)


class _Collected(NamedTuple):
    slots: dict[tuple[str, ParamPath], np.ndarray]
    steps: dict[ParamPath, int]  # by parameter
    schedule_count: int | None  # an LR schedule's
    injected: dict[ParamPath, dict[str, float]]  # inject_hyperparams values, by parameter
    stock: frozenset[str]  # stock Optax state types read as torch's (allow_approximate)


def restored_types(
    raw: Any, spec: OptimizerSpec, *, optstate_transform: bool, recorded: Mapping[str, str] | None = None
) -> Any:
    """A state tree as Orbax restores it without a target (dicts, lists), given back its NamedTuple types.

    Orbax keeps no type names, and states of different types can have the same fields. ``recorded``
    (what ``optstate.json`` kept) settles it; otherwise a stock Optax state and optstate's torch-exact
    one (``nu`` is ``nu``) count as the stock kind unless ``optstate_transform`` says the training
    used optstate's, and any other likeness is refused rather than guessed.

    >>> from optstate.schema import optimizer_spec
    >>> raw = [{"count": np.zeros((), np.int32), "mu": {"w": np.ones(2)}, "nu": {"w": np.ones(2)}}]
    >>> type(restored_types(raw, optimizer_spec("adam"), optstate_transform=False)[0]).__name__
    'ScaleByAdamState'
    """
    family = optax_family(spec)

    def choose(matches: list[type], path: ParamPath) -> type:
        name = (recorded or {}).get("/".join(path))
        named = [cls for cls in matches if cls.__name__ == name]
        if named:
            return named[0]
        for original, mimic in family.stock_states.items():
            if set(matches) == {original, mimic}:
                return mimic if optstate_transform else original
        if set(matches) <= {optax.ScaleByScheduleState, WrappedScheduleState}:
            return optax.ScaleByScheduleState  # either way an LR schedule's count
        raise UnsupportedError(
            f"Optax state at {'/'.join(path)} could be any of "
            f"{sorted(cls.__name__ for cls in matches)}, which look alike on disk"
        )

    return _typed(raw, (*_state_types(family), *family.stock_states), choose)


def _accept_stock(tree: Any, family: OptaxFamily, allowed: bool) -> tuple[Any, frozenset[str]]:
    """Stock Optax states whose formula differs from torch's: refused, or with ``allowed`` read as torch's."""
    stock = family.stock_states
    seen: set[str] = set()
    if not stock:
        return tree, frozenset()

    def visit(node: Any, where: ParamPath) -> Any:
        if type(node) not in stock:
            return node
        if not allowed:
            raise UnsupportedError(
                f"Optax state at {'/'.join(where) or '<root>'} is a stock {type(node).__name__}, whose formula is "
                f"not torch's {family.spec.torch_class}; convert a state made by optstate.optax_transform, or pass "
                "--allow-approximate (allow_approximate=True) to take it as is"
            )
        seen.add(type(node).__name__)
        return stock[type(node)](*node)

    return _map_states(tree, (*_state_types(family), *stock), visit), frozenset(seen)


def _collect(opt_state: Any, family: OptaxFamily, allow_approximate: bool = False) -> _Collected:
    """Everything an Optax state holds for ``family``, found by type."""
    typed = restored_types(opt_state, family.spec, optstate_transform=False)
    _refuse_trace_after_learning_rate(typed)
    typed, stock = _accept_stock(typed, family, allow_approximate)
    collecting = _Collecting(family, _state_types(family))
    _map_states(typed, collecting.types, collecting.visit)
    return collecting.collected(stock)


def collected_slots(
    opt_state: Any, spec: OptimizerSpec, allow_approximate: bool = True
) -> dict[tuple[str, ParamPath], np.ndarray]:
    """The family's slot arrays in an Optax state, by ``(slot, parameter path)``, shaped as Optax keeps them.

    >>> from optstate.schema import optimizer_spec
    >>> sorted(collected_slots(optax.adam(0.1).init({"w": np.zeros(2)}), optimizer_spec("adam")))
    [('first_moment', ('w',)), ('second_moment', ('w',))]
    """
    return _collect(opt_state, optax_family(spec), allow_approximate).slots


def slot_paths(opt_state: Any, spec: OptimizerSpec, allow_approximate: bool = True) -> frozenset[ParamPath]:
    """The parameters an Optax state keeps slots for.

    >>> from optstate.schema import optimizer_spec
    >>> sorted(slot_paths(optax.sgd(0.1, momentum=0.9).init({"w": np.zeros(2), "b": np.zeros(1)}),
    ...                   optimizer_spec("sgd")))
    [('b',), ('w',)]
    """
    return frozenset(path for _, path in collected_slots(opt_state, spec, allow_approximate))


@dataclass(frozen=True)
class _Collecting:
    """One :func:`_collect`: what the state nodes visited so far hold."""

    family: OptaxFamily
    types: tuple[type, ...]  # the state types to read: see _state_types
    slots: dict[tuple[str, ParamPath], np.ndarray] = field(default_factory=dict)
    counts: dict[ParamPath, int] = field(default_factory=dict)  # by partition prefix
    injected: dict[ParamPath, dict[str, float]] = field(default_factory=dict)  # by partition prefix
    prefixes: dict[ParamPath, ParamPath] = field(default_factory=dict)  # param path -> its partition prefix
    schedule_counts: set[int] = field(default_factory=set)

    def visit(self, node: Any, where: ParamPath) -> Any:
        """Take what ``node`` holds: the visitor of :func:`_map_states`."""
        if isinstance(node, _WRAPPERS):
            return self.unwrap(node, where)
        self.take_slots(node, where)
        name = _count_field(node)
        if name is not None and self.family.counts_step(node):
            self.counts[_partition_prefix(where)] = int(np.asarray(getattr(node, name)))
        if isinstance(node, optax.ScaleByScheduleState):
            self.schedule_counts.add(int(np.asarray(node.count)))
        return node

    def take_slots(self, node: Any, where: ParamPath) -> None:
        """``node``'s slots, by parameter; a scalar slot belongs to every parameter in the node's slot trees."""
        leaves_by_slot = _slot_leaves(node, self.family)
        for slot, leaves in leaves_by_slot.items():
            for path, leaf in leaves.items():
                if (slot, path) in self.slots:
                    raise FormatError(f"{path_to_name(path)}: two Optax states hold its {slot}")
                self.slots[(slot, path)] = np.asarray(leaf)
                self.prefixes[path] = _partition_prefix(where)
        covered = {p for leaves in leaves_by_slot.values() for p in leaves}
        for scalar in (s for s in self.family.slots_in(node) if s.scalar):
            self.slots.update({(scalar.name, p): np.asarray(getattr(node, scalar.optax_field)) for p in covered})

    def unwrap(self, node: Any, where: ParamPath) -> Any:
        """A state wrapping others: its injected hyperparameters and schedule count, then what it wraps."""
        if isinstance(node, optax.MultiStepsState):
            _refuse_partial_accumulation(node, where)
        if isinstance(node, _INJECT):
            self.injected[_partition_prefix(where)] = {k: np.asarray(v).item() for k, v in node.hyperparams.items()}
        if isinstance(node, WrappedScheduleState):
            self.schedule_counts.add(int(np.asarray(node.count)))
        for name in _WRAPPED_FIELDS:
            if name in node._fields:
                _map_states(getattr(node, name), self.types, self.visit, where + (name,))
        return node

    def collected(self, stock: frozenset[str]) -> _Collected:
        """What was found, by parameter (``stock``: the stock state types read as torch's)."""
        steps = {path: self.counts[prefix] for path, prefix in self.prefixes.items() if prefix in self.counts}
        injected = {path: self.injected[prefix] for path, prefix in self.prefixes.items() if prefix in self.injected}
        return _Collected(self.slots, steps, max(self.schedule_counts, default=None), injected, stock)


def _refuse_partial_accumulation(node: optax.MultiStepsState, where: ParamPath) -> None:
    """Refuse ``optax.MultiSteps`` between accumulation boundaries: torch holds no partial sums."""
    pending = int(np.asarray(node.mini_step))
    if pending or any(np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(node.acc_grads)):
        raise UnsupportedError(
            f"MultiSteps at {'/'.join(where)} is {pending} micro-steps into an "
            "accumulation; convert at a boundary, where torch holds no partial sums"
        )


def _merge_injected(
    spec: OptimizerSpec, group: dict[str, Any], values: Sequence[Mapping[str, float]], where: str
) -> None:
    """Fill a group's torch hyperparameters from the values ``inject_hyperparams`` kept in the state."""
    if not values:
        return
    if any(v != values[0] for v in values):
        raise UnsupportedError(f"{where}: its parameters were trained with different injected hyperparameters")
    found: dict[str, Any] = {}
    for name, value in values[0].items():
        if name not in spec.optax_hyperparams:
            raise UnsupportedError(
                f"{where}: {spec.torch_class} has no counterpart of the injected Optax hyperparameter {name!r}"
            )
        torch_name, index = spec.optax_hyperparams[name]
        if torch_name is None:
            if value != 0:
                raise UnsupportedError(f"{where}: injected {name}={value} has no torch counterpart unless 0")
        elif index is None:
            found[torch_name] = value
        else:
            parts = list(found.get(torch_name, group.get(torch_name, spec.hyperparams[torch_name])))
            parts[index] = value
            found[torch_name] = tuple(parts)
    for key, value in found.items():
        given = group.get(key)
        if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(value)):
            raise UnsupportedError(f"{where}: {key}={given!r} given, but the state injected {value!r}")
        group[key] = value


def _torch_shaped(
    spec: OptimizerSpec, slots: Mapping[tuple[str, ParamPath], np.ndarray], weights: Mapping[ParamPath, Any]
) -> dict[tuple[str, ParamPath], np.ndarray]:
    """Slots as torch shapes them: factored statistics get their size-1 axis back, placeholders go."""
    out = {}
    for (name, path), array in slots.items():
        slot = spec.slot(name)
        if slot.applies(tuple(weights[path].shape)):
            out[(name, path)] = array if slot.optax_axis is None else np.expand_dims(array, slot.optax_axis)
    return out


def named_optimizer(optimizer: str | None) -> OptimizerSpec:
    """The table row the caller names: an Optax state does not record which optimizer made it.

    >>> named_optimizer("Adam").torch_class
    'Adam'
    """
    if optimizer is None:
        raise UnsupportedError(
            "an Optax state does not record which optimizer made it: pass optimizer= "
            f"(--optimizer {'|'.join(OPTIMIZERS)})"
        )
    return optimizer_spec(optimizer)


def _names_of(weights: Mapping[ParamPath, Any]) -> dict[str, ParamPath]:
    """Parameter names (paths joined by dots) to paths; refuses two paths with one name."""
    names: dict[str, ParamPath] = {}
    for path in weights:
        name = path_to_name(path)
        if name in names:
            raise MappingError(f"{path_to_name(names[name])!r} and {list(path)} have the same dotted name {name!r}")
        names[name] = path
    return names


def _registration_order(path: ParamPath) -> tuple:
    # ModuleList/Sequential children are registered 0, 1, 2, ..., 10; JAX sorts keys as strings.
    return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in path)


def from_optax(
    opt_state: Any,
    params: Any,
    *,
    optimizer: str | None = None,
    hyperparams: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    allow_approximate: bool = False,
    order_warning: bool = True,
) -> OptimizerState:
    """Read an Optax state (live, or as Orbax restores it without a target) into the canonical form.

    ``params`` gives paths, shapes and dtypes, and the weights unless its leaves are
    ``jax.ShapeDtypeStruct``s.
    ``hyperparams`` is one dict (one group) or a list of dicts, one per group, each with a
    ``"params"`` list of parameter names, as torch's ``param_groups``; names are the parameter
    paths joined by dots (or positions, as in a torch ``state_dict``: ``0`` is the first parameter in
    the order inferred from the tree, see below). Parameters in no group are frozen.

    A JAX tree does not record the order torch registered its parameters in: it is inferred (numeric
    components sorted as numbers, others as strings), with a warning, since ``optimizer.load_state_dict``
    matches by position. ``order_warning=False`` is for callers that match by name (the checkpoint
    readers: what they write names every parameter); groups given by position warn regardless, as their
    membership depends on that order.

    >>> import jax.numpy as jnp, optax, optstate
    >>> params = {"w": jnp.ones(2)}
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> s = optstate.from_optax(tx.init(params), params, optimizer="sgd", hyperparams={"lr": 0.1, "momentum": 0.9})
    >>> s.slots[("momentum", ("w",))].tolist()
    [0.0, 0.0]
    """
    spec = named_optimizer(optimizer)
    spec.check_exact(allow_approximate)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes_only = all(isinstance(leaf, jax.ShapeDtypeStruct) for _, leaf in leaves)
    weights = {key_path_to_path(kp): leaf if shapes_only else np.asarray(leaf) for kp, leaf in leaves}
    collected = _collect(opt_state, optax_family(spec), allow_approximate)
    for _, path in collected.slots:
        if path not in weights:
            raise MappingError(f"{path_to_name(path)}: has optimizer state but is not in params")
    slots = _torch_shaped(spec, collected.slots, weights)
    groups = _given_groups(hyperparams, injected=bool(collected.injected))
    by_name = _names_of(weights)
    order = _inferred_order(weights, slots)
    if len(groups) == 1 and "params" not in groups[0]:
        groups[0]["params"] = [path_to_name(p) for p in order]
        if order_warning and len(order) > 1:
            _warn_inferred_order("optimizer.load_state_dict matches by position")
    _resolve_positions(groups, order)
    params_info = _grouped_params(spec, groups, by_name, weights, slots, collected)
    return OptimizerState(
        spec.name,
        tuple(groups),
        tuple(params_info),
        slots,
        None if shapes_only else weights,
        (),
        _metadata(spec, collected, allow_approximate),
    )


def _given_groups(
    hyperparams: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, *, injected: bool
) -> list[dict[str, Any]]:
    """The caller's param groups as a list of fresh dicts: one dict is one group."""
    if hyperparams is None and not injected:
        raise UnsupportedError(
            "an Optax state does not record its hyperparameters: pass hyperparams= (--hparams '{\"lr\": ...}')"
        )
    if not (
        hyperparams is None
        or isinstance(hyperparams, Mapping)
        or (isinstance(hyperparams, (list, tuple)) and all(isinstance(g, Mapping) for g in hyperparams))
    ):
        raise UnsupportedError(f"hyperparams must be a dict or a list of dicts (param groups), not {hyperparams!r}")
    if hyperparams is None or isinstance(hyperparams, Mapping):
        return [dict(hyperparams or {})]
    return [dict(g) for g in hyperparams]


def _inferred_order(weights: Mapping[ParamPath, Any], slots: Mapping[tuple[str, ParamPath], Any]) -> list[ParamPath]:
    """The parameters a group nobody listed holds: those with state (all, if none has any), in the order torch
    would have registered them."""
    stateful = {p for _, p in slots}
    return sorted((p for p in weights if not slots or p in stateful), key=_registration_order)


def _warn_inferred_order(why: str) -> None:
    warnings.warn(
        f"parameter order is inferred from the JAX tree (numeric components sorted as numbers); {why}, "
        "so load with optstate.to_torch (by name) or list the names in hyperparams' 'params'",
        stacklevel=4,
    )


def _resolve_positions(groups: list[dict[str, Any]], order: Sequence[ParamPath]) -> None:
    """Groups whose ``params`` are positions (a torch ``state_dict``'s way) get the names at those positions of
    the inferred order; their membership depends on that order, so this warns."""
    positional = [g for g in groups if any(isinstance(n, int) and not isinstance(n, bool) for n in g.get("params", ()))]
    if not positional:
        return
    _warn_inferred_order("param groups given by position take their members from it")
    for gi, group in enumerate(groups):
        if "params" not in group:
            continue  # refused by _grouped_params, with the other groups' errors
        names = []
        for entry in group["params"]:
            if isinstance(entry, int) and not isinstance(entry, bool):
                if not 0 <= entry < len(order):
                    raise MappingError(
                        f"param group {gi} names position {entry}, and the tree has {len(order)} parameters"
                    )
                entry = path_to_name(order[entry])
            names.append(entry)
        group["params"] = names


def _grouped_params(
    spec: OptimizerSpec,
    groups: list[dict[str, Any]],
    by_name: Mapping[str, ParamPath],
    weights: Mapping[ParamPath, Any],
    slots: Mapping[tuple[str, ParamPath], np.ndarray],
    collected: _Collected,
) -> list[ParamInfo]:
    """Every grouped parameter, group by group, each group's hyperparameters completed and checked; takes
    each group's ``"params"`` out of it."""
    params_info: list[ParamInfo] = []
    taken: set[ParamPath] = set()
    for gi, group in enumerate(groups):
        if "params" not in group:
            raise MappingError(
                f"param group {gi} of {len(groups)} lists no 'params': with several groups, each names its "
                "parameters (dotted names, or positions as in a torch state_dict)"
            )
        members = _members(group.pop("params"), gi, by_name, taken)
        _merge_injected(
            spec, group, [collected.injected[p] for p in members if p in collected.injected], f"param group {gi}"
        )
        _check_group(spec, group, gi)
        for path in members:
            w = weights[path]
            params_info.append(ParamInfo(path, tuple(w.shape), str(np.dtype(w.dtype)), gi, collected.steps.get(path)))
            _refuse_inactive_slots(spec, group, path, slots)
    stray = sorted({p for _, p in slots} - taken)
    if stray:
        raise MappingError(f"{path_to_name(stray[0])} has optimizer state but is in no param group")
    return params_info


def _members(names: Sequence[str], gi: int, by_name: Mapping[str, ParamPath], taken: set[ParamPath]) -> list[ParamPath]:
    """The paths of a group's parameter names, each added to ``taken``: a parameter is in one group at most."""
    members = []
    for name in names:
        path = by_name.get(name)
        if path is None:
            raise MappingError(
                f"param group {gi} names {name!r}, which is not in params (params has e.g. {list(by_name)[:5]})"
            )
        if path in taken:
            raise MappingError(f"{name!r} is in more than one param group")
        taken.add(path)
        members.append(path)
    return members


def _refuse_inactive_slots(
    spec: OptimizerSpec, group: Mapping[str, Any], path: ParamPath, slots: Mapping[tuple[str, ParamPath], np.ndarray]
) -> None:
    """Refuse a slot that torch, with the group's hyperparameters, would not keep."""
    active = {s.name for s in spec.active_slots(group)}
    inactive = [slot for slot, p in slots if p == path and slot not in active]
    if inactive:
        raise UnsupportedError(
            f"{path_to_name(path)}: the Optax state holds {inactive[0]}, which "
            f"{spec.torch_class} with these hyperparameters does not keep (e.g. momentum=0)"
        )


def _metadata(spec: OptimizerSpec, collected: _Collected, allow_approximate: bool) -> Metadata:
    """Where a state read from Optax came from, and why it is approximate, where it is."""
    approximate = spec.approximate or (
        f"read from stock Optax {', '.join(sorted(collected.stock))} state(s), whose formula differs from torch's"
        if allow_approximate and collected.stock
        else None
    )
    # An LR schedule's count, where it is not the optimizer's own count.
    own_count = optax.ScaleByScheduleState in optax_family(spec).count_states
    return Metadata(
        source=f"optax {optax.__version__}",
        approximate=approximate,
        schedule_count=None if own_count else collected.schedule_count,
    )
