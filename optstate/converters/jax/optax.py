"""Optax adapter: the ``GradientTransformation`` that continues a state, and its state trees.

Optax states are found by type and by path in the tree, never by position in a chain: the
optimizer table names the NamedTuple type holding each family's slots (``ScaleByAdamState``,
``TraceState``) and the field holding each slot.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax

try:  # inject_hyperparams' per-schedule state; optax keeps it in a private module
    from optax.schedules._inject import WrappedScheduleState
except ImportError:  # pragma: no cover - a later optax moved it: such states are then refused by type
    class WrappedScheduleState(NamedTuple):
        count: Any

from ...errors import FormatError, MappingError, UnsupportedError
from ...schema.families import BOOKKEEPING_KEYS, OPTIMIZERS, OptimizerSpec, Slot, is_decoupled, optimizer_spec
from ...schema.state import Deferred, Metadata, OptimizerState, ParamInfo, Path, numpy_dtype, path_to_name
from ..schedules.torch_schedulers import last_epoch, optax_schedules

FROZEN = "frozen"
_CONTAINERS = (optax.MaskedState, optax.PartitionState)
_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# States that wrap other states and keep counters or hyperparameters of their own.
_WRAPPERS = (*_INJECT, optax.MultiStepsState, WrappedScheduleState)
_WRAPPED_FIELDS = ("inner_state", "inner_opt_state", "hyperparams_states")


def _state_type(name: str) -> type:
    """An Optax state NamedTuple by name: optax's own, or one of torch_semantics' for torch-exact transforms."""
    found = getattr(optax, name, None)
    if found is None:
        from . import transforms as torch_semantics

        found = getattr(torch_semantics, name)
    return found


# ----------------------------------------------------------------------------- transforms

def _sgd_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    if not hp["momentum"]:
        return optax.identity()
    trace = optax.trace(decay=hp["momentum"], nesterov=bool(hp["nesterov"]))
    # torch: buf = momentum * buf + (1 - dampening) * g; Optax's trace has no dampening argument.
    return optax.chain(optax.scale(1.0 - hp["dampening"]), trace) if hp["dampening"] else trace


def _custom(spec: OptimizerSpec, option: str | None) -> Callable[..., optax.GradientTransformation]:
    """The torch-exact transform the optimizer table names for this family and option."""
    from . import transforms as torch_semantics

    return getattr(torch_semantics, spec.custom_transforms[option])


def _adam_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    if hp["amsgrad"]:
        return _custom(optimizer_spec("adam"), "amsgrad")(b1=b1, b2=b2, eps=hp["eps"])
    return optax.scale_by_adam(b1=b1, b2=b2, eps=hp["eps"], eps_root=0.0)


def _adamax_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return optax.scale_by_adamax(b1=b1, b2=b2, eps=hp["eps"])


def _rmsprop_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    scaler = _custom(optimizer_spec("rmsprop"), None)(alpha=hp["alpha"], eps=hp["eps"], centered=bool(hp["centered"]))
    # torch's buffer is momentum * buf + g / avg, before the lr: trace after the scaler, lr after the trace.
    return optax.chain(scaler, optax.trace(decay=hp["momentum"])) if hp["momentum"] else scaler


def _adagrad_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    spec = optimizer_spec("adagrad")
    scaler = _custom(spec, None)(initial_accumulator_value=hp["initial_accumulator_value"], eps=hp["eps"])
    # lr / (1 + (step - 1) * lr_decay), with a count of its own: the parameter's step, not the scheduler's.
    return optax.chain(scaler, _custom(spec, "lr_decay")(hp["lr_decay"])) if hp["lr_decay"] else scaler


def _adadelta_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    return optax.scale_by_adadelta(rho=hp["rho"], eps=hp["eps"])


def _nadam_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    # torch keeps mu_product in its default dtype (float32 unless set to float64), whatever the params'.
    return _custom(optimizer_spec("nadam"), None)(b1=b1, b2=b2, eps=hp["eps"], momentum_decay=hp["momentum_decay"],
                                mu_product_dtype=dtypes.get("momentum_product", np.dtype("float32")))


def _radam_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return _custom(optimizer_spec("radam"), None)(b1=b1, b2=b2, eps=hp["eps"])


def _adafactor_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    eps1, eps2 = hp["eps"]
    spec = optimizer_spec("adafactor")
    scaler = _custom(spec, None)(beta2_decay=hp["beta2_decay"], eps1=eps1, eps2=eps2, d=hp["d"])
    return optax.chain(scaler, _custom(spec, "lr")(hp["lr"]))  # min(lr, 1/sqrt(t)) in place of the lr


def _muon_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    return _custom(optimizer_spec("muon"), None)(
        momentum=hp["momentum"], nesterov=hp["nesterov"], ns_coefficients=tuple(hp["ns_coefficients"]),
        eps=hp["eps"], ns_steps=hp["ns_steps"], adjust_lr_fn=hp["adjust_lr_fn"])  # bfloat16 Newton-Schulz, as torch


def _lamb_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    # optax.lamb: the decay joins the Adam direction before the trust ratio rescales both.
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=hp["eps"], eps_root=0.0),
                       optax.add_decayed_weights(hp["weight_decay"]), optax.scale_by_trust_ratio())


def _lion_scaler(hp: Mapping[str, Any], dtypes: Mapping[str, np.dtype]) -> optax.GradientTransformation:
    b1, b2 = hp["betas"]
    return optax.scale_by_lion(b1=b1, b2=b2)


# Each builds the part of a family's update that torch multiplies by the learning rate.
# ``dtypes`` maps slot names to the dtypes the state stores them in (NAdam needs mu_product's).
_SCALERS: Mapping[str, Callable[[Mapping[str, Any], Mapping[str, np.dtype]], optax.GradientTransformation]] = {
    "sgd": _sgd_scaler, "adam": _adam_scaler, "adamw": _adam_scaler, "adamax": _adamax_scaler,
    "nadam": _nadam_scaler, "radam": _radam_scaler, "rmsprop": _rmsprop_scaler, "adagrad": _adagrad_scaler,
    "adadelta": _adadelta_scaler, "adafactor": _adafactor_scaler, "lion": _lion_scaler, "lamb": _lamb_scaler,
    "muon": _muon_scaler,
}


def group_transform(spec: OptimizerSpec, hyperparams: Mapping[str, Any],
                    dtypes: Mapping[str, np.dtype] | None = None,
                    schedule: Callable | None = None) -> optax.GradientTransformation:
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
    parts.append(_SCALERS[spec.name](hp, dtypes or {}))
    if spec.lr_in_scaler:  # the scaler took its own (negative) step; torch decays weights by lr * wd
        return optax.chain(*parts, *([optax.add_decayed_weights(-hp["lr"] * decay)] if decay else []))
    if decay and decoupled:
        parts.append(optax.add_decayed_weights(decay))
    parts.append(optax.scale_by_learning_rate(hp["lr"] if schedule is None else schedule))
    return optax.chain(*parts)


def key_path_to_path(key_path: Sequence[Any]) -> Path:
    """A JAX key path (dict keys, sequence indices, attributes) as an optstate path."""
    parts = []
    for key in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def param_labels(state: OptimizerState) -> dict[Path, str]:
    """The ``optax.partition`` label of every parameter: its group, split by step where steps differ.

    torch skips a parameter whose gradient is ``None``, so parameters of one group can have taken
    different numbers of steps; Optax keeps one count per transform, so each step gets its own.
    """
    labels = {}
    for gi in range(len(state.param_groups)):
        members = state.group_params(gi)
        steps = {p.step or 0 for p in members} if state.spec.has_step else {0}
        for p in members:
            labels[p.path] = f"group_{gi}_step_{p.step or 0}" if len(steps) > 1 else f"group_{gi}"
    labels.update({path: FROZEN for path in state.frozen_paths()})
    return labels


def _labels(labels: Mapping[Path, str], params: Any) -> Any:
    def label(key_path, _):
        path = key_path_to_path(key_path)
        if path not in labels:
            raise MappingError(f"{path_to_name(path)}: a parameter the optimizer state knows nothing of")
        return labels[path]
    return jax.tree_util.tree_map_with_path(label, params)


def _refuse_unsupported(state: OptimizerState) -> None:
    state.spec.check_exact(state.metadata.approximate is not None)
    for gi, hp in enumerate(state.param_groups):
        members = state.group_params(gi)
        dtypes = {p.dtype for p in members}
        if state.spec.name == "adafactor" and state.spec.with_defaults(hp)["eps"][0] is None and len(dtypes) > 1:
            # torch takes eps1 from the group's first parameter's dtype for all of them.
            raise UnsupportedError(f"param group {gi}: Adafactor(eps=(None, ...)) over parameters of dtypes "
                                   f"{sorted(dtypes)}; give eps[0] explicitly")
        stepped = all(state.has_state(p.path) for p in members) or not state.spec.active_slots(hp)
        state.spec.check_supported(hp, f"param group {gi}", all_stepped=stepped)


def _schedules(state: OptimizerState, horizon: int | None) -> list[Callable] | None:
    """The torch LR scheduler's exact per-group schedules, when the state carries one."""
    sd = state.metadata.lr_scheduler
    if sd is None:
        return None

    scheduled = last_epoch(sd)
    steps = {p.step for p in state.params if p.step is not None}
    if state.spec.has_step and steps and scheduled != max(steps):
        raise UnsupportedError(f"the LR scheduler has stepped {scheduled} times and the optimizer {max(steps)}: "
                               "optstate maps schedulers stepped once per optimizer step")
    if not state.spec.has_step:
        warnings.warn(f"{state.spec.torch_class} keeps no step count: assuming the LR scheduler stepped once per "
                      "optimizer step", stacklevel=3)
    if state.spec.lr_in_scaler:
        raise UnsupportedError(f"{state.spec.torch_class} with an LR scheduler: its relative step "
                               "min(lr, 1/sqrt(t)) under a changing lr has no exact mapping yet")
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
    transforms = {label: group_transform(state.spec, state.param_groups[g], dtypes[g],
                                         None if schedules is None else schedules[g])
                  for label, g in group_of.items()}
    if set(labels.values()) == {"group_0"}:
        return transforms["group_0"]
    if FROZEN in labels.values():
        transforms[FROZEN] = optax.set_to_zero()
    return optax.partition(transforms, partial(_labels, labels))


