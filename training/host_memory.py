"""The host's memory allocator during training: keep freed memory for reuse.

A training step allocates and frees several (N, D) tensors (the item table's dense
gradient, its temporaries). glibc's malloc serves every allocation over its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when
freed, so each step the kernel maps and zeroes those pages again on first touch.
Measured on S2's batches (307,289 items x 64, one thread, 2-core AMD EPYC, a Beauty
training on the other core; ``python bench/sampled_step.py --data s2/sequences.txt
--ted-samples 32 --steps 40`` and the same with ``--no-keep-freed-memory``): 0.130 s a
step with the freed memory kept (0.001 s of it in the kernel, 481 page faults) against
0.141 s (0.012 s, 3,361 faults); a timing of 40 steps outside the benchmark saw 0.133 s
against 0.148-0.170 s (0.011-0.041 s in the kernel, 5,000-19,000 faults a step). On
S3's (1,008,912 items, ``--steps 8``): 0.275 s against 0.449 s, of which 0.193 s in the
kernel (80,789 faults a step).

The same as starting the process with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647``; the cost is that the process keeps its peak heap
until it exits, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes free at the heap's top before it is handed back: never, in practice


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (no mmap for large blocks, no trim).

    Returns:
        Whether it applied: False off Linux or where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc to load, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
