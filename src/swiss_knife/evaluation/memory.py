"""Peak memory while running a model, and the bytes its weights occupy.

Method
------
* **CUDA**: PyTorch's caching allocator keeps exact counters. ``torch.cuda.reset_peak_memory_stats``
  at entry and ``torch.cuda.max_memory_allocated`` at exit give the peak bytes held by tensors in
  between (https://pytorch.org/docs/stable/notes/cuda.html#memory-management). This excludes the
  allocator's cached-but-free blocks and the CUDA context, so it measures what the model needs,
  not what ``nvidia-smi`` shows.
* **CPU** (and any other device): there is no allocator counter, so a daemon thread samples the
  process resident set size (RSS, via ``psutil``) every ~5 ms, plus once at entry and once at exit,
  and reports the maximum. Sampling can miss a spike shorter than the interval, and RSS includes
  everything the process holds (Python, libraries, the weights themselves), so compare the peak
  with ``baseline_bytes`` (RSS at entry) rather than reading it as the model's footprint.

Before the baseline is read, :func:`release_unused_memory` collects garbage and asks the C
allocator to give freed pages back to the OS (glibc's ``malloc_trim``; on CUDA the counters need
no such step). Without it, memory that an earlier model freed but the allocator kept would be
reused silently, and a later measurement would look smaller than the same one run first.

``parameter_bytes`` counts the bytes of parameters and buffers, deduplicating tensors that share
storage (tied input/output embeddings), which is the static part of the footprint.

A model's own peak (:func:`model_peak_bytes`) is therefore its weights and buffers plus the
largest increase over the baseline while it runs: neither term depends on what else the process
holds (an earlier model, the reference model, the Python heap), so the number does not change
with the order in which models are evaluated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, TypeVar

import psutil
import torch

from swiss_knife.evaluation.perplexity import model_device

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between RSS samples on the CPU path.
SAMPLE_INTERVAL_S = 0.005


@dataclass(frozen=True)
class MemoryResult:
    """Peak memory during a piece of work, next to the static size of the weights."""

    device: str
    peak_bytes: int
    baseline_bytes: int
    parameter_bytes: int
    buffer_bytes: int
    method: str  # "cuda_max_allocated" or "rss_sampled"
    #: Largest increase over ``baseline_bytes`` while the work ran.
    increase_bytes: int = 0
    #: Weights and buffers plus ``increase_bytes``: the model's own peak, whatever else is loaded.
    model_peak_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_unused_memory() -> None:
    """Collect garbage and return the C allocator's free pages to the OS, where it can."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def model_peak_bytes(memory: dict[str, Any]) -> int | None:
    """A model's own peak from a report's memory metrics: weights + largest increase while it ran.

    Reads ``model_peak_bytes`` when present, else derives it from the raw fields (reports written
    before it existed), or None when they are missing.
    """
    value = memory.get("model_peak_bytes")
    if value is not None:
        return int(value)
    try:
        weights = int(memory["parameter_bytes"]) + int(memory["buffer_bytes"])
        increase = max(0, int(memory["peak_bytes"]) - int(memory["baseline_bytes"]))
    except (KeyError, TypeError, ValueError):
        return None
    return weights + increase


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory behind ``tensor``, so tied or aliased weights count once."""
    ptr = tensor.data_ptr()
    # Meta tensors (and empty ones) all report data_ptr 0; they do not share memory, so fall
    # back to object identity for them.
    return (str(tensor.device), ptr if ptr != 0 else -id(tensor))


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(parameter_bytes, buffer_bytes)`` of ``model``, counting shared storage once."""
    seen: set[tuple[str, int]] = set()

    def total(tensors: list[torch.Tensor]) -> int:
        size = 0
        for tensor in tensors:
            key = _storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
            size += tensor.numel() * tensor.element_size()
        return size

    # Parameters first, so a buffer aliasing a parameter is attributed to the parameter.
    params = total(list(model.parameters()))
    buffers = total(list(model.buffers()))
    return params, buffers


class PeakMemory:
    """Context manager recording peak memory on ``device`` while its body runs.

    After exit, ``peak_bytes``, ``baseline_bytes``, ``increase_bytes`` and ``method`` are set::

        with PeakMemory("cpu") as pm:
            run_something()
        print(pm.increase_bytes)

    ``release=True`` (the default) frees unused memory before the baseline is read, so the
    increase counts what the body needs, not what an allocator happened to keep from earlier work.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        interval_s: float = SAMPLE_INTERVAL_S,
        *,
        release: bool = True,
    ):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.release = release
        self.method = "cuda_max_allocated" if self.device.type == "cuda" else "rss_sampled"
        if self.device.type not in ("cuda", "cpu"):
            logger.warning(
                "no allocator statistics for device %s; sampling process RSS instead", self.device
            )
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = int(self._process.memory_info().rss)
        # Plain int assignment under the GIL; the race with the exit sample only ever loses a
        # value that the exit sample itself re-reads.
        self.peak_bytes = max(self.peak_bytes, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def increase_bytes(self) -> int:
        """Largest increase over the baseline while the body ran (never negative)."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        if self.release:
            release_unused_memory()
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            self.peak_bytes = self.baseline_bytes
        else:
            self.baseline_bytes = int(self._process.memory_info().rss)
            self.peak_bytes = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self._sample()


def measure_memory(model: torch.nn.Module, fn: Callable[[], T]) -> tuple[T, MemoryResult]:
    """Run ``fn()`` under :class:`PeakMemory` on the model's device; return its value and memory.

    Typical use wraps an evaluation, e.g.
    ``ppl, mem = measure_memory(model, lambda: perplexity(model, tokens))``.
    """
    device = model_device(model)
    params, buffers = parameter_bytes(model)
    with PeakMemory(device) as pm:
        value = fn()
    return value, MemoryResult(
        device=str(device),
        peak_bytes=pm.peak_bytes,
        baseline_bytes=pm.baseline_bytes,
        parameter_bytes=params,
        buffer_bytes=buffers,
        method=pm.method,
        increase_bytes=pm.increase_bytes,
        model_peak_bytes=params + buffers + pm.increase_bytes,
    )
