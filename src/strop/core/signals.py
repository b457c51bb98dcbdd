"""SIGINT and SIGTERM during a run: stop at a safe point, never mid-write.

Schedulers, `docker stop`, `kill` and preemptible machines send SIGTERM; Ctrl-C sends SIGINT. While a
training loop runs (`deferring`), the first signal only asks it to stop: the loop polls `requested()`
between micro-batches, abandons the unfinished step, writes a checkpoint atomically and raises
`Interrupted`. Outside a loop (loading, tokenizing, exporting) there is nothing to save yet, so the
signal raises `Interrupted` at once. A second signal always raises at once; atomic writes (core/io.py)
mean that can cost only the write in progress, never the last complete checkpoint.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypedDict, TypeVar

from strop.core.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State(TypedDict):
    signum: int | None  # the signal that asked the running loop to stop
    deferring: int  # how many `deferring` loops are running
    installed: bool  # whether graceful_stop's handlers are in place


_state: _State = {"signum": None, "deferring": 0, "installed": False}
P = ParamSpec("P")
R = TypeVar("R")


def requested() -> int | None:
    """The signal that asked the running loop to stop, if one did."""
    return _state["signum"]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextmanager
def graceful_stop() -> Iterator[None]:
    """Handle SIGINT/SIGTERM for the duration of a run (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.update({"signum": None, "installed": True})
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.update({"signum": None, "installed": False})


def deferring(loop: Callable[P, R]) -> Callable[P, R]:
    """While `loop` runs, a first signal only sets `requested()`; the loop polls it and stops cleanly."""

    @functools.wraps(loop)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        _state["deferring"] += 1
        try:
            return loop(*args, **kwargs)
        finally:
            _state["deferring"] -= 1

    return run


def _handle(signum: int, frame) -> None:
    name = signal_name(signum)
    if _state["signum"] is None and _state["deferring"]:
        _state["signum"] = signum
        print(
            f"\n{name}: stopping after this micro-batch and writing a checkpoint "
            f"(send {name} again to quit at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    first = _state["signum"] is None
    _state["signum"] = signum
    raise Interrupted(signum, "before training started: nothing to save" if first else "at once")


PARENT_ENV = "STROP_PARENT_PID"  # set by a process that runs strop as its child (strop tune's trials)


def follow_parent() -> None:
    """A child run started with STROP_PARENT_PID gets SIGTERM when that parent dies (Linux), so a killed
    search takes its trials with it instead of leaving them training unattended."""
    import os

    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
