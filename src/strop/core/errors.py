"""User-facing errors. The CLI prints these as one clear message, never a traceback."""

import errno

# failures of the file system that the user, not strop, can fix (a full disk, a read-only folder)
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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


def describe_os_error(e: OSError) -> str:
    """`path: No space left on device`: the file and the system's own words."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
