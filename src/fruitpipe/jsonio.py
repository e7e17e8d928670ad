"""Strict JSON for every file fruitpipe writes: a value that is not a finite number (NaN, an infinity) is null,
never the bare `NaN` that strict parsers refuse."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (numpy's too) replaced by None, containers walked."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # a numpy scalar
        return finite(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of finite(obj), refusing anything non-finite left over (allow_nan=False)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
