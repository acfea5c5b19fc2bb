"""What the pack's JSON files may hold where a number is expected: one predicate, shared by
the parsers of the cost model, its correction and the tuning file."""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any) -> bool:
    """An int or float that is finite; never a bool (JSON's true would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
