"""A search space: dotted config keys with a range or a list of choices, checked against the run config
before any trial runs, as Optuna distributions.

    optim.lr: {low: 1e-5, high: 1e-3, log: true}     a float range (log-uniform)
    train.epochs: {low: 1, high: 3}                  an integer range (both ends integers)
    method.lora.r: [4, 8, 16]                        choices

Every error names `search.space.<key>`: a key the config does not have, an empty range, a log range
that reaches zero, a choice or an end of a range that the config itself would refuse, a range or a
value the field's type does not take or beyond its ceiling (`tune/bounds.py`), a grid of more than
`MAX_GRID` points or a grid point the config refuses (`check_point`). All of it is checked before any trial runs.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import types
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import numpy as np
import optuna
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from strop.core.config import RunConfig, load_config
from strop.core.config_file import EXP_FLOAT
from strop.core.errors import ConfigError
from strop.tune import bounds

RANGE_KEYS = {"low", "high", "log", "step"}
NOT_SEARCHABLE = {"name", "output_dir", "search", "stages"}
Scalar = None | bool | int | float | str
MAX_GRID = 1_000  # grid points: each is a whole run, and each is checked (~2 ms) before the search


@dataclass(frozen=True)
class Param:
    key: str
    distribution: optuna.distributions.BaseDistribution

    def grid(self) -> list[Scalar]:
        """Every value of the parameter, for the grid sampler."""
        d = self.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, optuna.distributions.IntDistribution):
            if (d.high - d.low) // d.step + 1 > MAX_GRID:
                raise ConfigError(f"search.space.{self.key}: {_grid_too_big(self.key)}")
            return list(range(d.low, d.high + 1, d.step))
        if isinstance(d, optuna.distributions.FloatDistribution) and d.step is not None:
            n = int(round((d.high - d.low) / d.step))
            if n + 1 > MAX_GRID:
                raise ConfigError(f"search.space.{self.key}: {_grid_too_big(self.key)}")
            return [float(round(d.low + i * d.step, 12)) for i in range(n + 1)]
        raise ConfigError(
            f"search.space.{self.key}: the grid sampler needs a list of values, an integer range or a "
            "float range with a step"
        )


def parse_space(space: dict[str, Any], base: dict) -> list[Param]:
    """The space of `search.space` (or `--space`), each key and value checked against `base` (the run
    config as a dict)."""
    if not space:
        raise ConfigError(
            "search.space: nothing to search; give at least one key, e.g. "
            "search.space: {optim.lr: {low: 1e-5, high: 1e-3, log: true}} or --space 'optim.lr=[1e-4, 3e-4]'"
        )
    params = []
    for key, spec in space.items():
        field = _field(str(key))
        param = Param(str(key), _distribution(str(key), spec, field))
        for value in _probe_values(param.distribution):
            check_value(base, param.key, value)
        params.append(param)
    return params


def grid_points(params: list[Param]) -> list[dict[str, Scalar]]:
    """Every combination of the parameters' values (at most `MAX_GRID`)."""
    values = [p.grid() for p in params]
    if math.prod(map(len, values)) > MAX_GRID:
        raise ConfigError(f"search.space: {_grid_too_big(', '.join(p.key for p in params))}")
    return [dict(zip([p.key for p in params], combo, strict=True)) for combo in itertools.product(*values)]


def apply_params(raw: dict, params: dict[str, Any]) -> dict:
    """A copy of the config dict `raw` with each dotted key set to its value."""
    out = copy.deepcopy(raw)
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def check_value(base: dict, key: str, value: Any) -> None:
    """The config with `key` set to `value` is valid, else an error naming search.space.<key>."""
    check_point(base, {key: value})


def check_point(base: dict, values: dict[str, Any]) -> None:
    """The config with each key set to its value is valid, else an error naming the search.space key
    the config's own error names (or every key of `values` when it names none of them)."""
    try:
        load_config(apply_params(base, values))
    except ConfigError as e:
        raise ConfigError(space_error(values, problems(e))) from None


def problems(e: ConfigError) -> str:
    """A config error (`invalid config (SOURCE):` and one indented line per problem) as one line."""
    lines = [ln.strip().removeprefix("(top level): ") for ln in str(e).splitlines()[1:]]
    return "; ".join(lines) or str(e)


