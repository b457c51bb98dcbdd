"""How strop talks: one logging setup for every command, and library chatter kept out of it.

strop's log holds strop's own lines (info, or with `-q` warnings and errors), its progress
(core/progress.py) and the errors of any library; not the libraries' warnings, info lines or progress
bars. Seen in real runs: torchao's "Detected no triton" and "Failed to load ..." warnings, torch's
glog-style `W1207 12:00:00.000 ... torch/utils/_pytree.py:630] ...` lines (Python logging through
torch's own handler), torch's C++ `[W...]` lines, transformers' "Loading weights" and "Writing model
shards" bars.
"""

from __future__ import annotations

import logging
import os

from strop.core import distributed, progress

# read by the libraries when they load, so set before they do; strop's child processes (dashboard runs,
# tune trials, distributed workers) inherit them. A value the user set is kept.
QUIET_ENVIRONMENT = {
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ log (c10): its `[W...]` warnings
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # downloads, "Fetching N files"
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map/load bars
}
# loggers with a handler of their own (strop's filter never sees their records) or chatty below ERROR
NOISY_LOGGERS = ("torch", "transformers", "peft", "httpx", "huggingface_hub", "absl", "gguf", "datasets")


def setup_logging(quiet: bool) -> None:
    """strop's own lines as plain messages (info, or warnings only with `-q`); on processes other than
    the first of a distributed run only errors, so a run speaks with one voice. `-q` and those processes
    show no progress either. Another library's records reach the log only as errors."""
    main = distributed.WORLD.main
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    fresh = not root.handlers  # basicConfig leaves a configured root (an embedding program's) alone
    logging.basicConfig(level=level if main else logging.ERROR, format="%(message)s")
    if fresh:
        root.handlers[0].addFilter(_strop_or_error)
    progress.silence(quiet or not main)


def quiet_libraries() -> None:
    """Library chatter (warnings, weight-loading bars, deprecation notices) hides strop's own lines.
    Sets QUIET_ENVIRONMENT in os.environ first, then imports transformers (and so torch): call it where
    Ctrl-C is already handled, before anything else imports torch."""
    import warnings

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")  # the libraries' warnings (torch's UserWarnings, ...)
    warnings.filterwarnings("default", module=r"strop(\.|$)")  # matched first: strop's own still show
    import torch  # noqa: F401 - sets its logger's level as it loads: quieted before transformers loads more

    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's bars
    except ImportError:
        pass


def _strop_or_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.name == "strop" or record.name.startswith("strop.")
