"""`strop serve`: load the base and its adapters, bind the socket, run uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits for the requests in flight (streams
included) before the engine's thread is stopped, so nobody gets a cut-off reply.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from typing import Literal

from strop.core.errors import ConfigError
from strop.serve.limits import Limits

LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(host: str, api_key: str | None) -> str | None:
    """The key the server demands; a bind beyond loopback without one is refused."""
    key = api_key or os.environ.get("STROP_API_KEY") or None
    if key is None and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: listening beyond this machine needs an API key: give --api-key KEY or set "
            "STROP_API_KEY (clients send it as Authorization: Bearer KEY)"
        )
    return key


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build(
    target: str,
    adapters: dict[str, str],
    limits: Limits,
    api_key: str | None,
    device: str = "auto",
    quantize: str | None = None,
    rag: tuple | None = None,
):
    """The app, its engine and the served variants (the engine starts with the app). `rag`:
    (Retriever, top_k, mode) to answer chat requests with retrieved passages."""
    from strop.models.engine import Engine
    from strop.serve.app import build_app
    from strop.serve.variants import load_variants

    loaded, variants = load_variants(target, adapters, device)
    if quantize:
        from strop.models.quantize import quantize_model

        # with no other adapters a run's own adapter is merged in (faster); else the base goes int8 under them
        loaded.model = quantize_model(loaded.model, quantize, merge=not adapters)
    first = next(iter(variants.values()))
    engine = Engine(loaded.model, loaded.tokenizer, first.template.stop_ids, max_batch=limits.max_batch)
    if rag is not None:
        rag[0].search("warm up", 1, rag[2])  # loads the encoder and BM25 before the first request
    return build_app(engine, variants, limits, api_key, rag), engine, variants


def serve(
    target: str,
    adapters: dict[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    device: str = "auto",
    quantize: str | None = None,
    drain_seconds: int = 60,
    rag: tuple | None = None,
) -> None:
    limits = limits or Limits()
    key = api_key_for(host, api_key)
    sock = bind(host, port)  # before loading: a taken port fails in a second, not after the model loads
    app, _, variants = build(target, adapters, limits, key, device, quantize, rag)
    print(f"serving {', '.join(variants)} at {url_of(host, sock)}/v1", file=sys.stderr, flush=True)
    if key is None:
        print("no API key: loopback clients only", file=sys.stderr, flush=True)
    run_uvicorn(app, sock, drain_seconds=drain_seconds, lifespan="on")
    print("stopped (requests in flight were finished)", file=sys.stderr, flush=True)


def url_of(host: str, sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}"


def run_uvicorn(
    app, sock: socket.socket, drain_seconds: int | None = None, lifespan: Literal["on", "off"] = "on"
) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM. uvicorn drains, then re-raises the signal to the
    handler it found: a quiet one, so a drained server ends with status 0 instead of dying of the
    signal it has already honoured."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=drain_seconds, access_log=False, lifespan=lifespan
    )
    server = uvicorn.Server(config)
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
