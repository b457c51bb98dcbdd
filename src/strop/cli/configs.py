"""`strop configs [NAME]`: the example configs that ship with strop, and how a command finds one by name."""

from __future__ import annotations

from importlib import resources

from strop.core.errors import StropError

CONFIGS = resources.files("strop.recipes") / "configs"


def register(sub) -> None:
    cf = sub.add_parser(
        "configs",
        help="list the example configs that ship with strop",
        description="List shipped configs, or print one: `strop configs NAME`.",
    )
    cf.add_argument("name", nargs="?")
    cf.set_defaults(handler=_configs)


def config_path(name: str) -> str:
    """A config file as given, else the shipped config of that name."""
    from pathlib import Path

    if Path(name).exists():
        return name
    shipped = CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise StropError(f"config not found: {name} (not a file, nor a shipped config; see `strop configs`)")


def _configs(args) -> int:
    if args.name:
        with open(config_path(args.name), encoding="utf-8") as fh:
            print(fh.read(), end="")
        return 0
    for f in sorted(CONFIGS.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = f.read_text().splitlines()[0].lstrip("# ")
            print(f"{f.name[:-5]:<22} {first}")
    print(f"\n(in {CONFIGS}; run one with `strop train NAME`)")
    return 0
