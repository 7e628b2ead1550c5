"""keep_freed_memory: large blocks freed and allocated again cost no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB block, then count the minor page faults of doing it 20
# times more (numpy asks for huge pages: some 500 faults a block when it is mapped afresh).
REALLOCATE = """
import resource, sys
import numpy as np
from mqsa.training.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
np.ones(16 * 2**20, dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(16 * 2**20, dtype=np.float32)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_block_is_reused_without_page_faults_when_kept() -> None:
    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    assert default > 2_000  # mapped and zeroed again by the kernel at every allocation
    assert kept < 100  # the same pages, reused
