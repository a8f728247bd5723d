"""Neighbour exchange for ring attention.

`RingComm.start(tensors)` sends the tensors to the next rank of the ring and receives
same-shaped tensors from the previous one, asynchronously (`batch_isend_irecv`), so the
caller computes on the current block while the next one is in flight. Receive buffers
alternate between two sets (double buffering): a buffer is only reused after the
transfer that read it has been waited on.

`SimulatedRing` plays one rank's part of the schedule in a single process, handing out
the shards of the other ranks instead of communicating. It exists for the one-GPU
benchmark (kernel + merge efficiency without a network) and for fast schedule tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class Pending:
    def __init__(self, reqs, bufs, staged=None):
        self._reqs, self._bufs, self._staged = reqs, bufs, staged

    def wait(self) -> list[torch.Tensor]:
        for r in self._reqs:
            r.wait()
        if self._staged is not None:  # gloo + CUDA: received on CPU, move to the GPU
            for dst, src in zip(self._staged, self._bufs):
                dst.copy_(src, non_blocking=False)
            return self._staged
        return self._bufs


_TAGS = {"kv": 0, "grad": 16}


class RingComm:
    """Sends to rank+1 and receives from rank-1 within `group`.

    Two channels, each double-buffered: "kv" carries K/V forward (and again in the
    backward), "grad" carries the float32 dK/dV accumulators in the backward. They are
    separate so a transfer on one channel never overwrites a buffer the other is using.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._next = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self._prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)
        # gloo cannot send CUDA tensors point to point (torch raises); stage them through
        # host memory so several ranks on one GPU can still check the CUDA path.
        self._gloo = dist.get_backend(self.group) == "gloo"
        self._bufs: dict[str, list[list[torch.Tensor]]] = {}
        self._flip: dict[str, int] = {}

    def _buffers(self, channel: str, tensors: Sequence[torch.Tensor], on_cpu: bool) -> list[torch.Tensor]:
        if channel not in self._bufs:
            def alloc():
                return [torch.empty(t.shape, dtype=t.dtype, device="cpu" if on_cpu else t.device) for t in tensors]
            self._bufs[channel] = [alloc(), alloc()]
            self._flip[channel] = 0
        self._flip[channel] ^= 1
        return self._bufs[channel][self._flip[channel]]

    def _start(self, channel: str, tensors: Sequence[torch.Tensor]) -> Pending:
        stage = self._gloo and tensors[0].is_cuda
        send = [t.cpu() for t in tensors] if stage else [t.contiguous() for t in tensors]
        bufs = self._buffers(channel, tensors, on_cpu=stage)
        # Distinct tags per channel and tensor: K and V have the same shape, and a
        # transport that matched messages by arrival order could otherwise swap them.
        base = _TAGS[channel]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group, base + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, b, self._prev, self.group, base + i) for i, b in enumerate(bufs)]
        reqs = dist.batch_isend_irecv(ops)
        staged = [torch.empty_like(t) for t in tensors] if stage else None
        return Pending(reqs, bufs, staged)

    def start_kv(self, tensors: Sequence[torch.Tensor], step: int) -> Pending:
        """Passes the K/V held at `step` on; delivers those of step + 1."""
        return self._start("kv", tensors)

    def start_grad(self, tensors: Sequence[torch.Tensor]) -> Pending:
        return self._start("grad", tensors)


class _Done(Pending):
    def __init__(self, tensors):
        super().__init__([], list(tensors))


class SimulatedRing:
    """One rank's view of a ring whose other ranks live in this process.

    `kv_by_rank[r]` holds rank r's (k, v). `start_kv` returns the K/V of the rank one
    step further back, as a real ring would deliver them. `start_grad` hands the dK/dV
    accumulators back unchanged: their values are meaningless here, which is fine for
    timing (the compute is the same) but not for gradient checks.
    """

    def __init__(self, rank: int, kv_by_rank: Sequence[Sequence[torch.Tensor]]):
        self.world_size = len(kv_by_rank)
        self.rank = rank
        self._kv = kv_by_rank

    def start_kv(self, tensors: Sequence[torch.Tensor], step: int) -> Pending:
        src = (self.rank - step - 1) % self.world_size
        return _Done(self._kv[src])

    def start_grad(self, tensors: Sequence[torch.Tensor]) -> Pending:
        return _Done(tensors)