# ----------------------------------------------------------------------------- walking state trees

def _map_states(tree: Any, state_types: tuple[type, ...], visit: Callable[[Any, Path], Any], path: Path = ()) -> Any:
    """Rebuild ``tree`` with every node of ``state_types`` replaced by ``visit(node, path)``.

    Chains (tuples), partitions and masks are walked; stateless nodes are kept; any other node
    that holds arrays is refused by name, since it is state this conversion would lose.
    """
    if isinstance(tree, state_types):
        return visit(tree, path)
    if isinstance(tree, _WRAPPERS):  # not asked for: walk what it wraps, keep its own counters
        return tree._replace(**{f: _map_states(getattr(tree, f), state_types, visit, path + (f,))
                                for f in _WRAPPED_FIELDS if f in tree._fields})
    if isinstance(tree, _CONTAINERS):
        return type(tree)(*(_map_states(getattr(tree, f), state_types, visit, path + (f,)) for f in tree._fields))
    if isinstance(tree, tuple) and not hasattr(tree, "_fields") or isinstance(tree, list):
        return type(tree)(_map_states(c, state_types, visit, path + (str(i),)) for i, c in enumerate(tree))
    if isinstance(tree, dict):
        return {k: _map_states(v, state_types, visit, path + (str(k),)) for k, v in tree.items()}
    if not jax.tree_util.tree_leaves(tree):
        return tree  # EmptyState, MaskedNode, None: nothing to carry
    names = ", ".join(t.__name__ for t in state_types)
    raise UnsupportedError(
        f"Optax state at {'/'.join(path) or '<root>'} is a {type(tree).__name__}, which optstate cannot carry "
        f"over for this optimizer (it carries {names} and their chains, masks and partitions)")


