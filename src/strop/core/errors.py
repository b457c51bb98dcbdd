"""User-facing errors. The CLI prints these as one clear message, never a traceback."""

import errno
import os
import re

# failures of the file system that the user, not strop, can fix: a full disk, a read-only or forbidden
# folder, an output path under a file, too long, missing or busy (a mount point)
USER_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.EBUSY,
    errno.ELOOP,
    errno.EXDEV,
}
_WRAPPED = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) quote errno


class StropError(Exception):
    """A problem the user can fix (bad config, bad data, missing file). Printed without a traceback."""


class ConfigError(StropError):
    """A config key or value is wrong; the message names the dotted key and what is allowed."""


class DataError(StropError):
    """A data row or file is malformed; the message names the file, line and field."""


class TrainingStopped(StropError):
    """Training stopped on purpose (e.g. repeated non-finite losses); a checkpoint was written."""


class Interrupted(BaseException):  # noqa: N818 - a BaseException, like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM ended a command. A BaseException, so no `except Exception` swallows it; the CLI
    prints `message` and exits with the conventional status 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message


def as_os_error(e: BaseException) -> OSError | None:
    """`e` itself if it is an OSError; for a library error that wraps one (safetensors writes a full disk
    as "I/O error: No space left on device (os error 28)") an OSError with that errno; else None."""
    if isinstance(e, OSError):
        return e
    m = _WRAPPED.search(str(e))
    if m is None:
        return None
    n = int(m.group(1))
    return OSError(n, os.strerror(n))


def user_os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` when it is one the user can fix (USER_ERRNOS), else None."""
    os_error = as_os_error(e)
    return os_error if os_error is not None and os_error.errno in USER_ERRNOS else None


def describe_os_error(e: OSError) -> str:
    """`path: No space left on device`: the file and the system's own words."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
