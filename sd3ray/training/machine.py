"""What the device is, in the words a measurement is reported with, and what it has that the step's choices
depend on (native bf16 matrix units on a CPU)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo spells them) whose bf16 matrix instructions make bf16 autocast a candidate on CPU:
# Intel AMX tiles, and AVX-512 BF16 dot products. Without either, bf16 only adds casts.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_native_bf16() -> list[str]:
    """The native bf16 matrix features of this CPU (empty when it has none)."""
    return [flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()]


def describe_machine(device: torch.device) -> str:
    """One line naming the device a figure was measured on: the GPU's name, or the CPU's model, its threads,
    PyTorch's kernel capability and its native bf16 units."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    bf16 = ", ".join(cpu_native_bf16()) or "no native bf16"
    return (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
            f"{bf16} (torch {torch.__version__})")


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process has held so far: the GPU's allocator peak, or on a CPU the process's peak
    resident set (what decides whether a bigger batch fits)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20
