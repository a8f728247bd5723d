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


__all__ = ["TensorMemoryPeak", "model_state_tensors"]
