"""A request's input to one model: rows (one array, for a model with one input) or named
tensors (a mapping of input name to array, for any model), and the few things the core does
with either without knowing which: count the rows, take some of them, join several requests'
inputs into one batch, and tell whether two inputs can be joined.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

Tensors: TypeAlias = Mapping[str, NDArray[Any]]
Inputs: TypeAlias = NDArray[Any] | Tensors
"""Rows ``[N, ...]``, or named tensors whose first dimension is the row (batch) dimension."""


def row_count(x: Inputs) -> int:
    if isinstance(x, np.ndarray):
        return int(x.shape[0])
    return int(next(iter(x.values())).shape[0]) if x else 0


def take_rows(x: Inputs, rows: NDArray[np.intp]) -> Inputs:
    """The rows ``rows`` of every tensor, as contiguous arrays."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[rows])
    return {name: np.ascontiguousarray(tensor[rows]) for name, tensor in x.items()}


def signature(x: Inputs) -> Hashable:
    """What must match for two inputs to be joined into one batch (and for a checked fit to
    hold again): the names, the shapes after the rows and the types."""
    if isinstance(x, np.ndarray):
        return (x.shape[1:], x.dtype.str)
    return tuple(sorted((name, t.shape[1:], t.dtype.str) for name, t in x.items()))


def concatenate(parts: Sequence[Inputs]) -> Inputs:
    """Several inputs of one signature as one batch, in order."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, np.ndarray):
        return np.concatenate([p for p in parts if isinstance(p, np.ndarray)])
    return {name: np.concatenate([p[name] for p in parts if not isinstance(p, np.ndarray)]) for name in first}
