"""Config field value checks shared by the config validators (loss, trainer): one definition, plain Python, no imports
from the rest of the package, so every room may use it."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(condition: bool, field: str, value: Any, expectation: str) -> None:
    """ValueError naming the field and its value when `condition` is false."""
    if not condition:
        raise ValueError(f"{field} = {value!r}: {expectation}")
