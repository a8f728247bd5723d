"""Hybrid context parallelism: head all-to-all (Ulysses) inside a group × ring across groups.

A context-parallel group of U·R ranks is split into R all-to-all groups of U adjacent
ranks (one node's fast links) and U ring groups (the ranks at the same position in
every all-to-all group). The sequence is zigzag-sharded over the R ring positions, and
each ring shard is cut into U contiguous pieces, one per rank of the all-to-all group
(`hybrid_shard`). Attention then:

1. all-to-all inside the group: every rank trades its piece of all heads for the
   whole ring shard of H/U heads;
2. ring attention over the ring group on those heads (the zigzag layout over R);
3. all-to-all back.

U must divide both head counts (K/V travel with their own heads). U=1 is the plain
ring; R=1 is pure all-to-all attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dims import named_collectives
from .ring_attention import Documents, local_attention, ring_attention
from .zigzag import zigzag_shard, zigzag_unshard


def hybrid_shard(x: torch.Tensor, ring: int, a2a: int, ring_rank: int, a2a_rank: int, *, dim: int = 1,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's piece: the zigzag shard over the ring, then its contiguous 1/a2a of it."""
    shard = zigzag_shard(x, ring, ring_rank, dim=dim, cu_seqlens=cu_seqlens)
    n = shard.shape[dim]
    if n % a2a:
        raise ValueError(f"ring shard of {n} tokens does not split into {a2a} all-to-all pieces; "
                         f"pad to a multiple of 2*ring*a2a={2 * ring * a2a} with parallelism.zigzag.zigzag_pad")
    return shard.narrow(dim, a2a_rank * (n // a2a), n // a2a)


def hybrid_unshard(pieces: list[list[torch.Tensor]], *, dim: int = 1,
                   cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of hybrid_shard: pieces[ring_rank][a2a_rank]."""
    return zigzag_unshard([torch.cat(p, dim=dim) for p in pieces], dim=dim, cu_seqlens=cu_seqlens)


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S/U, H, D) pieces -> (B, S, H/U, D): gather the sequence, scatter the heads."""
    u = dist.get_world_size(group)
    b, s, h, d = x.shape
    # Chunk j of the heads goes to rank j; rank i's sequence piece lands at position i.
    send = x.reshape(b, s, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # (U, B, S/U, H/U, D)
    recv = torch.empty_like(send)
    with named_collectives(group, "all-to-all (sequence to heads)"):
        dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * s, h // u, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S, H/U, D) -> (B, S/U, H, D): the inverse of _seq_to_heads."""
    u = dist.get_world_size(group)
    b, s, hu, d = x.shape
    send = x.reshape(b, u, s // u, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # (U, B, S/U, H/U, D)
    recv = torch.empty_like(send)
    with named_collectives(group, "all-to-all (heads to sequence)"):
        dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // u, u * hu, d)


class _AllToAll(torch.autograd.Function):
    """Sequence pieces <-> head groups; each direction's backward is the other one."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, g):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(g.contiguous(), ctx.group), None, None


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    a2a_group,
    ring_group,
    causal: bool = True,
    cu_seqlens: torch.Tensor | Documents | None = None,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Exact attention over a sequence laid out by `hybrid_shard`.

    q: (B, S_piece, H_q, D), k/v: (B, S_piece, H_kv, D) -> (B, S_piece, H_q, D).
    a2a_group None: no all-to-all (U = 1), the plain ring over ring_group.
    """
    u = 1 if a2a_group is None else dist.get_world_size(a2a_group)
    for name, h in (("H_q", q.shape[2]), ("H_kv", k.shape[2])):
        if h % u:
            raise ValueError(f"hybrid_attention: the all-to-all degree {u} does not divide {name}={h}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5  # the head dim is unchanged by the head split
    qh, kh, vh = (_AllToAll.apply(t, a2a_group, True) if u > 1 else t for t in (q, k, v))
    if dist.get_world_size(ring_group) > 1:
        o = ring_attention(qh, kh, vh, group=ring_group, causal=causal, cu_seqlens=cu_seqlens,
                           softmax_scale=softmax_scale, kernel=kernel)
    else:
        o = local_attention(qh, kh, vh, causal=causal, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
                            kernel=kernel)
    return _AllToAll.apply(o, a2a_group, False) if u > 1 else o
