"""What runs the Sinkhorn solver's inner loops, as one explicit, swappable object.

On CPU the scaling iterations and the transport loss's passes run compiled (``cpu_kernels``,
numba) by default, or in NumPy where numba is not installed; NumPy and torch loops give the same results up to float rounding and are the
peers the tests and ``bench/bench_ot.py`` compare against. Tests and benches choose a backend
with ``use_backend(...)`` (a context: it applies to the current thread and the calls it makes);
library code reads ``current_backend()``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

CpuArrays = Literal["numba", "numpy", "torch"]


@dataclass(frozen=True)
class SolverBackend:
    """``cpu_arrays``: what runs the loops for CPU tensors. ``fused_loss``: ``transport_cost``
    as one autograd op with its written-out backward (False: ``sinkhorn_log`` and autograd).
    ``cache_groups``: NumPy loops run problems in cache-sized groups (False: every kernel
    streams from memory at each step). ``stationary_exit``: the compiled loops stop a problem
    once its iterate is bitwise stationary, with the results of the full iteration count
    (False runs every iteration; tests compare the two bit for bit)."""

    cpu_arrays: CpuArrays = "numba"
    fused_loss: bool = True
    cache_groups: bool = True
    stationary_exit: bool = True


_BACKEND: contextvars.ContextVar[SolverBackend | None] = contextvars.ContextVar(
    "sinkhorn_backend", default=None
)


@functools.cache
def default_backend() -> SolverBackend:
    """The compiled loops where numba is installed (the ``cpu`` extra), else the NumPy loops:
    the same results up to float rounding, slower on CPU (GPU tensors use neither)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return SolverBackend(cpu_arrays="numpy")
    return SolverBackend()


def current_backend() -> SolverBackend:
    return _BACKEND.get() or default_backend()


@contextlib.contextmanager
def use_backend(**changes) -> Iterator[SolverBackend]:
    """Run the enclosed solver calls with the current backend's fields ``changes`` replaced."""
    backend = replace(current_backend(), **changes)
    if backend.cpu_arrays not in ("numba", "numpy", "torch"):
        raise ValueError(f"cpu_arrays must be numba, numpy or torch, got {backend.cpu_arrays!r}")
    token = _BACKEND.set(backend)
    try:
        yield backend
    finally:
        _BACKEND.reset(token)


def compiled_cpu(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` runs in the compiled CPU kernels (``cpu_kernels``)."""
    return tensor.device.type == "cpu" and current_backend().cpu_arrays == "numba"


def run_loop(loop, *tensors):
    """Run ``loop(xp, *arrays)``: on NumPy views of CPU tensors, on the tensors themselves elsewhere
    (CPU tensors come here only when the backend's ``cpu_arrays`` is not the compiled default).

    The loops are chains of small matrix-vector products and elementwise ops on (B, 1, N) rows,
    where per-call overhead and the matrix-vector kernel decide the time; ``bench/bench_ot.py``
    times the whole loss with each backend. The views share memory with the tensors. OpenBLAS
    keeps its own thread pool: within the loop it is held to torch's thread count, so a process
    pinned to N threads stays on N. Problems run in cache-sized groups (``cache_groups``; the bench times the
    loss with and without them).
    """
    backend = current_backend()
    if tensors[0].device.type != "cpu" or backend.cpu_arrays == "torch":
        loop(torch, *tensors)
        return
    arrays = [tensor.detach().numpy() for tensor in tensors]
    num_problems = arrays[0].shape[0]
    # Problems do not interact: run them in groups whose kernels stay in the cache through all
    # the iterations, instead of streaming every kernel from memory at each step.
    group = num_problems
    if backend.cache_groups:
        group = max(1, cache_bytes() // _CACHE_SHARE // max(arrays[0][:1].nbytes, 1))
    with _blas_controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        for start in range(0, num_problems, group):
            loop(np, *[_problems(array, start, start + group) for array in arrays])


# A group's kernels take at most this fraction of the largest cache (the rest holds vectors and
# whatever else runs). Chosen from ad-hoc timings of the loss at B=8, S=T=1024 on a machine
# with a 32 MiB L3 (interleaved runs): groups of 16 MiB 530 ms, 8 MiB 470 ms, one
# 4 MiB problem 466 ms. The bench times grouped against streamed, not the fraction.
_CACHE_SHARE = 8


def _problems(array, start, end):
    """Problems ``start:end`` of an array indexed by problem (a broadcast problem: itself)."""
    return array if array.shape[0] == 1 else array[start:end]


@functools.cache
def cache_bytes() -> int:
    """This CPU's largest cache in bytes (Linux sysfs), else 8 MiB."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KM")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=8 << 20)


def run_compiled(name, tensors, scalars):
    """Run ``cpu_kernels.<name>(*arrays, *scalars, start, stop)`` on NumPy views of CPU
    tensors indexed by problem along their first dimension, with the problems split over torch's
    thread count: the compiled kernels release the GIL, and problems do not interact."""
    from . import cpu_kernels  # numba compiles (or loads its cache) on first use

    arrays = [tensor.detach().numpy() for tensor in tensors]
    if any(array.shape[0] != arrays[0].shape[0] for array in arrays):
        # The compiled loops index without bounds checks: a mismatch would corrupt memory.
        raise ValueError(
            f"compiled kernels need one entry per problem, got {[a.shape for a in arrays]}"
        )
    typed = [
        arrays[0].dtype.type(value) if isinstance(value, float) else value for value in scalars
    ]
    function = getattr(cpu_kernels, name)
    num_problems = arrays[0].shape[0]
    threads = max(1, min(torch.get_num_threads(), num_problems))
    bounds = [num_problems * part // threads for part in range(threads + 1)]
    if threads == 1:
        function(*arrays, *typed, 0, num_problems)
        return
    runs = [
        _thread_pool(threads).submit(function, *arrays, *typed, start, stop)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for run in runs:
        run.result()


@functools.cache
def _thread_pool(threads):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sinkhorn")


# A forked child (a DataLoader worker) inherits the pools but not their threads: it builds its own.
os.register_at_fork(after_in_child=_thread_pool.cache_clear)


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
