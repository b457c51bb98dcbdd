"""`strop ui`: check the runs folder and the address, bind, print the one-time token URL, run uvicorn.

Loopback only unless `allow_remote`: the dashboard reads every run and starts training jobs, so a bind
beyond this machine is a decision the user states, and the token is required there as here. The token
is new at every start (secrets.token_urlsafe) and never written to disk.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from strop.core.errors import ConfigError
from strop.serve.run import bind, is_loopback, run_uvicorn, url_of


def check_address(host: str, port: int, allow_remote: bool) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be in 0..65535 (0: any free port)")
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"--host {host}: listening beyond this machine lets others see your runs and start jobs; add "
            "--allow-remote to mean it (the token is still required)"
        )


def check_runs(runs: str) -> Path:
    root = Path(runs).expanduser()
    if not root.exists():
        raise ConfigError(f"--runs {runs}: no such folder (give the folder your configs' output_dir names)")
    if not root.is_dir():
        raise ConfigError(f"--runs {runs}: not a folder")
    return root.resolve()


def serve_ui(runs: str, host: str, port: int, allow_remote: bool, device: str = "auto") -> None:
    from strop.ui.app import build_app

    check_address(host, port, allow_remote)
    root = check_runs(runs)
    sock = bind(host, port)
    token = secrets.token_urlsafe(24)
    app, jobs, playground = build_app(root, token, f"strop_ui_{sock.getsockname()[1]}", device)
    print(f"strop ui: runs in {root}", file=sys.stderr, flush=True)
    print(f"open {url_of(host, sock)}/?token={token}", file=sys.stderr, flush=True)
    try:
        run_uvicorn(app, sock, lifespan="off")
    finally:
        jobs.stop_all()  # they would get SIGTERM anyway (STROP_PARENT_PID); said here, and at once
        playground.close()
    print("strop ui stopped; runs it started were sent SIGTERM (each writes a checkpoint)", file=sys.stderr)
