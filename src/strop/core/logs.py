"""How strop talks: one logging setup for every command, and library chatter kept out of it."""

from __future__ import annotations

import logging

from strop.core import distributed


def setup_logging(quiet: bool) -> None:
    """strop's own lines as plain messages (info, or warnings only with `-q`); on processes other than
    the first of a distributed run only errors, so a run speaks with one voice."""
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level if distributed.WORLD.main else logging.ERROR, format="%(message)s")


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notices) hides strop's own progress. Imports
    transformers, so call it where Ctrl-C is already handled."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("transformers", "peft", "httpx", "huggingface_hub", "absl", "gguf"):  # absl: rouge_score
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
