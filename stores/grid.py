"""Grid expansion and the identity of a grid point.

A grid maps dotted config paths to lists of values; its points are every combination,
in the order of the paths (the last path varies fastest). A grid study enqueues one
trial per point and replicate, and records the point as ``masklab.grid_key``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``{a: [1, 2], b: [x]}`` -> ``[{a: 1, b: x}, {a: 2, b: x}]``."""
    paths = list(grid)
    return [dict(zip(paths, values)) for values in itertools.product(*(grid[p] for p in paths))]


def grid_key(point: Mapping[str, Any]) -> str:
    """The identity of a grid point (shared by its replicates), as the stores hold it."""
    return json.dumps(dict(sorted(point.items())), sort_keys=True)
