"""The exceptions optstate raises: one base class, four kinds."""

from __future__ import annotations


class OptstateError(Exception):
    """Base class of every error optstate raises on purpose."""


class FormatError(OptstateError):
    """An input file or object is malformed, truncated, unsafe or inconsistent."""


class InputChangedError(FormatError):
    """An input file changed while a conversion read it."""


class UnsupportedError(OptstateError):
    """The state uses a feature that has no exact counterpart in the target."""


class MappingError(OptstateError):
    """Parameters cannot be matched by name, or their shapes or dtypes disagree."""


class MissingDependencyError(OptstateError, ImportError):
    """A framework adapter was used without its framework installed."""
