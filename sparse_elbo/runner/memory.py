"""Freed memory kept for reuse (glibc's malloc on Linux).

glibc serves large arrays with fresh pages from the kernel (``mmap``) and hands freed memory at the top of its
heap back (``trim``). A training process allocates and frees arrays of a few MiB to a few hundred MiB many
times a second — an E-step evaluation's temporaries, a minibatch step's activations, a FISTA step's codes — so
every page of them is faulted in and zero-filled by the kernel again and again (system time and page faults
measured in docs/benchmarks.md, "Freed memory"). ``retain_freed_memory`` asks malloc (``mallopt``) to serve
arrays up to 1 GiB from its heap and never to trim it, so that freed arrays are reused. The computations are
unchanged; the process keeps its peak heap until it exits. A setting of the whole process, so the library
never makes it: ``sparse_elbo.run`` and ``resume`` leave malloc as they find it. The command-line entry
points call it (``sparse_elbo.train``, in each job's process, and the ``encode`` and ``denoise`` tools), and
scripts that want it call ``sparse_elbo.retain_freed_memory()`` (the benchmark scripts do). A no-op where
glibc's ``mallopt`` is missing or where the user tuned malloc through glibc's own environment variables.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))
USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def retain_freed_memory() -> bool:
    """Keep freed memory in malloc's heap for reuse (module docstring); returns whether malloc took every setting."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_TUNABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
