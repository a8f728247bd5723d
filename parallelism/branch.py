"""Communication between branch groups (PIIP): batch-sliced, autograd-aware exchange.

Each branch runs on its own range of ranks; inside a branch the batch is split evenly
over its ranks. When two branches exchange features, rank i of branch a must send the
rows of its batch slice to whichever ranks of branch b hold those samples, and receive
theirs. `exchange` does both directions at once with `batch_isend_irecv`; its backward
sends the gradient of what was received back to where it came from and receives the
gradient of what was sent, so the backward crosses groups exactly like the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import split_evenly
from .dims import BranchLayout, named_collectives


@dataclass(frozen=True)
class Route:
    peer: int  # global rank
    mine: tuple[int, int]  # rows [lo, hi) of my local batch
    theirs: tuple[int, int]  # the same samples' rows in the peer's local batch


def batch_slice(layout: BranchLayout, branch: int, rank: int, batch: int) -> tuple[int, int]:
    """Global batch rows [lo, hi) held by `rank` of `branch`."""
    ranks = layout.ranks(branch)
    return split_evenly(batch, len(ranks), ranks.index(rank))


def routes(layout: BranchLayout, rank: int, other_branch: int, batch: int) -> list[Route]:
    """Who holds the samples of my batch slice in `other_branch`, slice by slice."""
    lo, hi = batch_slice(layout, layout.branch_of(rank), rank, batch)
    out = []
    for peer in layout.ranks(other_branch):
        plo, phi = batch_slice(layout, other_branch, peer, batch)
        a, b = max(lo, plo), min(hi, phi)
        if a < b:
            out.append(Route(peer, (a - lo, b - lo), (a - plo, b - plo)))
    return out


def _swap(send: torch.Tensor, recv: torch.Tensor, rts: list[Route], tag: int) -> None:
    """Sends rows of `send` and fills rows of `recv` along the routes (same slices both ways)."""
    ops, bufs = [], []
    for r in rts:
        lo, hi = r.mine
        ops.append(dist.P2POp(dist.isend, send[lo:hi].contiguous(), r.peer, tag=tag))
        buf = torch.empty((hi - lo, *recv.shape[1:]), dtype=recv.dtype, device=recv.device)
        ops.append(dist.P2POp(dist.irecv, buf, r.peer, tag=tag))
        bufs.append((lo, hi, buf))
    if ops:
        with named_collectives(None, f"PIIP feature exchange with ranks {sorted({r.peer for r in rts})}"):
            for req in dist.batch_isend_irecv(ops):
                req.wait()
    for lo, hi, buf in bufs:
        recv[lo:hi] = buf


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_shape, rts, tag):
        ctx.rts, ctx.tag, ctx.x_shape = rts, tag, x.shape
        out = x.new_empty(recv_shape)
        _swap(x, out, rts, tag)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = grad.new_empty(ctx.x_shape)
        _swap(grad.contiguous(), gx, ctx.rts, ctx.tag + 1)
        return gx, None, None, None


def exchange(x: torch.Tensor, recv_tail: tuple[int, ...], rts: list[Route], tag: int) -> torch.Tensor:
    """Sends x (B_local, ...) along `rts` and returns what the peers send: (B_local, *recv_tail).

    Both sides of a pair must call it with matching routes and the same `tag` (use a
    distinct even tag per exchange: the backward uses tag + 1).
    """
    return _Exchange.apply(x, (x.shape[0], *recv_tail), rts, tag)
