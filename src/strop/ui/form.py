"""The start form: the run config's schema as fields, a submission as `strop train` would take it.

The fields come from `RunConfig`'s pydantic model (help text from each field's own description, choices
from its Literal type, bounds from its constraints), filled with a starting config: a shipped one
(`strop configs`) or a YAML file on this machine. A submission is the fields the user changed, turned
into `--set key=value` overrides of that config and loaded by `load_config`, exactly as
`strop train CONFIG --set ...` loads them, so a bad value gets the CLI's own error naming the key.
"""

from __future__ import annotations

import json
import shlex
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeGuard, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from strop.core.config import RunConfig, load_config, stage_configs
from strop.core.config_file import parse_value, read_config_file
from strop.core.errors import ConfigError, StropError
from strop.recipes.data_check import render, run_check

CONFIGS = resources.files("strop.recipes") / "configs"
FIXED = {"output_dir"}  # the dashboard's runs folder, always
BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def shipped_configs() -> list[dict]:
    """[{name, about}] of the configs that ship with strop (what `strop configs` lists)."""
    out = []
    for f in sorted(CONFIGS.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out.append({"name": f.name[:-5], "about": f.read_text().splitlines()[0].lstrip("# ")})
    return out


def base_path(base: str) -> Path:
    """A shipped config's name or a YAML file's path, as `strop train` takes its CONFIG."""
    shipped = CONFIGS / (base if base.endswith(".yaml") else f"{base}.yaml")
    if base and not Path(base).exists() and shipped.is_file():
        return Path(str(shipped))
    path = Path(base).expanduser()
    if not base or not path.is_file():
        raise ConfigError(f"config not found: {base} (not a file, nor a shipped config; see `strop configs`)")
    return path


def form_fields(base: str) -> list[dict]:
    """Sections of fields, [{title, fields: [{key, kind, choices, value, help}]}], filled from `base`."""
    raw = read_config_file(base_path(base))
    try:
        values = load_config(raw).model_dump(mode="json")
    except StropError:
        values = raw  # the form shows the file's values; submitting names what is wrong with them
    top: list[dict] = []
    sections: list[dict] = []
    for name, info in RunConfig.model_fields.items():
        if name in FIXED:
            continue
        ann = info.annotation
        if _section(ann):
            fields = _fields(ann, values.get(name) or {}, f"{name}.")
            sections.append({"title": name, "help": info.description or "", "fields": fields})
        else:
            top.append(_field(name, info, values))
    return [{"title": "run", "help": "", "fields": top}, *sections]


def overrides(values: dict[str, str]) -> list[str]:
    """The changed fields as `--set` overrides (their text is YAML, as on the command line)."""
    bad = sorted(set(values) & FIXED)
    if bad:
        raise ConfigError(f"{bad[0]}: the dashboard starts runs in its runs folder; this key is fixed")
    return [f"{key}={_quoted(key, text)}" for key, text in values.items()]


def _quoted(key: str, text: str) -> str:
    """Text typed into a text field stays text (`Answer: yes` is no YAML mapping); `null` clears an
    optional one."""
    ann = _annotation(key)
    optional = get_origin(ann) in (Union, types.UnionType) and set(get_args(ann)) == {str, type(None)}
    if (ann is str or (optional and text.strip() not in ("null", "~", ""))) and parse_value(text) != text:
        return json.dumps(text)
    return text


def _annotation(key: str) -> Any:
    """The type of a dotted config key (None when there is no such key: validation names it)."""
    model: Any = RunConfig
    for part in key.split("."):
        info = model.model_fields.get(part) if _section(model) else None
        if info is None:
            return None
        model = info.annotation
    return model


def validate(root: Path, base: str, values: dict[str, str]) -> tuple[RunConfig, list[str]]:
    """The config `strop train BASE --set ...` would run (output_dir: the runs folder) and the argv of
    that command. ConfigError, as the CLI words it, for a bad value or a run name already taken."""
    path = base_path(base)
    sets = [*overrides(values), f"output_dir={json.dumps(str(root))}"]
    cfg = load_config(path, sets)
    if cfg.run_dir.exists():
        raise ConfigError(
            f"name: {cfg.run_dir} already exists; choose another name (a stopped run is resumed from its page)"
        )
    argv = ["train", str(path), *[a for s in sets for a in ("--set", s)], "--no-progress"]
    return cfg, argv


def data_findings(cfg: RunConfig) -> dict:
    """`strop data check` on the config's data: {text, errors} (per stage for a staged config)."""
    if cfg.stages:
        checks = {
            s.name: run_check(s.model_copy(update={"model": cfg.model}), False) for s in stage_configs(cfg)
        }
        text = "\n\n".join(f"== stage {k} ==\n{render(c.report)}" for k, c in checks.items())
        return {"text": text, "errors": [e for c in checks.values() for e in c.errors]}
    check = run_check(cfg, estimate=False)
    return {"text": render(check.report), "errors": list(check.errors)}


def command_line(argv: list[str]) -> str:
    return "strop " + shlex.join(argv)


def _fields(model: type[BaseModel], values: dict, prefix: str) -> list[dict]:
    out: list[dict] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if _section(ann):
            out += _fields(ann, values.get(name) or {}, f"{prefix}{name}.")
        else:
            out.append(_field(f"{prefix}{name}", info, values, name))
    return out


def _field(key: str, info, values: dict, name: str | None = None) -> dict:
    name = name or key
    ann = info.annotation
    choices: list[str] = []
    if get_origin(ann) is Literal:
        choices = [str(c) for c in get_args(ann)]
    elif ann is bool:
        choices = ["true", "false"]
    bounds = [f"{BOUNDS[k]} {getattr(m, k)}" for m in info.metadata for k in BOUNDS if hasattr(m, k)]
    hint = ", ".join(filter(None, [_type_name(ann), *bounds]))
    return {
        "key": key,
        "kind": "choice" if choices else "text",
        "choices": choices,
        "value": _as_text(
            values.get(name, None if info.is_required() else info.get_default(call_default_factory=True))
        ),
        "help": " ".join(filter(None, [info.description, f"({hint})" if hint else ""])),
    }


def _section(ann: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _type_name(ann: Any) -> str:
    if get_origin(ann) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann))
    if ann is type(None):
        return "null"
    if get_origin(ann) is Literal:
        return ""
    origin = get_origin(ann) or ann
    return {int: "whole number", float: "number", str: "text", bool: "", list: "list", dict: "mapping"}.get(
        origin, "YAML"
    )


def _as_text(value: Any) -> str:
    """A value as the YAML a user types after `--set key=`."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).removesuffix("\n...\n").strip()
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value)
