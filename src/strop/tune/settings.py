"""The search settings of one `strop tune` call: the config's `search:` section with the command line's
flags on top (`--space KEY=SPEC` adds or replaces one key of search.space)."""

from __future__ import annotations

from strop.core.config import RunConfig
from strop.core.config_file import parse_value
from strop.core.errors import ConfigError
from strop.core.search_config import SearchConfig

FLAGS = ("trials", "objective", "direction", "sampler", "pruner", "workers", "storage")


def search_settings(cfg: RunConfig, args) -> SearchConfig:
    search = (cfg.search or SearchConfig()).model_copy(deep=True)
    space = dict(search.space)
    for item in args.space:
        key, eq, spec = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(
                f"--space {item!r}: expected KEY=SPEC, e.g. --space 'optim.lr={{low: 1e-5, high: 1e-3, log: true}}'"
            )
        space[key.strip()] = parse_value(spec)
    updates = {name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None}
    try:
        return SearchConfig.model_validate({**search.model_dump(), **updates, "space": space})
    except ValueError as e:
        raise ConfigError(f"strop tune: {e}") from None
