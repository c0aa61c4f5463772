"""The matching rules: which leaf of a Flax model each tensor of a torch model is, and how it moves there.

A torch ``nn.Linear`` weight ``[out, in]`` is a Flax ``Dense`` kernel ``[in, out]``; a ``Conv2d``
weight ``[O, I, H, W]`` a ``Conv`` kernel ``[H, W, I, O]``; a LayerNorm ``weight`` a ``scale``;
``layers.0`` is ``layers_0`` (linen) or ``layers/0`` (NNX); BatchNorm's running statistics are
``batch_stats``, never optimizer state. A reshape instead of a transpose is silently wrong, and a
square layer passes every shape check, so the rules choose the move by the kind of layer (the
leaf's name), and shapes only confirm it. The result is a :class:`~.moves.Layout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ...errors import MappingError
from ...schema.state import ParamPath, path_to_name
from .moves import Layout, Move, Shape, problem_list

__all__ = ["DROPPED_LEAVES", "QKV", "match_layout", "plan_layout"]

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

    >>> layout, problems = plan_layout({("fc", "weight"): (3, 2), ("fc", "bias"): (3,)},
    ...                                {("fc", "kernel"): (2, 3), ("fc", "bias"): (3,)})
    >>> [(m.describe, m.target) for m in layout.moves], problems
    ([('transpose (1, 0)', ('fc', 'kernel')), ('as is', ('fc', 'bias'))], [])
    """
    matcher = _Matcher(params, stats or {})
    for source, shape in sources.items():
        matcher.match(source, tuple(shape))
    return Layout(tuple(matcher.moves), tuple(matcher.dropped)), matcher.problems + matcher.unmatched_targets()


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
    """Applies the rules to one model; collects moves and every problem, so the user sees them all."""

    def __init__(self, params: Mapping[ParamPath, Shape], stats: Mapping[ParamPath, Shape]):
        self.params, self.stats = _index(params), _index(stats)
        self.targets = {**{p: tuple(s) for p, s in params.items()}, **{p: tuple(s) for p, s in stats.items()}}
        self.moves: list[Move] = []
        self.dropped: list[ParamPath] = []
        self.problems: list[str] = []

    def leaf(self, index: _LeafIndex, module: ParamPath, names: Sequence[str]) -> list[tuple[ParamPath, Shape]]:
        """The target leaves named any of ``names`` in the module that ``module`` (a torch module path) is."""
        leaves = index.get(_module_key(module))
        if leaves is None and module and module[-1] == "out_proj":  # nn.MultiheadAttention's output Linear
            leaves = index.get(_module_key((*module[:-1], "out")))
        return [found for n in names for found in (leaves or {}).get(n, ())]

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
        hit = {m.target for m in self.moves}
        return [f"{'/'.join(p)} {list(s)}: no torch tensor" for p, s in self.targets.items() if p not in hit]
