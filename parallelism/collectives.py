"""Differentiable collectives used between model pieces (groups always explicit)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dims import named_collectives


class _GatherRows(torch.autograd.Function):
    """All-gather of dim 0 with per-rank row counts that may differ.

    Backward: every rank's output gradient covers all rows; the gradient of a rank's own
    rows is the sum of those slices over the group (each rank used the gathered rows).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, counts: list[int]):
        rank = dist.get_rank(group)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        width = max(counts)
        # Pad to the largest count: all_gather needs equal shapes.
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        with named_collectives(group, "all-gather of rows"):
            dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        with named_collectives(ctx.group, "all-gather of rows (backward)"):
            dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup, counts: list[int]) -> torch.Tensor:
    """Concatenates every rank's `x` (counts[r] rows on rank r) in rank order, with autograd."""
    if dist.get_world_size(group) == 1:
        return x
    if x.shape[0] != counts[dist.get_rank(group)]:
        raise ValueError(f"gather_rows: this rank has {x.shape[0]} rows but counts say {counts[dist.get_rank(group)]}")
    return _GatherRows.apply(x, group, counts)


def split_evenly(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items are split into `parts` nearly equal runs."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)