def _state_types(spec: OptimizerSpec) -> tuple[type, ...]:
    # An LR schedule's count, inject_hyperparams and MultiSteps travel with every family.
    names = sorted(spec.optax_state_types() | {"ScaleByScheduleState"})
    return (*(_state_type(name) for name in names), *_WRAPPERS)


def _typed(raw: Any, state_types: tuple[type, ...], choose: Callable[[list[type], Path], type],
           path: Path = ()) -> Any:
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


def recorded_types(tree: Any, path: Path = ()) -> dict[str, str]:
    """``{path: NamedTuple type name}`` of a state tree: what Orbax forgets, for ``optstate.json``."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        found = {"/".join(path): type(tree).__name__} if tree._fields else {}
        for field in tree._fields:
            found.update(recorded_types(getattr(tree, field), path + (field,)))
        return found
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, child in children for k, v in recorded_types(child, path + (str(key),)).items()}


def _slot_leaves(node: Any, spec: OptimizerSpec) -> dict[str, dict[Path, Any]]:
    """``{slot name: {param path: leaf}}`` of one state node; masked parameters have no leaf."""
    out = {}
    for slot in spec.slots:
        if type(node).__name__ in slot.optax_states and not slot.scalar:
            leaves = jax.tree_util.tree_flatten_with_path(getattr(node, slot.optax_field))[0]
            out[slot.name] = {key_path_to_path(kp): leaf for kp, leaf in leaves}
    return out


def _partition_prefix(path: Path) -> Path:
    """The part of a state path that names its partition label (empty outside partitions)."""
    positions = [i for i, key in enumerate(path[:-1]) if key == "inner_states"]
    return path[:positions[-1] + 2] if positions else ()


def _counts_step(node: Any, spec: OptimizerSpec) -> bool:
    return type(node).__name__ in spec.count_states and _count_field(node) is not None


def _count_field(node: Any) -> str | None:
    """The field that counts steps: ``count``, or ``*_count`` in optstate's counter-only states."""
    return next((f for f in node._fields if f == "count" or f.endswith("_count")), None)


