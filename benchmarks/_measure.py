"""Shared helpers for the benchmark scripts: process memory on Linux, tensor memory peaks."""

from __future__ import annotations


def status_mib(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak() -> None:
    """Sets the peak-RSS mark (VmHWM) back to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_tensor_bytes(device, fn, tracked=()) -> int:
    """Peak tensor bytes while fn runs: CUDA's allocator statistics, or on CPU the live
    tensors (`workloads.memory.TensorMemoryPeak`) counting `tracked`, made before, too."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from workloads.memory import TensorMemoryPeak

    mode = TensorMemoryPeak("cpu")
    with mode:
        mode.track(tracked)
        mode.reset_peak()
        fn()
    return mode.peak


def empty_cache(device) -> None:
    """Returns the CUDA allocator's cached blocks between cases (nothing to do on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
