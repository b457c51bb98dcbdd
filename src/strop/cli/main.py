"""`strop`: fine-tune language models on your own data.

User errors print one clear line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from strop.cli import (
    configs,
    data,
    export,
    generation,
    judge,
    models,
    predict,
    rag,
    reports,
    serve,
    training,
    ui,
)
from strop.core import distributed, signals
from strop.core.errors import Interrupted, StropError, describe_os_error, user_os_error
from strop.core.logs import quiet_libraries, setup_logging

# each module adds its commands (`register(sub)`), each command's parser names its handler; in this
# order in `strop --help`
GROUPS = (training, generation, predict, export, serve, reports, judge, data, rag, ui, models, configs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except StropError as e:  # an old spelling (options.renamed): `error: --quant was renamed --quantize`
        distributed.say_error(str(e))
        return 2
    args.argv = argv  # quoted when a stopped run says how to start it again
    world = distributed.WORLD
    setup_logging(args.quiet)
    try:
        signals.follow_parent()
        quiet_libraries()  # imports transformers: Ctrl-C here is an interrupt like any other
        return args.handler(args) or 0
    except StropError as e:
        distributed.say_error(str(e))
        return 2
    except Interrupted as e:  # a run stopped by SIGINT/SIGTERM: the message says what is kept
        print(f"\ninterrupted by {signal.Signals(e.signum).name}. {e.message}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at interpreter exit
        return 0
    except Exception as e:  # a full disk, a read-only or forbidden folder: the user's to fix
        if world.active and distributed.peer_failed(e):
            return distributed.PEER_LOST  # the launcher reports the first failure, not this echo
        os_error = user_os_error(e)
        if os_error is None:
            raise
        distributed.say_error(describe_os_error(os_error))
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as the project's other errors are said: the usage, then one line that
    starts with `error:` (argparse's own is `strop CMD: error: ...`). Subparsers are of this class too."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="strop",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `strop COMMAND --help` for the options of each command.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