# ----------------------------------------------------------------------------- canonical -> Optax

def fill_state(state: OptimizerState, template: Any, as_array: Callable[[np.ndarray], Any]) -> Any:
    """``template`` (``tx.init(params)`` or its ``jax.eval_shape``) with every slot and count set from ``state``."""
    spec = state.spec
    by_path = {p.path: p for p in state.params}
    labels = param_labels(state)
    filled: set[tuple[str, Path]] = set()

    def slot_value(slot: Slot, path: Path, leaf: Any) -> Any:
        info = by_path.get(path)
        if info is None:
            raise MappingError(f"{path_to_name(path)}: the Optax state has a {slot.name} slot for a parameter the "
                               "torch optimizer does not track (frozen?); leave it out of this transform, e.g. "
                               "with optstate.optax_transform on a state that holds the model weights, which "
                               "labels frozen parameters 'frozen'")
        if not slot.applies(info.shape):
            return as_array(np.zeros(leaf.shape, leaf.dtype))  # Optax's placeholder where torch keeps no such slot
        array = state.slots.get((slot.name, path))  # may be lazy (a layout move): made by as_array, if at all
        if array is None:
            array = np.zeros(slot.torch_shape(info.shape), numpy_dtype(info.dtype))
        if slot.optax_axis is not None:
            array = np.asarray(array).squeeze(slot.optax_axis)
        if tuple(leaf.shape) != tuple(array.shape) or np.dtype(leaf.dtype) != np.dtype(array.dtype):
            hint = " (enable float64 in JAX: jax.config.update('jax_enable_x64', True))" \
                if array.dtype == np.float64 else ""
            raise MappingError(f"{path_to_name(path)}: the Optax template expects {slot.name} of shape "
                               f"{list(leaf.shape)} {np.dtype(leaf.dtype)}, the state holds {list(array.shape)} "
                               f"{array.dtype}{hint}")
        filled.add((slot.name, path))
        return as_array(array)

    def covered(node: Any, where: Path) -> tuple[ParamInfo, ...]:
        """The parameters a node's counts and scalars belong to: those in its slot trees, else its partition's."""
        in_trees = {p for leaves in _slot_leaves(node, spec).values() for p in leaves} if node is not None else ()
        if in_trees:
            return tuple(by_path[p] for p in in_trees)
        prefix = _partition_prefix(where)
        if not prefix:
            return state.params
        if prefix in partitions:
            return tuple(by_path[p] for p in partitions[prefix] if p in by_path)
        if prefix[-1] in set(labels.values()):
            return tuple(p for p in state.params if labels[p.path] == prefix[-1])
        raise MappingError(f"cannot tell which parameters the count at {'/'.join(where)} belongs to: its partition "
                           "keeps no slots and its label is not one of optstate's")

    def scalar_value(slot: str, node: Any, where: Path, leaf: Any) -> Any:
        values = {state.slots[(slot, p.path)].tobytes(): state.slots[(slot, p.path)]
                  for p in covered(node, where) if (slot, p.path) in state.slots}
        if len(values) > 1:
            raise UnsupportedError(f"{slot} differs between parameters that share one Optax state at "
                                   f"{'/'.join(where)}")
        filled.update((slot, p.path) for p in covered(node, where))
        if not values:
            return leaf  # no parameter has stepped: the template's initial value is torch's too
        (array,) = values.values()
        if np.dtype(leaf.dtype) != array.dtype:
            raise MappingError(f"{'/'.join(where)}: the Optax template keeps {slot} as {np.dtype(leaf.dtype)}, "
                               f"the state holds {array.dtype}")
        return as_array(array)

    def wrapped(node: Any, where: Path) -> Any:
        inner = {f: _map_states(getattr(node, f), types, visit, where + (f,)) for f in _WRAPPED_FIELDS
                 if f in node._fields}
        if isinstance(node, optax.MultiStepsState):  # a conversion happens at an accumulation boundary
            zeros = jax.tree_util.tree_map(lambda leaf: as_array(np.zeros(leaf.shape, leaf.dtype)), node.acc_grads)
            # gradient_step counts optimizer steps: the most any parameter has taken.
            steps = [p.step for p in covered(None, where) if p.step is not None]
            return node._replace(mini_step=as_array(_count(0, node.mini_step)), acc_grads=zeros,
                                 gradient_step=as_array(_count(max(steps, default=0), node.gradient_step)), **inner)
        # An optimizer without a step count (SGD, Muon) has taken an unknown number: 0 unless a scheduler says.
        fields = {"count": as_array(_count(step_of(node, where, unknown=0), node.count)), **inner}
        if isinstance(node, _INJECT):
            hp = group_hyperparams(where)
            fields["hyperparams"] = {name: as_array(np.asarray(spec.injected_value(name, hp), np.dtype(leaf.dtype)))
                                     for name, leaf in node.hyperparams.items()}
        return node._replace(**fields)

    def group_hyperparams(where: Path) -> Mapping[str, Any]:
        groups = {p.group for p in covered(None, where)}
        if len(groups) != 1:
            raise UnsupportedError(f"inject_hyperparams at {'/'.join(where)} spans param groups {sorted(groups)}")
        return state.param_groups[groups.pop()]

    def step_of(node: Any, where: Path, unknown: int | None = None) -> int | None:
        if state.metadata.lr_scheduler is not None and (isinstance(node, (optax.ScaleByScheduleState,
                                                                    WrappedScheduleState))
                                                 or not spec.has_step):
            return last_epoch(state.metadata.lr_scheduler)
        step = state.common_step(covered(node, where))
        return unknown if step is None else step

    def visit(node: Any, where: Path) -> Any:
        if isinstance(node, _WRAPPERS):
            return wrapped(node, where)
        fields = {
            slot.optax_field: scalar_value(slot.name, node, where, getattr(node, slot.optax_field)) if slot.scalar
            else jax.tree_util.tree_map_with_path(
                lambda kp, leaf, slot=slot: slot_value(slot, key_path_to_path(kp), leaf),
                getattr(node, slot.optax_field))
            for slot in spec.slots if type(node).__name__ in slot.optax_states}
        if _counts_step(node, spec) or isinstance(node, optax.ScaleByScheduleState):
            field = _count_field(node)
            fields[field] = as_array(_count(step_of(node, where), getattr(node, field)))
        return node._replace(**fields)

    types = _state_types(spec)
    partitions = _partitions(template, spec, types)
    result = _map_states(template, types, visit)
    expected = {(s.name, p.path) for p in state.params for s in spec.active_slots(state.param_groups[p.group])
                if s.applies(p.shape)}
    missing = sorted(expected - filled)
    if missing:
        raise MappingError("the Optax state has no place for "
                           + ", ".join(f"{slot} of {path_to_name(p)}" for slot, p in missing[:5])
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return result


def _partitions(template: Any, spec: OptimizerSpec, types: tuple[type, ...]) -> dict[Path, set[Path]]:
    """Partition prefix -> the parameters whose slots it holds, for a template of any labels."""
    found: dict[Path, set[Path]] = {}

    def visit(node: Any, where: Path) -> Any:
        paths = {p for leaves in _slot_leaves(node, spec).values() for p in leaves}
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


def nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
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
                raise MappingError(f"{path_to_name(path[:i + 1])} is both a parameter and a prefix of {path_to_name(path)}")
        if path[-1] in node:
            raise MappingError(f"{path_to_name(path)} is both a parameter and a prefix of another")
        node[path[-1]] = leaf
    return root


def param_shapes(state: OptimizerState) -> dict[Path, jax.ShapeDtypeStruct]:
    """Every parameter of the JAX side (tracked and frozen; buffers are not parameters), as shapes."""
    shapes = {p.path: jax.ShapeDtypeStruct(p.shape, numpy_dtype(p.dtype)) for p in state.params}
    for path in state.frozen_paths():
        w = state.weights[path]
        shapes[path] = jax.ShapeDtypeStruct(w.shape, w.dtype)
    return shapes


def template(state: OptimizerState) -> tuple[optax.GradientTransformation, Any, Any]:
    """``(tx, params, opt_state)`` for ``state``, as shapes: ``jax.ShapeDtypeStruct`` leaves, float64 kept."""
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
        raise UnsupportedError(f"param group {gi}: give {missing} explicitly: torch and Optax default "
                               f"them differently for {spec.torch_class}")
    unknown = sorted(set(group) - set(spec.hyperparams) - BOOKKEEPING_KEYS)
    if unknown:
        raise UnsupportedError(f"param group {gi}: {spec.torch_class} has no hyperparameter(s) {unknown}")
    for key, value in group.items():
        default = spec.hyperparams.get(key)
        if not _same_kind(default, value):
            raise UnsupportedError(f"param group {gi}: {key}={value!r} is not of the type torch takes "
                                   f"(default {default!r})")
    spec.check_supported(group, f"param group {gi}")


def _refuse_trace_after_learning_rate(tree: Any) -> None:
    """``optax.rmsprop(momentum=m)`` chains the trace after the learning rate, so its trace is
    ``-lr * buf``, not torch's ``buf``: refuse that layout rather than mistake one for the other."""
    if isinstance(tree, (tuple, list, dict)):
        children = tree.values() if isinstance(tree, dict) else tree
        names = [type(c).__name__ for c in children]
        for i, name in enumerate(names):
            if name in ("ScaleByRmsState", "ScaleByRStdDevState") and "TraceState" in names[i + 2:]:
                raise UnsupportedError(
                    "this RMSprop state keeps its momentum trace after the learning rate, as "
                    "optax.rmsprop(momentum=...) does, so the trace holds -lr * torch's momentum_buffer; convert a "
                    "state of chain(scale_by_rms(...), trace(momentum), scale_by_learning_rate(lr)) instead")
        for child in children:
            _refuse_trace_after_learning_rate(child)


class _Collected(NamedTuple):
    slots: dict[tuple[str, Path], np.ndarray]
    steps: dict[Path, int]  # by parameter
    schedule_count: int | None  # an LR schedule's
    injected: dict[Path, dict[str, float]]  # inject_hyperparams values, by parameter
    stock: frozenset[str]  # stock Optax state types read as torch's (allow_approximate)


def restored_types(raw: Any, spec: OptimizerSpec, *, optstate_transform: bool,
                   recorded: Mapping[str, str] | None = None) -> Any:
    """A state tree as Orbax restores it without a target (dicts, lists), given back its NamedTuple types.

    Orbax keeps no type names, and states of different types can have the same fields. ``recorded``
    (what ``optstate.json`` kept) settles it; otherwise a stock Optax state and optstate's torch-exact
    one (``nu`` is ``nu``) count as the stock kind unless ``optstate_transform`` says the training
    used optstate's, and any other likeness is refused rather than guessed.
    """
    stock = {_state_type(name): _state_type(mimics) for name, mimics in spec.stock_states.items()}

    def choose(matches: list[type], path: Path) -> type:
        name = (recorded or {}).get("/".join(path))
        named = [cls for cls in matches if cls.__name__ == name]
        if named:
            return named[0]
        for original, mimic in stock.items():
            if set(matches) == {original, mimic}:
                return mimic if optstate_transform else original
        if set(matches) <= {optax.ScaleByScheduleState, WrappedScheduleState}:
            return optax.ScaleByScheduleState  # either way an LR schedule's count
        raise UnsupportedError(f"Optax state at {'/'.join(path)} could be any of "
                               f"{sorted(cls.__name__ for cls in matches)}, which look alike on disk")

    return _typed(raw, (*_state_types(spec), *stock), choose)


def _accept_stock(tree: Any, spec: OptimizerSpec, allowed: bool) -> tuple[Any, frozenset[str]]:
    """Stock Optax states whose formula differs from torch's: refused, or with ``allowed`` read as torch's."""
    stock = {_state_type(name): _state_type(mimics) for name, mimics in spec.stock_states.items()}
    seen: set[str] = set()
    if not stock:
        return tree, frozenset()

    def visit(node: Any, where: Path) -> Any:
        if type(node) not in stock:
            return node
        if not allowed:
            raise UnsupportedError(
                f"Optax state at {'/'.join(where) or '<root>'} is a stock {type(node).__name__}, whose formula is "
                f"not torch's {spec.torch_class} (see SEMANTICS.md); convert a state made by "
                f"optstate.optax_transform, or pass --allow-approximate (allow_approximate=True) to take it as is")
        seen.add(type(node).__name__)
        return stock[type(node)](*node)

    return _map_states(tree, (*_state_types(spec), *stock), visit), frozenset(seen)


def _collect(opt_state: Any, spec: OptimizerSpec, allow_approximate: bool = False) -> _Collected:
    """Everything an Optax state holds for ``spec``'s family, found by type."""
    slots: dict[tuple[str, Path], np.ndarray] = {}
    counts: dict[Path, int] = {}  # by partition prefix
    injected: dict[Path, dict[str, float]] = {}  # by partition prefix
    prefixes: dict[Path, Path] = {}  # param path -> its partition prefix
    schedule_counts: set[int] = set()
    types = _state_types(spec)

    def unwrap(node: Any, where: Path) -> Any:
        if isinstance(node, optax.MultiStepsState):
            pending = int(np.asarray(node.mini_step))
            if pending or any(np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(node.acc_grads)):
                raise UnsupportedError(f"MultiSteps at {'/'.join(where)} is {pending} micro-steps into an "
                                       "accumulation; convert at a boundary, where torch holds no partial sums")
        if isinstance(node, _INJECT):
            injected[_partition_prefix(where)] = {k: np.asarray(v).item() for k, v in node.hyperparams.items()}
        if isinstance(node, WrappedScheduleState):
            schedule_counts.add(int(np.asarray(node.count)))
        for field in _WRAPPED_FIELDS:
            if field in node._fields:
                _map_states(getattr(node, field), types, visit, where + (field,))
        return node

    def visit(node: Any, where: Path) -> Any:
        if isinstance(node, _WRAPPERS):
            return unwrap(node, where)
        leaves_by_slot = _slot_leaves(node, spec)
        for slot, leaves in leaves_by_slot.items():
            for path, leaf in leaves.items():
                if (slot, path) in slots:
                    raise FormatError(f"{path_to_name(path)}: two Optax states hold its {slot}")
                slots[(slot, path)] = np.asarray(leaf)
                prefixes[path] = _partition_prefix(where)
        covered = {p for leaves in leaves_by_slot.values() for p in leaves}
        for slot in spec.slots:
            if slot.scalar and type(node).__name__ in slot.optax_states:
                slots.update({(slot.name, p): np.asarray(getattr(node, slot.optax_field)) for p in covered})
        if _counts_step(node, spec):
            counts[_partition_prefix(where)] = int(np.asarray(getattr(node, _count_field(node))))
        if isinstance(node, optax.ScaleByScheduleState):
            schedule_counts.add(int(np.asarray(node.count)))
        return node

    typed = restored_types(opt_state, spec, optstate_transform=False)
    _refuse_trace_after_learning_rate(typed)
    typed, stock = _accept_stock(typed, spec, allow_approximate)
    _map_states(typed, types, visit)
    steps = {path: counts[prefix] for path, prefix in prefixes.items() if prefix in counts}
    by_param = {path: injected[prefix] for path, prefix in prefixes.items() if prefix in injected}
    return _Collected(slots, steps, max(schedule_counts, default=None), by_param, stock)


def _merge_injected(spec: OptimizerSpec, group: dict[str, Any], values: Sequence[Mapping[str, float]],
                    where: str) -> None:
    """Fill a group's torch hyperparameters from the values ``inject_hyperparams`` kept in the state."""
    if not values:
        return
    if any(v != values[0] for v in values):
        raise UnsupportedError(f"{where}: its parameters were trained with different injected hyperparameters")
    found: dict[str, Any] = {}
    for name, value in values[0].items():
        if name not in spec.optax_hyperparams:
            raise UnsupportedError(f"{where}: {spec.torch_class} has no counterpart of the injected Optax "
                                   f"hyperparameter {name!r}")
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


def _torch_shaped(spec: OptimizerSpec, slots: Mapping[tuple[str, Path], np.ndarray],
                  weights: Mapping[Path, Any]) -> dict[tuple[str, Path], np.ndarray]:
    """Slots as torch shapes them: factored statistics get their size-1 axis back, placeholders go."""
    out = {}
    for (name, path), array in slots.items():
        slot = spec.slot(name)
        if slot.applies(tuple(weights[path].shape)):
            out[(name, path)] = array if slot.optax_axis is None else np.expand_dims(array, slot.optax_axis)
    return out


def named_optimizer(optimizer: str | None) -> OptimizerSpec:
    """The table row the caller names: an Optax state does not record which optimizer made it."""
    if optimizer is None:
        raise UnsupportedError("an Optax state does not record which optimizer made it: pass optimizer= "
                               f"(--optimizer {'|'.join(OPTIMIZERS)})")
    return optimizer_spec(optimizer)


def _names_of(weights: Mapping[Path, Any]) -> dict[str, Path]:
    """Parameter names (paths joined by dots) to paths; refuses two paths with one name."""
    names: dict[str, Path] = {}
    for path in weights:
        name = path_to_name(path)
        if name in names:
            raise MappingError(f"{path_to_name(names[name])!r} and {list(path)} have the same dotted name {name!r}")
        names[name] = path
    return names


def _registration_order(path: Path) -> tuple:
    # ModuleList/Sequential children are registered 0, 1, 2, ..., 10; JAX sorts keys as strings.
    return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in path)


