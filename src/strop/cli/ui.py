"""`strop ui`: the local web dashboard (strop.ui) over a runs folder."""

from __future__ import annotations

from strop.cli.options import device_arg, port


def register(sub) -> None:
    u = sub.add_parser(
        "ui",
        help="a local web dashboard: runs, live curves, compare, start/stop/resume runs, chat with a run",
        description="Serves a dashboard over the runs folder on localhost and prints a one-time address "
        "carrying its token (every request needs it). Runs started from the page are `strop train` "
        "child processes; they get SIGTERM (and write a checkpoint) when the dashboard stops.",
    )
    u.add_argument("--runs", default="runs", metavar="DIR", help="the runs folder (default: ./runs)")
    u.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    u.add_argument("--port", type=port, default=7860, help="default: 7860 (0: any free port)")
    u.add_argument(
        "--allow-remote", action="store_true", help="allow a --host beyond loopback (the token still applies)"
    )
    device_arg(u, "where tried runs are loaded")
    u.set_defaults(handler=_ui)


def _ui(args) -> int:
    from strop.ui.server import serve_ui

    serve_ui(args.runs, args.host, args.port, args.allow_remote, args.device)
    return 0
