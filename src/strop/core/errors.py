"""User-facing errors. The CLI prints these as one clear message, never a traceback."""


class StropError(Exception):
    """A problem the user can fix (bad config, bad data, missing file). Printed without a traceback."""


class ConfigError(StropError):
    """A config key or value is wrong; the message names the dotted key and what is allowed."""


class DataError(StropError):
    """A data row or file is malformed; the message names the file, line and field."""


class TrainingStopped(StropError):
    """Training stopped on purpose (e.g. repeated non-finite losses); a checkpoint was written."""
