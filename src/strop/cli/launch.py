"""`strop train CONFIG --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`: start the run as
N processes on this machine (of M machines) through torch.distributed's own launcher, the one `torchrun`
is, and speak for them with one voice: rank 0's output on the console, the other processes' output in
files, and when the run fails, exactly one `error:` line, said here once every process has ended:
local rank 0's own error when it has one (an error every process meets, such as a missing data file,
is said as one process says it), else the first failing process's, named (`error: process 1: ...`).
The processes leave their error lines in a folder (`distributed.say_error`) instead of printing them,
so which process ends first, or whether the launcher stops rank 0 just after its error, cannot change
what is said.

`torchrun --nproc-per-node N -m strop train CONFIG` does the same run; this saves typing it and turns
a failure into one line instead of the launcher's report.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from strop.core.distributed import ERRORS_ENV, PEER_LOST
from strop.core.errors import Interrupted, StropError

LAUNCH_FLAGS = {"--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"}  # each takes a value


def child_argv(argv: list[str]) -> list[str]:
    """The command line each process runs: this one without the launch flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def launch(nproc: int, nnodes: int, node_rank: int | None, endpoint: str | None, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if nnodes > 1 and not endpoint:
        raise StropError(
            "--nnodes: several machines need --rdzv-endpoint HOST:PORT (the same on every machine)"
        )
    if nnodes > 1 and node_rank is not None and not 0 <= node_rank < nnodes:
        raise StropError(f"--node-rank: {node_rank} is not in 0..{nnodes - 1} (--nnodes {nnodes})")
    logs = Path(tempfile.mkdtemp(prefix="strop-ranks-"))
    if nnodes == 1:
        backend, endpoint, configs = "c10d", f"127.0.0.1:{_free_port()}", {}
    elif node_rank is not None:  # torchrun's static rendezvous: rank 0's machine hosts it at the endpoint
        backend, configs = "static", {"rank": node_rank, "timeout": 900}
    else:
        backend, configs = "c10d", {}
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=os.environ.get("STROP_RUN_ID", "strop" if nnodes > 1 else uuid.uuid4().hex),
        rdzv_backend=backend,
        rdzv_endpoint=endpoint or "",
        rdzv_configs=configs,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        # rank 0 of this machine writes to the console, the others to files only
        logs_specs=DefaultLogsSpecs(
            log_dir=str(logs),
            redirects={r: Std.NONE if r == 0 else Std.ALL for r in range(nproc)},
        ),
    )
    errors = logs / "errors"
    errors.mkdir()
    previous = os.environ.get(ERRORS_ENV)
    os.environ[ERRORS_ENV] = str(errors)  # the processes inherit this process's environment
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "strop", *child_argv(argv))
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return _report(rank, failure.local_rank, failure.exitcode, errors)
    except SignalException as e:  # the launcher stopped every process (they write their checkpoint)
        signum = int(e.sigval)
        raise Interrupted(signum, "each process was asked to stop at a safe point") from None
    finally:
        if previous is None:
            os.environ.pop(ERRORS_ENV, None)
        else:
            os.environ[ERRORS_ENV] = previous
        shutil.rmtree(logs, ignore_errors=True)


def _report(rank: int, local_rank: int, code: int, errors: Path) -> int:
    """The run's one error line: local rank 0's own error, else the first failing process's (`rank`,
    `local_rank`, exit status `code`). Returns the exit status."""
    own = _error_line(errors, 0)
    if own is not None:
        print(own, file=sys.stderr)
        return 2
    if code < 0:
        name = signal.Signals(-code).name
        print(
            f"error: process {rank} was killed by {name} (out of memory?); the others were stopped",
            file=sys.stderr,
        )
        return 2
    if code == PEER_LOST:  # the first to fail only saw a collective break: no process said why
        print(f"error: process {rank}: the processes lost contact (a collective failed)", file=sys.stderr)
        return 2
    if local_rank != 0:  # local rank 0's own failure without a line is a traceback on the console
        line = _error_line(errors, local_rank)
        if line is None:
            print(f"error: process {rank} failed with exit status {code}", file=sys.stderr)
        else:
            print(line.replace("error:", f"error: process {rank}:", 1), file=sys.stderr)
    return code if code in (2, 130, 143) else 2


def _error_line(errors: Path, local_rank: int) -> str | None:
    try:
        return (errors / str(local_rank)).read_text(errors="replace").strip() or None
    except FileNotFoundError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
