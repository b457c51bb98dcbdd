"""What a search may give one config field: values of the field's own type, within a ceiling that keeps
one trial one run.

The config schema bounds few sizes from above (`train.max_steps` has only `ge=1`), so without a ceiling
a typo such as `high: 100000000000` starts a trial of 1e11 steps. Before any trial runs, each entry of
the space is held to:

- the field's type: an integer field takes integer ends, steps and choices (`1e12` and `2.0` are
  floats; write `1000000000000` or `2`); a true/false field or one with named values (`optim.schedule`)
  takes a list of choices, not a range;
- the field's own constraints (`data.val_fraction < 1`): both ends and every choice are validated as
  the config (`space.check_value`);
- where the schema sets no upper bound, a ceiling: `CEILINGS` for batch sizes, lengths and epochs,
  `INT_LIMIT`/`FLOAT_LIMIT` (in magnitude) for every other number.

Every error names `search.space.<key>` (and `.low`, `.high` or `.step` when one value is at fault).
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Le, Lt
from pydantic.fields import FieldInfo

from strop.core.errors import ConfigError

BATCH, LENGTH = 4_096, 2**20
CEILINGS: dict[str, int] = {
    "train.batch_size": BATCH,
    "train.grad_accum": BATCH,
    "eval.batch_size": BATCH,
    "rl.prompts_per_step": BATCH,
    "rl.group_size": BATCH,
    "rl.mini_batch": BATCH,
    "data.max_length": LENGTH,
    "train.batch_tokens": LENGTH,
    "method.lora.r": 65_536,  # beyond the width of any model
    "data.augment.copies": 1_000,
    "train.epochs": 10_000,
    "train.seed": 2**32 - 1,  # numpy's seeds end here
}
INT_LIMIT = 1_000_000  # steps, intervals, counts: a million optimizer steps is already a long trial
FLOAT_LIMIT = 1_000_000  # rates, weights, coefficients; keeps every value far from overflow
Kind = Literal["int", "float", "bool", "named", "text", "other"]


def kind_of(field: FieldInfo) -> tuple[Kind, tuple]:
    """The field's kind (through `X | None`), and its allowed values when it names them (Literal)."""
    annotation = field.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    options = tuple(o for o in options if o is not type(None))
    if len(options) == 1:
        (t,) = options
        if get_origin(t) is Literal:
            return "named", get_args(t)
        for kind, python in (("bool", bool), ("int", int), ("float", float), ("text", str)):
            if t is python:
                return kind, ()  # type: ignore[return-value]
    return "other", ()


def check_range(key: str, field: FieldInfo, low: float, high: float, step: float | None) -> None:
    """A `{low, high[, step]}` range suits the field `key`: a number, integers for an integer field,
    both ends under the ceiling."""
    where = f"search.space.{key}"
    kind, names = kind_of(field)
    if kind == "bool":
        raise ConfigError(f"{where}: {key} is true or false; search it as a list of choices, [true, false]")
    if kind == "named":
        raise ConfigError(
            f"{where}: {key} takes one of {', '.join(map(str, names))}; search it as a list of choices"
        )
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}: {key} is not a number, so it has no range; give a list of choices")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and kind == "int" and not isinstance(v, int):
            raise ConfigError(
                f"{where}.{name}: {key} is an integer, got {v!r}; write it without a decimal point "
                "or exponent"
            )
        if name != "step" and v is not None:
            _check_ceiling(f"{where}.{name}", key, field, v)


def check_choice(key: str, field: FieldInfo, value: Any) -> None:
    """A choice suits the field `key`: an integer for an integer field, no true/false for a number,
    under the ceiling. Whether the config takes it is `space.check_value`'s to say."""
    where = f"search.space.{key}"
    kind, _ = kind_of(field)
    if kind in ("int", "float") and isinstance(value, bool):
        raise ConfigError(f"{where}: {key} is a number, got the choice {value!r}")
    if kind == "int" and isinstance(value, float):
        raise ConfigError(
            f"{where}: {key} is an integer, got the choice {value!r}; write it without a decimal point "
            "or exponent"
        )
    if kind in ("int", "float") and isinstance(value, (int, float)):
        _check_ceiling(where, key, field, value)


def ceiling(key: str, field: FieldInfo) -> int | None:
    """The largest magnitude a search may try for `key`; None when the schema bounds it itself."""
    if any(isinstance(m, (Le, Lt)) for m in field.metadata):
        return None
    if key in CEILINGS:
        return CEILINGS[key]
    return INT_LIMIT if kind_of(field)[0] == "int" else FLOAT_LIMIT


def _check_ceiling(where: str, key: str, field: FieldInfo, value: float) -> None:
    limit = ceiling(key, field)
    if limit is not None and abs(value) > limit:
        raise ConfigError(
            f"{where}: {value!r} is beyond what a search tries for {key} (at most {limit:,} in "
            "magnitude; every trial is a whole run)"
        )
