"""A search space: dotted config keys with a range or a list of choices, checked against the run config
before any trial runs, as Optuna distributions.

    optim.lr: {low: 1e-5, high: 1e-3, log: true}     a float range (log-uniform)
    train.epochs: {low: 1, high: 3}                  an integer range (both ends integers)
    method.lora.r: [4, 8, 16]                        choices

Every error names `search.space.<key>`: a key the config does not have, an empty range, a log range
that reaches zero, a choice or an end of a range that the config itself would refuse.
"""

from __future__ import annotations

import copy
import itertools
import math
import types
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import numpy as np
import optuna
from pydantic import BaseModel

from strop.core.config import RunConfig, load_config
from strop.core.config_file import EXP_FLOAT
from strop.core.errors import ConfigError

RANGE_KEYS = {"low", "high", "log", "step"}
NOT_SEARCHABLE = {"name", "output_dir", "search", "stages"}
Scalar = None | bool | int | float | str


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
            return list(range(d.low, d.high + 1, d.step))
        if isinstance(d, optuna.distributions.FloatDistribution) and d.step is not None:
            n = int(round((d.high - d.low) / d.step))
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
        _check_key(str(key))
        param = Param(str(key), _distribution(str(key), spec))
        for value in _probe_values(param.distribution):
            check_value(base, param.key, value)
        params.append(param)
    return params


def grid_points(params: list[Param]) -> list[dict[str, Scalar]]:
    values = [p.grid() for p in params]
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
    try:
        load_config(apply_params(base, {key: value}))
    except ConfigError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:]] or [str(e)]
        raise ConfigError(
            f"search.space.{key}: the value {value!r} makes the config invalid: {'; '.join(lines)}"
        ) from None


def _check_key(key: str) -> None:
    parts = key.split(".")
    if parts[0] in NOT_SEARCHABLE:
        raise ConfigError(f"search.space.{key}: {parts[0]} cannot be searched")
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(fields)) if fields else "no keys below it"
            raise ConfigError(f"search.space.{key}: unknown config key ({where} has {known})")
        model = _section(fields[part].annotation)
        if model is None and i < len(parts) - 1:
            raise ConfigError(f"search.space.{key}: {'.'.join(parts[: i + 1])} is a value, not a section")
    if model is not None:
        raise ConfigError(
            f"search.space.{key}: {key} is a section; search one of its keys "
            f"({', '.join(sorted(model.model_fields))})"
        )


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


def _distribution(key: str, spec: Any) -> optuna.distributions.BaseDistribution:
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
