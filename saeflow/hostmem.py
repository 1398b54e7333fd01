"""Keep freed host memory for reuse while a CPU-heavy stage runs (glibc ``mallopt``).

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``, so a
training step that allocates and frees the same ``[16384, 640]`` float32 gradient (42 MB) every step
pays the kernel's page faults to zero-fill it again each time. Measured on the 2-core CPU of
docs/benchmarks.md ("Roofline"), a width-16,384 TopK step: 0.60 -> 0.46 s in bf16 and 1.05 -> 0.84 s
in float32 (one-off profile), a quarter of the step spent on first-touch page faults.

:func:`reuse_freed_memory` turns that off for the duration of a ``with`` block: no ``mmap`` for
large blocks (``M_MMAP_MAX = 0``) and no trimming of the heap's top (``M_TRIM_THRESHOLD``), so a
freed block is handed to the next allocation of the same size without a page fault. On exit the
defaults come back and ``malloc_trim(0)`` returns the free memory to the system. It changes where
memory comes from, never a computed value. Elsewhere than Linux with glibc it does nothing;
``SAEFLOW_HOST_MALLOC=default`` turns it off.

:func:`reset_peak_rss` and :func:`peak_rss_bytes` measure the peak resident memory of a stretch
of work in this process (the flow records each stage's, see ``flows.runner.StageRunner``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["reuse_freed_memory", "reset_peak_rss", "peak_rss_bytes"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM = 128 * 1024  # glibc's defaults (mallopt(3))
_DEFAULT_MMAP_MAX = 65536
_KEEP = 2**31 - 1  # the largest value mallopt takes: keep up to 2 GiB of free heap top

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or os.environ.get("SAEFLOW_HOST_MALLOC", "").lower() == "default":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc (musl has mallopt stubs)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, freed large host blocks stay in the heap for reuse; yields whether it applies.

    Nested and concurrent uses are counted: the defaults come back when the last one exits."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement of this process: return freed heap to the system
    (``malloc_trim``, glibc) and reset the kernel's high-water mark to the current resident size
    (``/proc/self/clear_refs`` ``5``, Linux >= 4.0). Returns whether the mark was reset; where it
    cannot be (other systems, a kernel that refuses), :func:`peak_rss_bytes` is the process's peak
    since it started."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The peak resident memory of this process in bytes since the last successful
    :func:`reset_peak_rss` (``VmHWM`` of ``/proc/self/status``), or since it started where that
    file does not exist (``getrusage``); ``None`` where neither is available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
