"""Peak host memory of one piece of work, read from the Linux kernel's per-process counters.

``PeakRSS`` resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), takes the
current RSS as the baseline and, on exit, reports the peak (VmHWM) above it. Where clear_refs is
unavailable the peak falls back to ``getrusage`` maxrss, which cannot be reset: it then also
covers whatever ran before, so callers that need exact numbers run each case in a fresh process.
"""

from __future__ import annotations

import resource
from pathlib import Path


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``); None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.mb``: peak RSS above the entry RSS, in MB.

    ``peak.resettable`` says whether the mark was really reset (see the module docstring).
    """

    def __enter__(self) -> PeakRSS:
        # Free heap pages an earlier case left resident would serve this case's allocations
        # (glibc reuses a free heap chunk before it maps new memory, whatever the mmap
        # threshold) and hide its peak: give them back first.
        release_free_heap()
        self.resettable = reset_peak()
        self._baseline_kb = status_kb("VmRSS") if self.resettable else _maxrss_kb()
        self.mb = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = status_kb("VmHWM") if self.resettable else _maxrss_kb()
        self.mb = ((peak_kb or 0) - (self._baseline_kb or 0)) / 1024


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_free_heap() -> bool:
    """Return glibc's free heap pages to the OS (``malloc_trim(0)``); False elsewhere."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - absent outside glibc
    except (OSError, AttributeError):
        return None
    return libc


def return_big_frees_to_the_os(threshold_bytes: int = 65536) -> bool:
    """Make glibc serve allocations over ``threshold_bytes`` as their own mmaps (``mallopt``).

    Freed big tensors then leave the process at once, so a later case's peak is not hidden by
    heap memory an earlier case left behind. The same as starting the process with
    ``MALLOC_MMAP_THRESHOLD_``, for benches that measure several cases in one process. False
    where glibc is not the allocator.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))
