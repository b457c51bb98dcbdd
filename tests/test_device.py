"""CPU memory: with `keep_freed_memory` a freed 64 MB tensor's memory is reused without page faults;
glibc's default hands it back to the kernel, so the next one is faulted in (and zeroed) again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from strop.core.device import _glibc

PROBE = """
import resource, sys, torch
from strop.core.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)  # 64 MB
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
def test_kept_memory_is_reused_without_page_faults():
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        ).stdout
        return int(out.split()[-1])

    assert faults("default") > 10_000  # 16k pages of 4 KB faulted in again
    assert faults("keep") < 1_000
