"""What one task of a distributed call receives: its part of the problem and of the draws.

A call is split into tasks over blocks of the flattened (batch, head) axis
``G``, of the query axis and (for methods whose output merges over keys) of
the key axis. The parameters are resolved and the randomness drawn for the
whole problem; :func:`take_part` then cuts each entry to the task's part as
the method's :class:`~eff_attn.registry.Sharding` declares. Nothing here
imports dask.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..interop import array_module
from ..registry import NotSupportedError, Sharding

__all__ = ["Part", "undeclared_entries", "check_declared", "take_part", "split_value"]


@dataclass(frozen=True)
class Part:
    """One task's share of a call.

    Attributes
    ----------
    slices : int64 ndarray of shape (G_part,)
        The task's (batch, head) slices, as C-order indices into ``G``.
    queries : slice
        The task's rows of the query axis.
    keys : slice
        The task's rows of the key axis.
    """

    slices: np.ndarray
    queries: slice
    keys: slice


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, str, numbers.Number, np.generic)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return False


def undeclared_entries(sharding: Sharding, kwargs: dict) -> list[str]:
    """Names of the array or object entries of ``kwargs`` that ``sharding`` neither splits nor shares."""
    declared = set(sharding.split) | set(sharding.shared)
    return sorted(name for name, value in kwargs.items() if name not in declared and not _is_plain(value))


def check_declared(method, kwargs: dict) -> None:
    """Refuse a call whose backend arguments hold entries the method's sharding does not declare.

    Raises
    ------
    NotSupportedError
        Naming the entries: without a declaration, a task cannot know which
        part of them is its own, and guessing could change the result.
    """
    missing = undeclared_entries(method.sharding, kwargs)
    if missing:
        raise NotSupportedError(
            f"method {method.name!r} passes {', '.join(map(repr, missing))} to its backends, but its "
            "Method.sharding neither splits nor shares them, so eff_attn.dist cannot tell which part each "
            "task needs; declare them (CONTRIBUTING.md, 'Distributed execution')"
        )


def split_value(value, axes, part: Part, G: int):
    """The task's part of one entry.

    Parameters
    ----------
    value : array, tuple or list of arrays, None, or any object
        None stays None.
    axes : tuple of {"slice", "query", None}, or callable
        The roles of ``value``'s leading axes, or ``axes(value, part) -> value``.
    part : Part
    G : int
        Slices of the whole call; a ``"slice"`` axis has length ``G`` or 1
        (shared by every slice).
    """
    if value is None:
        return None
    if callable(axes):
        return axes(value, part)
    if isinstance(value, (tuple, list)):
        return type(value)(split_value(v, axes, part, G) for v in value)
    xp = array_module(value)
    for axis, role in enumerate(axes):
        if role == "slice":
            if value.shape[axis] == 1:
                continue
            if value.shape[axis] != G:
                raise ValueError(f"an entry declared per slice has length {value.shape[axis]} on axis {axis}, "
                                 f"not G={G} or 1")
            value = xp.take(value, xp.asarray(part.slices), axis=axis)
        elif role == "query":
            value = value[(slice(None),) * axis + (part.queries,)]
        elif role is not None:
            raise ValueError(f"unknown axis role {role!r}; use 'slice', 'query' or None")
    return value


def take_part(sharding: Sharding, kwargs: dict, part: Part, G: int) -> dict:
    """The backend keyword arguments of one task: declared entries cut to ``part``, the rest whole."""
    return {
        name: split_value(value, sharding.split[name], part, G) if name in sharding.split else value
        for name, value in kwargs.items()
    }