def space_error(values: dict[str, Any], error: str, what: str = "made the config invalid") -> str:
    """An error line of a config (or of a run) with `values` in place, said as the search space's:
    `search.space.KEY: the value V made the config invalid: ERROR` when the error begins with a key of
    `values` (a check the config or the run makes of that key) or there is one key, else naming all."""
    blamed = blamed_key(error, values)
    if blamed is None and len(values) == 1:
        blamed = next(iter(values))
    if blamed is not None:
        return f"search.space.{blamed}: the value {values[blamed]!r} {what}: {error}"
    said = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return f"search.space ({', '.join(values)}): the values {said} {what}: {error}"


def blamed_key(error: str, values: dict[str, Any]) -> str | None:
    """The key of `values` that `error` (a config's or a run's error line) begins with, if any: strop's
    errors begin with the dotted key at fault (`train.batch_tokens: ...`, `train.batch_tokens (64)
    must ...`); advice later in a line (`lower optim.lr`) blames nothing."""
    head = re.match(r"[\w.]+", error.strip())
    if head is None:
        return None
    for key in sorted(values, key=len, reverse=True):
        if head.group(0) == key or head.group(0).startswith(f"{key}."):
            return key
    return None


def _field(key: str) -> FieldInfo:
    """The config field a dotted key names, else an error naming search.space.<key>."""
    parts = key.split(".")
    if parts[0] in NOT_SEARCHABLE:
        raise ConfigError(f"search.space.{key}: {parts[0]} cannot be searched")
    model: type[BaseModel] | None = RunConfig
    field = None
    for i, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(fields)) if fields else "no keys below it"
            raise ConfigError(f"search.space.{key}: unknown config key ({where} has {known})")
        field = fields[part]
        model = _section(field.annotation)
        if model is None and i < len(parts) - 1:
            raise ConfigError(f"search.space.{key}: {'.'.join(parts[: i + 1])} is a value, not a section")
    if model is not None:
        raise ConfigError(
            f"search.space.{key}: {key} is a section; search one of its keys "
            f"({', '.join(sorted(model.model_fields))})"
        )
    assert field is not None  # a key has at least one part
    return field


def _section(annotation) -> type[BaseModel] | None:
    """The config section a field holds (through `X | None`), or None for a plain value."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _number(v: Any) -> Any:
    """`1e-4` as YAML 1.1 (PyYAML) reads it, a string, as the float a user meant."""
    return float(v) if isinstance(v, str) and EXP_FLOAT.fullmatch(v.strip()) else v


def _distribution(key: str, spec: Any, field: FieldInfo) -> optuna.distributions.BaseDistribution:
    where = f"search.space.{key}"
    if isinstance(spec, list):
        spec = [_number(c) for c in spec]
    elif isinstance(spec, dict):
        spec = {k: _number(v) for k, v in spec.items()}
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        bad = [c for c in spec if not isinstance(c, (bool, int, float, str)) and c is not None]
        if bad:
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"{where}: a choice is listed twice in {spec}")
        for choice in spec:
            bounds.check_choice(key, field, choice)
        return optuna.distributions.CategoricalDistribution(spec)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected {{low, high}} (with log: true or a step if wanted) or a list of choices, "
            f"got {spec!r}"
        )
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (a range has low, high, log, step)")
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"{where}.{name}: expected a number, got {v!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    if low > high:
        raise ConfigError(f"{where}: an empty range (low {low} is above high {high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low {low}")
    if log and step is not None:
        raise ConfigError(f"{where}: give log or step, not both")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}.step: expected a number above 0, got {step}")
    bounds.check_range(key, field, low, high, step)
    if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)


def _probe_values(d: optuna.distributions.BaseDistribution) -> list[Scalar]:
    """The values checked against the config before the search: every choice, both ends of a range."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices)
    assert isinstance(d, (optuna.distributions.IntDistribution, optuna.distributions.FloatDistribution))
    ends = [d.low, d.high]
    if isinstance(d, optuna.distributions.FloatDistribution):
        ends = [float(x) for x in np.unique(ends)]
    return list(dict.fromkeys(ends))


def _grid_too_big(keys: str) -> str:
    return (
        f"the grid over {keys} has more than {MAX_GRID:,} points, one trial each; give fewer values "
        "(a list, or a larger step) or use sampler tpe or random"
    )
