"""Test-only fault injection for tests/test_distributed.py, on PYTHONPATH in that test alone: the process
of rank $STROP_TEST_FAIL_RANK fails with a user error when it logs step $STROP_TEST_FAIL_STEP."""

import os

if os.environ.get("STROP_TEST_FAIL_RANK") == os.environ.get("RANK") and os.environ.get("RANK") is not None:
    from strop.core.errors import StropError
    from strop.training import loop_state

    _log = loop_state.LoopState.log
    _at = int(os.environ["STROP_TEST_FAIL_STEP"])

    def log(self, record, write=True):
        if record.get("step") == _at and "loss" in record:
            raise StropError(f"injected failure on rank {os.environ['RANK']} at step {_at}")
        return _log(self, record, write)

    loop_state.LoopState.log = log
