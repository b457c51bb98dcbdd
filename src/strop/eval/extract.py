"""Answer extraction: the part of a free-text output that exact match compares.

`gsm8k` takes the number after the final "#### " (GSM8K's answer line, strict as in lm-eval's
strict-match); `last_number` takes the last number in the text (lm-eval's flexible-extract);
`regex:PATTERN` takes group 1 of the last match (or the whole match when the pattern has no group).
Numbers are normalized (thousands separators, currency signs and trailing zeros go), so "$1,200.00"
and "1200" match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import overload

from strop.core.errors import ConfigError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")

Extractor = Callable[[str], str | None]


def normalize_number(text: str) -> str:
    """'1,200.50' -> '1200.5', '$7' -> '7', '-0.0' -> '0'; non-numbers are returned stripped."""
    t = text.strip().replace(",", "").lstrip("$").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return text.strip()
    if value == int(value):
        return str(int(value))
    return repr(value)


def gsm8k(text: str) -> str | None:
    found = _GSM8K.findall(text)
    return normalize_number(found[-1]) if found else None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def regex(pattern: str) -> Extractor:
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if compiled.groups else m.group(0)).strip()

    return extract


@overload
def get_extractor(name: str) -> Extractor: ...
@overload
def get_extractor(name: None) -> None: ...
def get_extractor(name: str | None) -> Extractor | None:
    """The extractor a config names (eval.extract), or None for whole-text comparison."""
    if name is None:
        return None
    if name == "gsm8k":
        return gsm8k
    if name == "last_number":
        return last_number
    if name.startswith("regex:"):
        try:
            return regex(name[len("regex:") :])
        except re.error as e:
            raise ConfigError(f"eval.extract: invalid regular expression {name[6:]!r}: {e}") from None
    raise ConfigError(f"eval.extract: unknown extractor {name!r}; choose gsm8k, last_number or regex:PATTERN")
