"""Device choice (CUDA, then MPS, then CPU) and the facts `device-info` prints."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

import torch

from .errors import UserInputError

_LIBRARIES = (
    "swiss-knife",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "tokenizers",
    "bitsandbytes",
    "torchao",
    "compressed-tensors",
    "gguf",
    "lm-eval",
)


def resolve_device(name: str = "auto") -> torch.device:
    """Map a device name to a torch.device, refusing devices this machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("device 'cuda' was requested but no CUDA GPU is available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserInputError("device 'mps' was requested but MPS is not available here")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserInputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour changes results."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def _cpu_bf16_supported() -> bool:
    # Native bf16 matmuls need AVX-512 BF16 or AMX; without them bf16 is emulated and slow.
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()  # noqa: SIM115
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on `device`: a CUDA GPU with bf16
    tensor cores (compute capability 8.0+), or a CPU with AVX-512 BF16 or AMX (Linux flags)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(False))
    if device.type == "cpu":
        return _cpu_bf16_supported()
    return False


def device_info() -> dict[str, Any]:
    """Devices, memory, bf16 support and library versions, as plain data."""
    import psutil

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": {
            "cores_logical": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_total_bytes": psutil.virtual_memory().total,
            "memory_available_bytes": psutil.virtual_memory().available,
            "bf16_native": _cpu_bf16_supported(),
        },
        "cuda": [],
        "mps": bool(torch.backends.mps.is_available()),
        "default_device": str(resolve_device("auto")),
        "versions": library_versions(),
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["cuda"].append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_total_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}",
                    "bf16": bool(torch.cuda.is_bf16_supported()),
                }
            )
    return info


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the enclosed torch CPU work with `count` intra-op threads, then restore the setting.

    Loops of many tiny tensor ops (GPTQ's and SparseGPT's column-by-column updates: vectors of a
    few thousand floats) gain nothing from a thread pool, and lose badly when the machine is busy:
    each op ends in a barrier that waits for a worker thread the OS may have descheduled. Measured
    on a 2-core machine with other jobs running: the GPTQ loop of one 1536 x 576 weight took
    6.5 s with 2 threads and 0.13 s with 1. Big matmuls outside such loops keep every thread.
    """
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The thread counts that the enclosing `column_loop_threads` blocks took away, innermost last.
_LOOP_CALLERS: list[int] = []

# The smallest matrix (rows) whose O(n^3) factorisation gets every thread back inside a column
# loop: from here on one factorisation is billions of operations, and a thread pool's barriers
# cost nothing next to it (benchmarks/RESULTS.md, "Factorisation threads").
FACTOR_THREADS_MIN = 2048


def factorisation_threads(
    size: int, device: torch.device
) -> contextlib.AbstractContextManager[None]:
    """Every thread the caller had before a column loop took them (`column_loop_threads`), for
    the factorisation of a `size` x `size` matrix on the CPU when it is large enough to pay for
    a thread pool; otherwise the current setting."""
    if device.type != "cpu" or size < FACTOR_THREADS_MIN or not _LOOP_CALLERS:
        return contextlib.nullcontext()
    return intra_op_threads(max(_LOOP_CALLERS[-1], 1))


def column_loop_threads(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The thread setting for a column-by-column solve (GPTQ, SparseGPT) on `device`.

    One intra-op thread on the CPU (see `intra_op_threads`); GPU work is left as it is. A large
    factorisation inside gets the threads back (`factorisation_threads`).
    """
    if device.type != "cpu":
        return contextlib.nullcontext()
    return _column_loop()


@contextlib.contextmanager
def _column_loop() -> Iterator[None]:
    _LOOP_CALLERS.append(torch.get_num_threads())
    try:
        with intra_op_threads(1):
            yield
    finally:
        _LOOP_CALLERS.pop()