def from_optax(opt_state: Any, params: Any, *, optimizer: str | None = None,
               hyperparams: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
               allow_approximate: bool = False) -> OptimizerState:
    """Read an Optax state (live, or as Orbax restores it without a target) into the canonical form.

    ``params`` gives paths, shapes and dtypes, and the weights unless its leaves are
    ``jax.ShapeDtypeStruct``s.
    ``hyperparams`` is one dict (one group) or a list of dicts, one per group, each with a
    ``"params"`` list of parameter names, as torch's ``param_groups``; names are the parameter
    paths joined by dots. Parameters in no group are frozen.

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
    collected = _collect(opt_state, spec, allow_approximate)
    for slot, path in collected.slots:
        if path not in weights:
            raise MappingError(f"{path_to_name(path)}: has optimizer state but is not in params")
    slots = _torch_shaped(spec, collected.slots, weights)
    if hyperparams is None and not collected.injected:
        raise UnsupportedError("an Optax state does not record its hyperparameters: pass hyperparams= "
                               "(--hparams '{\"lr\": ...}')")
    if not (hyperparams is None or isinstance(hyperparams, Mapping) or isinstance(hyperparams, (list, tuple))
            and all(isinstance(g, Mapping) for g in hyperparams)):
        raise UnsupportedError(f"hyperparams must be a dict or a list of dicts (param groups), not {hyperparams!r}")
    groups = [dict(hyperparams or {})] if hyperparams is None or isinstance(hyperparams, Mapping) \
        else [dict(g) for g in hyperparams]
    by_name = _names_of(weights)
    if len(groups) == 1 and "params" not in groups[0]:
        stateful = {p for _, p in slots}
        order = sorted((p for p in weights if not slots or p in stateful), key=_registration_order)
        groups[0]["params"] = [path_to_name(p) for p in order]
        if len(order) > 1:
            warnings.warn("parameter order is inferred from the JAX tree (numeric components sorted as numbers); "
                          "optimizer.load_state_dict matches by position, so load with optstate.to_torch "
                          "(by name) or list the names in hyperparams' 'params'", stacklevel=2)
    params_info, taken = [], set()
    for gi, group in enumerate(groups):
        members = []
        for name in group.pop("params"):
            path = by_name.get(name)
            if path is None:
                raise MappingError(f"param group {gi} names {name!r}, which is not in params "
                                   f"(params has e.g. {list(by_name)[:5]})")
            if path in taken:
                raise MappingError(f"{name!r} is in more than one param group")
            taken.add(path)
            members.append(path)
        _merge_injected(spec, group, [collected.injected[p] for p in members if p in collected.injected],
                        f"param group {gi}")
        _check_group(spec, group, gi)
        for path in members:
            w = weights[path]
            params_info.append(ParamInfo(path, tuple(w.shape), str(np.dtype(w.dtype)), gi, collected.steps.get(path)))
            inactive = [slot for slot, p in slots if p == path and slot not in
                        {s.name for s in spec.active_slots(group)}]
            if inactive:
                raise UnsupportedError(f"{path_to_name(path)}: the Optax state holds {inactive[0]}, which "
                                       f"{spec.torch_class} with these hyperparameters does not keep (e.g. momentum=0)")
    stray = sorted({p for _, p in slots} - taken)
    if stray:
        raise MappingError(f"{path_to_name(stray[0])} has optimizer state but is in no param group")
    approximate = spec.approximate or (
        f"read from stock Optax {', '.join(sorted(collected.stock))} state(s), whose formula differs from torch's"
        if allow_approximate and collected.stock else None)
    # An LR schedule's count, where it is not the optimizer's own count.
    schedule_count = None if "ScaleByScheduleState" in spec.count_states else collected.schedule_count
    metadata = Metadata(source=f"optax {optax.__version__}", approximate=approximate, schedule_count=schedule_count)
    return OptimizerState(spec.name, tuple(groups), tuple(params_info), slots, None if shapes_only else weights, (),
                          metadata)
