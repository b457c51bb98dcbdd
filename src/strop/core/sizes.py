"""Sizes as people write them: "12GB", "16 GiB", "800MB" (train.memory_limit)."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int | float) -> int | None:
    """ "12GB", "12 GiB", "800MB", a number of bytes, or "auto" (None: what the machine has free)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return int(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a size such as 12GB, 16GiB or 800MB, or auto; got {value!r}")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])
