"""Peak tensor memory of a piece of work, on CPU as on GPU.

On CUDA the caching allocator counts for us (`torch.cuda.max_memory_allocated`). On CPU
nothing does, and the process RSS mixes in the interpreter, libraries and allocator
caches, so `TensorMemoryPeak` counts tensor storages itself: every tensor an operator
creates passes through a dispatch mode, its storage's bytes are added while it lives
(a weak reference tells when it dies), and the high-water mark is kept. Tensors that
exist before the mode starts (parameters, gradients, optimizer states) are added with
`track`. This is the figure the planner predicts: bytes of live tensors, not RSS.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryPeak(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self._live: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _forget(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type or t.is_meta:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functional)
            return
        key = id(st)
        if key in self._live:
            return
        self._live[key] = st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._forget(k))
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)

    def track(self, tensors) -> None:
        """Counts tensors made before the mode started (each storage once)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.detach())

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def model_state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Parameters, their gradients and the optimizer's state tensors."""
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class StepMemoryProbe:
    """One step's measured peak tensor memory beside a planner's prediction.

    Measured: CUDA's allocator peak, or on CPU the live-tensor tracker (only where every
    model-state tensor is visible to it, i.e. without DeepSpeed's flat buffers). The
    largest rank's figures are compared (one MAX all-reduce, on every rank: call `report`
    on all of them)."""

    def __init__(self, engine, device: torch.device):
        self.device, self.mode = device, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif engine.ds is None:
            self.mode = TensorMemoryPeak("cpu")
            self.mode.track(model_state_tensors(engine.module, engine.optimizer))

    def __enter__(self):
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
        return False

    def report(self, predicted: dict[str, float] | None) -> tuple[dict[str, float], str]:
        """(metrics to log with the step, one line for the log). `predicted`: the
        planner's bytes by part with a "total", or None for a workload without one."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            measured = float(torch.cuda.max_memory_allocated(self.device))
        else:
            measured = float(self.mode.peak) if self.mode is not None else float("nan")
        total = float("nan") if predicted is None else predicted["total"]
        both = torch.tensor([total, measured], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX)  # NaN (not measured / not predicted) stays NaN
        predicted_mib, measured_mib = (float(x) / 2**20 for x in both)
        metrics, parts = {}, []
        if predicted is not None:
            metrics["memory_predicted_mib"] = predicted_mib
            parts.append(f"predicted {predicted_mib:.1f} MiB")
        if measured_mib == measured_mib:  # not NaN
            metrics["memory_measured_mib"] = measured_mib
            parts.append(f"measured peak {measured_mib:.1f} MiB")
            if predicted is not None:
                err = 100 * (predicted_mib - measured_mib) / measured_mib
                metrics["memory_error_pct"] = err
                parts[-1] += f" ({err:+.1f}%)"
        else:
            parts.append("no measurement: DeepSpeed on CPU keeps buffers the tracker cannot see")
        where = ("memory per GPU" if self.device.type == "cuda"
                 else "memory per worker (live CPU tensors, the planner's per-GPU bytes)")
        return metrics, f"{where}: " + ", ".join(parts)


__all__ = ["StepMemoryProbe", "TensorMemoryPeak", "model_state_tensors"]
