"""The file side of a config: reading a YAML file strictly (UTF-8, no key given twice, one-line errors
with line:column), data and reward paths relative to that file, and `--set key=value` overrides.
Validation into typed sections is core/config.py's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from strop.core.errors import ConfigError
from strop.core.io import unreadable_file


def read_config_file(path: Path) -> dict:
    """The raw mapping of a YAML config file, its relative paths resolved against the file's folder."""
    why = unreadable_file(path)
    if why == "not found":
        raise ConfigError(f"config file not found: {path}")
    if why:
        raise ConfigError(f"config file {path}: {why}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    _resolve_relative_paths(raw, path.parent)
    return raw


EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: `3e-4` -> float, `true` -> bool, `[q_proj]` -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string; YAML 1.2 and users say float
    if isinstance(value, str) and EXP_FLOAT.fullmatch(text.strip()):
        return float(value)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last one,
    so `optim: {lr: 1e-4, lr: 1e-3}` would drop a setting without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    """Data paths in a YAML file are relative to that file when such a file exists there."""
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict):
            _resolve_relative_paths(stage, base)
    rl = raw.get("rl")
    if isinstance(rl, dict) and isinstance(rl.get("reward"), str):  # a reward run or file.py:function
        where, _, fn = rl["reward"].rpartition(":") if ".py:" in rl["reward"] else (rl["reward"], "", "")
        if not Path(where).is_absolute() and (base / where).exists():
            rl["reward"] = str((base / where).resolve()) + (f":{fn}" if fn else "")
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in ("train", "validation", "test"):
        items = data.get(split)
        if items is None:
            continue
        items = items if isinstance(items, list) else [items]
        out = []
        for it in items:
            p = it if isinstance(it, str) else (it.get("path") if isinstance(it, dict) else None)
            if isinstance(p, str) and not Path(p).is_absolute() and (base / p).exists():
                p = str((base / p).resolve())
                it = p if isinstance(it, str) else {**it, "path": p}
            out.append(it)
        data[split] = out
