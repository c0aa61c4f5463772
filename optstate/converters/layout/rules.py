"""The matching rules: which leaf of a Flax model each tensor of a torch model is, and how it moves there.

A torch ``nn.Linear`` weight ``[out, in]`` is a Flax ``Dense`` kernel ``[in, out]``; a ``Conv2d``
weight ``[O, I, H, W]`` a ``Conv`` kernel ``[H, W, I, O]``; a LayerNorm ``weight`` a ``scale``;
``layers.0`` is ``layers_0`` (linen) or ``layers/0`` (NNX); BatchNorm's running statistics are
``batch_stats``, never optimizer state. A reshape instead of a transpose is silently wrong, and a
square layer passes every shape check, so the rules choose the move by the kind of layer (the
leaf's name), and shapes only confirm it. The result is a :class:`~.moves.Layout`.

Modules are matched by name first. linen names the modules it is not told the names of by class and
order of definition within their parent (``Dense_0``, ``Dense_1``, ``Block_0/Dense_1``; a list in
``setup`` ``layers_0``), which no torch name meets; those are paired with the torch modules left over
at the same place by an order-preserving pairing, in order of definition: the torch modules in the
torch model's order (its ``state_dict``'s), each numbered family in its own number order, kept where
exactly one such pairing makes every tensor fit. Where none does, or several do, the match is refused
with every problem listed. Pairings that do not keep both orders are never tried, so two members of
one family with the same shapes would pass swapped (linen numbers modules in the order they are
constructed, ``nn.Dense(4)(nn.Dense(4)(x))`` makes the outer one ``Dense_0``): where such a pairing is
used, the plan warns, naming the modules.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import MappingError
from ...schema.state import ParamPath, path_to_name
from .moves import Layout, Move, Shape, problem_list

__all__ = ["DROPPED_LEAVES", "QKV", "Paired", "SameShapes", "match_layout", "pair_modules", "plan_layout"]

#: Leaves of a torch module that have no Flax counterpart and hold nothing a Flax model reads.
DROPPED_LEAVES = ("num_batches_tracked",)
#: torch nn.MultiheadAttention packs q, k, v along axis 0 of one tensor; Flax keeps three modules.
QKV = ("query", "key", "value")

# A model's leaves by module key, then by leaf name: each a list, since two modules whose names
# meet under one key (``a_b.c`` and ``a.b_c``) are both kept, so that the match is seen as ambiguous.
_LeafIndex = Mapping[str, Mapping[str, list[tuple[ParamPath, Shape]]]]


def plan_layout(
    sources: Mapping[ParamPath, Shape],
    params: Mapping[ParamPath, Shape],
    stats: Mapping[ParamPath, Shape] | None = None,
) -> tuple[Layout, list[str]]:
    """The moves the rules choose from torch tensors (``sources``: path -> shape) to a Flax model's
    ``params`` (and ``stats``: BatchNorm's ``batch_stats``), and every problem found: a tensor with no
    target or several, a shape that does not fit, a target no tensor reaches.

    Where numbered Flax modules of one family with the same shapes were paired by order of definition,
    a ``UserWarning`` names them (see :class:`SameShapes`): the shapes cannot tell them apart.

    >>> layout, problems = plan_layout({("fc", "weight"): (3, 2), ("fc", "bias"): (3,)},
    ...                                {("fc", "kernel"): (2, 3), ("fc", "bias"): (3,)})
    >>> [(m.describe, m.target) for m in layout.moves], problems
    ([('transpose (1, 0)', ('fc', 'kernel')), ('as is', ('fc', 'bias'))], [])
    """
    planned = _plan(sources, params, stats or {})
    for same in planned.same_shapes:
        warnings.warn(same.note, stacklevel=2)
    return planned.layout, planned.problems


@dataclass(frozen=True)
class SameShapes:
    """Numbered Flax modules of one family (``flax``, in number order) with the same shapes, paired with the
    torch modules ``torch`` by order of definition: a swap of two would fit as well, and only the order in
    which linen constructed them says which is which.

    >>> note = SameShapes((("Dense_0",), ("Dense_1",)), (("fc1",), ("fc2",))).note
    >>> for part in note.split("; "):  # the note is one line
    ...     print(part)
    Dense_0 and Dense_1 have the same shapes: paired with fc1, fc2 by order of definition
    check that linen constructed them in that order (optstate map)
    """

    flax: tuple[ParamPath, ...]
    torch: tuple[ParamPath, ...]

    @property
    def note(self) -> str:
        """The warning's text."""
        names = ["/".join(f) for f in self.flax]
        return (
            f"{', '.join(names[:-1])} and {names[-1]} have the same shapes: paired with "
            f"{', '.join(path_to_name(t) for t in self.torch)} by order of definition; "
            "check that linen constructed them in that order (optstate map)"
        )

    def under(self, torch_at: ParamPath, flax_at: ParamPath) -> SameShapes:
        """The same modules named from a place higher up, ``torch_at`` and ``flax_at`` above them.

        >>> SameShapes((("Dense_0",),), (("fc1",),)).under(("blocks", "0"), ("Block_0",)).flax
        (('Block_0', 'Dense_0'),)
        """
        return SameShapes(tuple((*flax_at, *f) for f in self.flax), tuple((*torch_at, *t) for t in self.torch))


@dataclass(frozen=True)
class Paired:
    """What :func:`pair_modules` found: ``renames`` (torch module -> the numbered Flax module it is), the
    ``problems`` that left a place unpaired, and the pairings by order that shapes cannot confirm."""

    renames: dict[ParamPath, ParamPath]
    problems: list[str]
    same_shapes: list[SameShapes]


@dataclass(frozen=True)
class _Planned:
    """:func:`plan_layout`'s layout and problems, with what the pairing of numbered modules found on the way."""

    layout: Layout
    problems: list[str]
    renames: dict[ParamPath, ParamPath]
    same_shapes: list[SameShapes]


def _plan(
    sources: Mapping[ParamPath, Shape], params: Mapping[ParamPath, Shape], stats: Mapping[ParamPath, Shape]
) -> _Planned:
    """:func:`plan_layout`, without the warnings, and the torch modules paired with numbered Flax modules."""
    paired = pair_modules(sources, params, stats)
    matcher = _Matcher(params, stats, paired.renames)
    for source, shape in sources.items():
        matcher.match(source, tuple(shape))
    problems = paired.problems + matcher.problems + matcher.unmatched_targets()
    layout = Layout(tuple(matcher.moves), tuple(matcher.dropped))
    return _Planned(layout, problems, paired.renames, paired.same_shapes)


def match_layout(
    sources: Mapping[ParamPath, Shape],
    params: Mapping[ParamPath, Shape],
    stats: Mapping[ParamPath, Shape] | None = None,
) -> Layout:
    """:func:`plan_layout`, refusing with the list of problems rather than guessing.

    >>> match_layout({("fc", "weight"): (2, 2)}, {("fc", "kernel"): (2, 2)}).moves[0].axes  # square: transposed
    (1, 0)
    """
    layout, problems = plan_layout(sources, params, stats)
    if problems:
        raise MappingError(problem_list(problems))
    return layout


def _module_key(module: ParamPath) -> str:
    """``layers.0.attn`` (torch), ``layers_0/attn`` (linen) and ``layers/0/attn`` (NNX) meet here."""
    return "_".join(module).lower()


def _index(leaves: Mapping[ParamPath, Shape]) -> dict[str, dict[str, list[tuple[ParamPath, Shape]]]]:
    """Target leaves by module key and leaf name (see ``_LeafIndex``)."""
    index: dict[str, dict[str, list[tuple[ParamPath, Shape]]]] = {}
    for path, shape in leaves.items():
        module = path[1:-1] if path[0] == "batch_stats" else path[:-1]  # linen's collection is not a module
        index.setdefault(_module_key(module), {}).setdefault(path[-1], []).append((path, tuple(shape)))
    return index


def _kernel_axes(ndim: int) -> tuple[int, ...]:
    """torch ``[out, in]`` -> ``[in, out]``; ``[O, I, *spatial]`` -> ``[*spatial, I, O]`` (Conv, and
    ConvTranspose with ``transpose_kernel=True``, whose torch weight is ``[in, out, *spatial]``)."""
    return (1, 0) if ndim == 2 else (*range(2, ndim), 1, 0)


def _fits(moved: Shape, target: Shape, reshape: bool) -> bool:
    """Whether a piece of shape ``moved`` is the target leaf: the same shape or, where the rule allows a
    reshape, one axis split into heads (Flax's DenseGeneral) while the other axis stays in place."""
    return moved == target or (
        reshape
        and math.prod(moved) == math.prod(target)
        and (len(moved) == 1 or moved[0] == target[0] or moved[-1] == target[-1])
    )


class _Matcher:
    """Applies the rules to one model; collects moves and every problem, so the user sees them all.

    ``renames`` are the torch modules paired with numbered Flax modules (:func:`pair_modules`).
    """

    def __init__(
        self,
        params: Mapping[ParamPath, Shape],
        stats: Mapping[ParamPath, Shape],
        renames: Mapping[ParamPath, ParamPath] | None = None,
    ):
        self.params, self.stats = _index(params), _index(stats)
        self.renames = renames or {}
        self.targets = {**{p: tuple(s) for p, s in params.items()}, **{p: tuple(s) for p, s in stats.items()}}
        self.moves: list[Move] = []
        self.dropped: list[ParamPath] = []
        self.problems: list[str] = []

    def leaf(self, index: _LeafIndex, module: ParamPath, names: Sequence[str]) -> list[tuple[ParamPath, Shape]]:
        """The target leaves named any of ``names`` in the module that ``module`` (a torch module path) is."""
        leaves = index.get(_module_key(self.flax_module(module)))
        if leaves is None and module and module[-1] == "out_proj":  # nn.MultiheadAttention's output Linear
            leaves = index.get(_module_key((*self.flax_module(module[:-1]), "out")))
        return [found for n in names for found in (leaves or {}).get(n, ())]

    def flax_module(self, module: ParamPath) -> ParamPath:
        """The Flax module a torch module path names: its longest paired prefix renamed, else itself.

        >>> matcher = _Matcher({}, {}, {("blocks", "0"): ("Block_0",)})
        >>> matcher.flax_module(("blocks", "0", "fc1")), matcher.flax_module(("head",))
        (('Block_0', 'fc1'), ('head',))
        """
        for n in range(len(module), 0, -1):
            flax = self.renames.get(module[:n])
            if flax is not None:
                return (*flax, *module[n:])
        return module

    def add(
        self,
        source: ParamPath,
        shape: Shape,
        found: list[tuple[ParamPath, Shape]],
        axes: tuple[int, ...] = (),
        part: int = 0,
        parts: int = 1,
        reshape: bool = False,
    ) -> None:
        """The move of ``source`` (or its ``part``) to the one target ``found``, or the problem with it."""
        name = f"{path_to_name(source)} {list(shape)}"
        if not found:
            self.problems.append(f"{name}: no target leaf")
            return
        if len(found) > 1:
            self.problems.append(f"{name}: ambiguous, fits " + ", ".join("/".join(p) for p, _ in found))
            return
        ((target, target_shape),) = found
        piece = (shape[0] // parts, *shape[1:]) if parts > 1 else shape
        moved = tuple(piece[a] for a in axes) if axes else piece
        if not _fits(moved, target_shape, reshape):
            how = f" after transpose {axes}" if axes else ""
            self.problems.append(
                f"{name}: target {'/'.join(target)} has shape {list(target_shape)}, expected {list(moved)}{how}"
            )
            return
        self.moves.append(Move(source, target, shape, target_shape, axes, part, parts))

    def match(self, source: ParamPath, shape: Shape) -> None:
        """Apply the rule for the kind of leaf ``source`` is."""
        module, leaf = source[:-1], source[-1]
        if leaf in DROPPED_LEAVES:
            self.dropped.append(source)
        elif leaf in ("running_mean", "running_var"):
            self.add(source, shape, self.leaf(self.stats, module, (leaf.removeprefix("running_"),)))
        elif leaf == "weight":
            self._match_weight(source, shape)
        elif leaf == "bias":
            self.add(source, shape, self.leaf(self.params, module, ("bias",)), reshape=True)
        elif leaf in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self._match_attention(source, shape)
        elif leaf in ("bias_k", "bias_v"):
            self.problems.append(
                f"{path_to_name(source)}: nn.MultiheadAttention(add_bias_kv=True) has no Flax counterpart"
            )
        else:
            self.add(source, shape, self.leaf(self.params, module, (leaf,)))

    def _match_weight(self, source: ParamPath, shape: Shape) -> None:
        """A kernel (Linear, Conv) where the module has one and the weight is a matrix or more; else a
        LayerNorm/BatchNorm ``scale``, an Embed ``embedding``, or a leaf named ``weight`` too."""
        module = source[:-1]
        kernel = self.leaf(self.params, module, ("kernel",))
        if kernel and len(shape) >= 2:
            self.add(source, shape, kernel, _kernel_axes(len(shape)), reshape=len(shape) == 2)
        else:
            self.add(source, shape, self.leaf(self.params, module, ("scale", "embedding", "weight")))

    def _match_attention(self, source: ParamPath, shape: Shape) -> None:
        """nn.MultiheadAttention's projections: packed (``in_proj_*``, three parts) or one per q/k/v."""
        module, leaf = source[:-1], source[-1]
        if leaf in ("in_proj_weight", "in_proj_bias"):
            kind = leaf.removeprefix("in_proj_").replace("weight", "kernel")
            for part, name in enumerate(QKV):
                self.add(
                    source,
                    shape,
                    self.leaf(self.params, (*module, name), (kind,)),
                    (1, 0) if kind == "kernel" else (),
                    part,
                    3,
                    reshape=True,
                )
        else:
            name = QKV["qkv".index(leaf[0])]
            self.add(source, shape, self.leaf(self.params, (*module, name), ("kernel",)), (1, 0), reshape=True)

    def unmatched_targets(self) -> list[str]:
        """The target leaves no move reaches, each as a problem."""
        hit = {m.target for m in self.moves}
        return [f"{'/'.join(p)} {list(s)}: no torch tensor" for p, s in self.targets.items() if p not in hit]


# ----------------------------------------------------------------------------- numbered Flax modules

#: linen's names for the modules it numbers: ``Dense_0`` (by class), ``layers_0`` (a list in ``setup``).
_NUMBERED = re.compile(r"(.+?)_(\d+)")
#: The pairings of one place's modules tried before the match is refused as too ambiguous to check.
_MAX_TRIES = 100_000
#: The most (torch module, Flax module) pairs tried to say which torch modules fit none.
_MAX_WHY = 10_000
#: torch leaves of an attention module whose Flax counterparts are in its child modules ``query``, ...
_QKV_LEAVES = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: A child module, by its path relative to its parent: a name, or a container's name and a position
#: in it (torch's ModuleList and Sequential, NNX's lists: ``layers.0``), the container looked through.
_Child = tuple[str, ...]


def _children(leaves: Mapping[ParamPath, Any]) -> dict[_Child, dict[ParamPath, Any]]:
    """The child modules of a place (``leaves`` by path relative to it), in order, each with its leaves by
    path relative to it; a container holding numbered modules only is looked through.

    >>> list(_children({("blocks", "0", "fc", "weight"): 1, ("blocks", "1", "fc", "weight"): 1, ("w",): 1}))
    [('blocks', '0'), ('blocks', '1')]
    """
    groups: dict[str, dict[ParamPath, Any]] = {}
    for path, value in leaves.items():
        if len(path) > 1:
            groups.setdefault(path[0], {})[path[1:]] = value
    children: dict[_Child, dict[ParamPath, Any]] = {}
    for name, inner in groups.items():
        if all(len(p) > 1 and p[0].isdigit() for p in inner):
            children.update({(name, *child): below for child, below in _children(inner).items()})
        else:
            children[(name,)] = inner
    return children


def _opened(
    left: Sequence[_Child], children: Mapping[_Child, Mapping[ParamPath, Any]]
) -> tuple[list[_Child], dict[_Child, Mapping[ParamPath, Any]]] | None:
    """The torch modules ``left`` with every one that holds no tensor of its own replaced by its modules, in
    order, down to modules that do, and the leaves of each; None when none is opened.

    >>> _opened([("b",), ("head",)], {("b",): {("ln", "weight"): (2,), ("fc", "weight"): (2, 2)},
    ...                               ("head",): {("weight",): (2, 2)}})[0]
    [('b', 'ln'), ('b', 'fc'), ('head',)]
    """
    opened: dict[_Child, Mapping[ParamPath, Any]] = {}
    for child in left:
        below = children[child]
        if any(len(p) == 1 for p in below):
            opened[child] = below
        else:
            inner = _children(below)
            deeper = _opened(list(inner), inner)
            order, leaves = deeper if deeper else (list(inner), inner)
            opened.update({child + c: leaves[c] for c in order})
    return None if list(opened) == list(left) else (list(opened), {**children, **opened})


def _opened_families(
    families: Mapping[_Child, Sequence[tuple[tuple[int, ...], _Child]]],
    children: Mapping[_Child, Mapping[ParamPath, Any]],
) -> tuple[dict[_Child, list[tuple[tuple[int, ...], _Child]]], dict[_Child, Mapping[ParamPath, Any]]] | None:
    """The numbered Flax modules with every one that holds no leaf of its own replaced by its modules: a
    family for each path of family names (``Block/Dense``), its members in the order of their numbers along
    the path (``Block_0/Dense_1`` before ``Block_1/Dense_0``), and the leaves of each; None when none is opened.

    >>> opened, _ = _opened_families({("Block",): [((0,), ("Block_0",))]},
    ...     {("Block_0",): {("Dense_0", "kernel"): (2, 2), ("Dense_1", "kernel"): (2, 2)}})
    >>> opened
    {('Block', 'Dense'): [((0, 0), ('Block_0', 'Dense_0')), ((0, 1), ('Block_0', 'Dense_1'))]}
    """
    opened: dict[_Child, list[tuple[tuple[int, ...], _Child]]] = {}
    leaves: dict[_Child, Mapping[ParamPath, Any]] = {}
    changed = False
    for family, members in families.items():
        for number, child in members:
            below = children[child]
            if any(len(p) == 1 for p in below):
                opened.setdefault(family, []).append((number, child))
                leaves[child] = below
                continue
            changed = True
            inner = _children(below)
            inner_families: dict[_Child, list[tuple[tuple[int, ...], _Child]]] = {}
            for c in inner:
                numbered = _family(c)
                key, n = (numbered[0], (numbered[1],)) if numbered else (c, ())
                inner_families.setdefault(key, []).append((n, c))
            deeper = _opened_families(inner_families, inner)
            for key, inner_members in (deeper[0] if deeper else inner_families).items():
                opened.setdefault(family + key, []).extend((number + n, child + c) for n, c in inner_members)
            leaves.update({child + c: b for c, b in (deeper[1] if deeper else inner).items()})
    return (opened, {**children, **leaves}) if changed else None


def _family(child: _Child) -> tuple[_Child, int] | None:
    """A numbered module's family and number (``Dense_3``: ``Dense``, 3; NNX's ``layers/3``: ``layers``, 3).

    >>> _family(("Dense_3",)), _family(("layers", "3")), _family(("head",))
    ((('Dense',), 3), (('layers',), 3), None)
    """
    if child[-1].isdigit():
        return child[:-1], int(child[-1])
    numbered = _NUMBERED.fullmatch(child[-1]) if len(child) == 1 else None
    return None if numbered is None else ((numbered[1],), int(numbered[2]))


def _torch_keys(child: _Child, leaves: Mapping[ParamPath, Any]) -> set[str]:
    """The module keys the rules look up for the torch tensors under ``child``, as :class:`_Matcher` does."""
    keys = set()
    for path in leaves:
        module = (*child, *path[:-1])
        keys.add(_module_key(module))
        if path[-1] in _QKV_LEAVES:
            keys.update(_module_key((*module, name)) for name in QKV)
        if module[-1] == "out_proj":
            keys.add(_module_key((*module[:-1], "out")))
    return keys


def _flax_keys(child: _Child, leaves: Mapping[ParamPath, Any]) -> set[str]:
    return {_module_key((*child, *path[:-1])) for path in leaves}


def pair_modules(
    sources: Mapping[ParamPath, Shape],
    params: Mapping[ParamPath, Shape],
    stats: Mapping[ParamPath, Shape] | None = None,
) -> Paired:
    """Which torch module (of ``sources``) each numbered Flax module (of ``params`` and ``stats``) is, where no
    name says (torch path -> Flax path), why any such module is left unpaired, and which pairs the shapes
    cannot confirm (:class:`SameShapes`).

    At each place of the model, the torch modules no Flax name meets are dealt to the numbered Flax families
    there by an order-preserving pairing, in order of definition: the torch modules in the torch model's
    order, each family taking its members in number order. The pairing is kept when it is the only
    order-preserving one under which every tensor of each pair fits its leaf.

    >>> paired = pair_modules({("fc1", "weight"): (3, 2), ("fc2", "weight"): (1, 3)},
    ...                       {("Dense_0", "kernel"): (2, 3), ("Dense_1", "kernel"): (3, 1)})
    >>> paired.renames, paired.problems, paired.same_shapes
    ({('fc1',): ('Dense_0',), ('fc2',): ('Dense_1',)}, [], [])
    >>> [same.flax for same in pair_modules({("fc1", "weight"): (3, 3), ("fc2", "weight"): (3, 3)},
    ...                                     {("Dense_0", "kernel"): (3, 3), ("Dense_1", "kernel"): (3, 3)}).same_shapes]
    [(('Dense_0',), ('Dense_1',))]
    """
    flax = {p: (s, False) for p, s in params.items()}
    flax.update({p[1:]: (s, True) for p, s in (stats or {}).items()})  # linen's collection is not a module
    pairing = _Pairing()
    pairing.pair((), (), {p: tuple(s) for p, s in sources.items()}, flax)
    return Paired(pairing.renames, pairing.problems, pairing.same_shapes)


#: A place's numbered Flax modules no torch name meets: by family (``Dense``; ``Block/Dense`` once looked
#: into), each member with its number (``(0,)``; ``(0, 1)`` for ``Block_0/Dense_1``).
_Families = dict[_Child, list[tuple[tuple[int, ...], _Child]]]
#: One way to see a place for dealing: the torch modules in order and the leaves of each, the Flax families
#: and the leaves of each member.
_View = tuple[
    tuple[Sequence[_Child], Mapping[_Child, Mapping[ParamPath, Any]]],
    tuple[Mapping[_Child, Sequence[tuple[tuple[int, ...], _Child]]], Mapping[_Child, Mapping[ParamPath, Any]]],
]


class _Pairing:
    """Pairs one model's modules, place by place; collects the pairs and every reason a place is left unpaired."""

    def __init__(self) -> None:
        self.renames: dict[ParamPath, ParamPath] = {}
        self.problems: list[str] = []
        self.same_shapes: list[SameShapes] = []

    def pair(
        self,
        torch_at: ParamPath,
        flax_at: ParamPath,
        torch_leaves: Mapping[ParamPath, Shape],
        flax_leaves: Mapping[ParamPath, tuple[Shape, bool]],
    ) -> None:
        """Pair the modules below ``torch_at`` and ``flax_at`` (a place the two models share): those that
        meet by name are looked into, the rest dealt by order."""
        torch_children, flax_children = _children(torch_leaves), _children(flax_leaves)
        left = self._unnamed_torch(torch_at, flax_at, torch_children, flax_children)
        families = _unnamed_families(torch_children, flax_children)
        if not (left and families):
            return
        (torch_left, torch_below), (flax_families, flax_below) = _view(left, torch_children, families, flax_children)
        ordered = [[c for _, c in sorted(members)] for _, members in sorted(flax_families.items())]
        why = self._deal(torch_at, flax_at, list(torch_left), ordered, torch_below, flax_below)
        if why is not None:
            self.problems.append(why)

    def _unnamed_torch(
        self,
        torch_at: ParamPath,
        flax_at: ParamPath,
        torch_children: Mapping[_Child, Mapping[ParamPath, Any]],
        flax_children: Mapping[_Child, Mapping[ParamPath, Any]],
    ) -> list[_Child]:
        """The torch modules here that no Flax name meets, in order; one that a Flax module meets by its own
        name is paired inside (what is numbered in it) on the way."""
        flax_keys = set().union(*(_flax_keys(c, below) for c, below in flax_children.items()))
        by_name = {_module_key(c): c for c in flax_children}
        left = []
        for child, below in torch_children.items():
            if not _torch_keys(child, below) & flax_keys:
                left.append(child)
            elif _module_key(child) in by_name:
                named = by_name[_module_key(child)]
                self.pair((*torch_at, *child), (*flax_at, *named), below, flax_children[named])
        return left

    def _deal(
        self,
        torch_at: ParamPath,
        flax_at: ParamPath,
        left: Sequence[_Child],
        families: Sequence[Sequence[_Child]],
        torch_children: Mapping[_Child, Mapping[ParamPath, Any]],
        flax_children: Mapping[_Child, Mapping[ParamPath, Any]],
    ) -> str | None:
        """Pair the torch modules ``left`` with the numbered Flax ``families`` where exactly one
        order-preserving pairing, in order of definition, fits; else leave them and say why."""
        fitted: dict[tuple[_Child, _Child], _Planned | None] = {}

        def fits(t: _Child, f: _Child) -> bool:
            if (t, f) not in fitted:
                fitted[(t, f)] = _fit(torch_children[t], flax_children[f])
            return fitted[(t, f)] is not None

        torch_names = ", ".join(path_to_name((*torch_at, *c)) for c in left)
        flax_members = [f for family in families for f in family]
        flax_names = ", ".join("/".join((*flax_at, *f)) for f in flax_members)
        where = f"torch modules {torch_names} (in order of definition) against numbered Flax modules {flax_names}"
        if len(left) != len(flax_members):
            return f"{where}: {len(left)} against {len(flax_members)}, so no order pairs them"
        try:
            ways = self._ways(left, families, fits)
        except (_TooMany, RecursionError):  # a place with more modules than are worth dealing one by one
            return f"{where}: too many orders to check; name the modules in a mapping file"
        if len(ways) != 1:
            return f"{where}: " + self._why_not(torch_at, flax_at, left, families, ways, fits)
        for t, f in ways[0]:
            self._keep(torch_at + t, flax_at + f, fitted[(t, f)])
        self.same_shapes.extend(
            same.under(torch_at, flax_at) for same in _same_shapes(ways[0], families, flax_children)
        )
        return None

    def _keep(self, torch_module: ParamPath, flax_module: ParamPath, inside: _Planned | None) -> None:
        """Record the pair, and what was paired inside the two modules, named from the top."""
        self.renames[torch_module] = flax_module
        if inside is None:
            return
        self.renames.update({torch_module + tp: flax_module + fp for tp, fp in inside.renames.items()})
        self.same_shapes.extend(same.under(torch_module, flax_module) for same in inside.same_shapes)

    def _ways(
        self, left: Sequence[_Child], families: Sequence[Sequence[_Child]], fits: Callable[[_Child, _Child], bool]
    ) -> list[list[tuple[_Child, _Child]]]:
        """Up to two ways to deal ``left`` in order to the families in their orders, every pair fitting."""

        tries = iter(range(_MAX_TRIES))

        @functools.cache
        def ways(taken: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
            if next(tries, None) is None:
                raise _TooMany
            i = sum(taken)
            if i == len(left):
                return ((),)
            found: list[tuple[int, ...]] = []
            for k, family in enumerate(families):
                if taken[k] < len(family) and fits(left[i], family[taken[k]]):
                    after = (*taken[:k], taken[k] + 1, *taken[k + 1 :])
                    found += [(k, *rest) for rest in ways(after)[: 2 - len(found)]]
                    if len(found) == 2:
                        break
            return tuple(found)

        dealt = []
        for way in ways(tuple(0 for _ in families)):
            taken = [0] * len(families)
            pairs = []
            for t, k in zip(left, way, strict=True):
                pairs.append((t, families[k][taken[k]]))
                taken[k] += 1
            dealt.append(pairs)
        return dealt

    @staticmethod
    def _why_not(
        torch_at: ParamPath,
        flax_at: ParamPath,
        left: Sequence[_Child],
        families: Sequence[Sequence[_Child]],
        ways: Sequence[Sequence[tuple[_Child, _Child]]],
        fits: Callable[[_Child, _Child], bool],
    ) -> str:
        """Why no pairing, or more than one, was found: the two pairings, or the misfits of the plain order."""

        def pairs(way: Sequence[tuple[_Child, _Child]]) -> str:
            return ", ".join(f"{path_to_name((*torch_at, *t))} -> {'/'.join((*flax_at, *f))}" for t, f in way)

        if ways:
            return f"more than one order fits ({pairs(ways[0])}; or {pairs(ways[1])}); name them in a mapping file"
        if len(families) > 1:
            members = [f for family in families for f in family]
            if len(left) * len(members) > _MAX_WHY:
                return "no order makes every tensor fit"
            alone = [t for t in left if not any(fits(t, f) for f in members)]
            return "no order makes every tensor fit" + (
                f"; the tensors of {', '.join(path_to_name(torch_at + t) for t in alone)} fit none of them"
                if alone
                else ""
            )
        misfits = [(t, f) for t, f in zip(left, families[0], strict=True) if not fits(t, f)]
        return "in order of definition, the tensors of " + pairs(misfits) + " do not fit"


class _TooMany(Exception):
    """More pairings of one place's modules than are worth trying."""


def _fit(
    torch_leaves: Mapping[ParamPath, Shape], flax_leaves: Mapping[ParamPath, tuple[Shape, bool]]
) -> _Planned | None:
    """The plan inside two modules (what is paired in them) when every tensor of the one fits a leaf of the
    other; None when not."""
    params = {p: s for p, (s, stat) in flax_leaves.items() if not stat}
    stats = {("batch_stats", *p): s for p, (s, stat) in flax_leaves.items() if stat}
    planned = _plan(torch_leaves, params, stats)
    return None if planned.problems else planned


def _unnamed_families(
    torch_children: Mapping[_Child, Mapping[ParamPath, Any]], flax_children: Mapping[_Child, Mapping[ParamPath, Any]]
) -> _Families:
    """The numbered Flax modules here that no torch name meets, by family.

    >>> _unnamed_families({("fc",): {("weight",): (2, 2)}},
    ...                   {("Dense_0",): {("kernel",): (2, 2)}, ("fc",): {("kernel",): (2, 2)}})
    {('Dense',): [((0,), ('Dense_0',))]}
    """
    torch_keys = set().union(*(_torch_keys(c, below) for c, below in torch_children.items()))
    families: _Families = {}
    for child, below in flax_children.items():
        family = _family(child)
        if family is not None and not _flax_keys(child, below) & torch_keys:
            families.setdefault(family[0], []).append(((family[1],), child))
    return families


def _view(
    left: Sequence[_Child],
    torch_children: Mapping[_Child, Mapping[ParamPath, Any]],
    families: _Families,
    flax_children: Mapping[_Child, Mapping[ParamPath, Any]],
) -> _View:
    """How the place is seen for dealing: each side as it stands or with its modules that hold no tensor of
    their own looked into (:func:`_opened`, :func:`_opened_families`), chosen by :func:`_fewest_opened`.

    >>> (torch_left, _), (flax_families, _) = _view(
    ...     [("blocks", "0")], {("blocks", "0"): {("fc1", "weight"): (2, 2), ("fc2", "weight"): (2, 2)}},
    ...     {("Dense",): [((0,), ("Dense_0",)), ((1,), ("Dense_1",))]},
    ...     {("Dense_0",): {("kernel",): (2, 2)}, ("Dense_1",): {("kernel",): (2, 2)}})
    >>> torch_left, list(flax_families)
    ([('blocks', '0', 'fc1'), ('blocks', '0', 'fc2')], [('Dense',)])
    """
    # A model written as one function numbers every layer in one place where the other groups them in blocks.
    torch_sides = {False: (left, torch_children), True: _opened(left, torch_children)}
    flax_sides = {False: (families, flax_children), True: _opened_families(families, flax_children)}
    views: dict[tuple[bool, bool], _View] = {
        (t, f): (torch_side, flax_side)
        for t, torch_side in torch_sides.items()
        for f, flax_side in flax_sides.items()
        if torch_side is not None and flax_side is not None
    }
    even = [k for k, ((t_left, _), (fams, _)) in views.items() if len(t_left) == sum(map(len, fams.values()))]
    return views[_fewest_opened(even)]


def _fewest_opened(even: Sequence[tuple[bool, bool]]) -> tuple[bool, bool]:
    """Of the views (torch side looked into, Flax side looked into) whose modules come out even, the one that
    looks into the fewest sides; the modules as they stand where none comes out even.

    Why the fewest: looking into a block takes it for a mere container, which the modules as they stand do
    not assume. Why this decides without an order: looking into a side never lowers its count, so the two
    views that look into one side each both come out even only where the view that looks into neither does
    (torch T <= T', Flax F <= F': T' = F and T = F' give T = T' = F = F'), which is then chosen; the other
    two views are one each. Where none comes out even, the modules as they stand are dealt and the
    refusal counts them as the user wrote them.

    >>> _fewest_opened([(True, True), (False, False)]), _fewest_opened([(False, True)]), _fewest_opened([])
    ((False, False), (False, True), (False, False))
    """
    return min(even, key=sum, default=(False, False))


def _same_shapes(
    way: Sequence[tuple[_Child, _Child]],
    families: Sequence[Sequence[_Child]],
    flax_children: Mapping[_Child, Mapping[ParamPath, Any]],
) -> list[SameShapes]:
    """The members of each family that have the same leaves and shapes as another member, with the torch
    modules ``way`` pairs them with: the order of definition alone put them so.

    >>> kernel = {("kernel",): ((3, 3), False)}
    >>> _same_shapes([(("fc1",), ("Dense_0",)), (("fc2",), ("Dense_1",)), (("fc3",), ("Dense_2",))],
    ...              [[("Dense_0",), ("Dense_1",), ("Dense_2",)]],
    ...              {("Dense_0",): kernel, ("Dense_1",): {("kernel",): ((3, 1), False)}, ("Dense_2",): kernel})
    [SameShapes(flax=(('Dense_0',), ('Dense_2',)), torch=(('fc1',), ('fc3',)))]
    """
    torch_of = {f: t for t, f in way}
    found = []
    for family in families:
        alike: dict[tuple[tuple[ParamPath, Any], ...], list[_Child]] = {}
        for member in family:
            alike.setdefault(tuple(sorted(flax_children[member].items())), []).append(member)
        found += [SameShapes(tuple(ms), tuple(torch_of[m] for m in ms)) for ms in alike.values() if len(ms) > 1]
    return found
