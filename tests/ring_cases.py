"""Functions that run on every rank of a LocalWorld (they must be importable by name)."""

import torch
import torch.distributed as dist

from parallelism.ring_attention import ring_attention
from parallelism.zigzag import zigzag_shard


def ring_fwd_bwd(q, k, v, dout, *, causal, cu_seqlens=None, kernel="auto"):
    """Shards the full tensors for this rank, runs ring attention forward and backward.

    Returns this rank's (out, dq, dk, dv) shards.
    """
    W, r = dist.get_world_size(), dist.get_rank()
    qs, ks, vs, ds = (zigzag_shard(t, W, r, cu_seqlens=cu_seqlens).clone() for t in (q, k, v, dout))
    for t in (qs, ks, vs):
        t.requires_grad_(True)
    out = ring_attention(qs, ks, vs, causal=causal, cu_seqlens=cu_seqlens, kernel=kernel)
    out.backward(ds)
    return out.detach(), qs.grad, ks.grad, vs.grad


def ring_error(q, k, v, *, cu_seqlens=None, per_rank_q=None):
    """Calls ring_attention expecting a ValueError; returns its message."""
    if per_rank_q is not None:
        q = per_rank_q[dist.get_rank()]
    try:
        ring_attention(q, k, v, cu_seqlens=cu_seqlens)
    except ValueError as e:
        return str(e)
    return None


def mismatched_inputs(kind):
    """Rank 0 and rank 1 get inputs that disagree: the ring must raise, not hang or abort."""
    r = dist.get_rank()
    cu = None
    if kind == "length":
        x = torch.randn(1, 4 if r == 0 else 6, 2, 8)
    else:  # same shapes, different document boundaries
        x = torch.randn(1, 8, 2, 8)
        cu = torch.tensor([0, 8, 16] if r == 0 else [0, 4, 16], dtype=torch.int32)
    try:
        if kind == "prepared":  # checked once per batch, as the model does
            from parallelism.ring_attention import prepare_documents

            cu = torch.tensor([0, 8, 16] if r == 0 else [0, 4, 16], dtype=torch.int32)
            ring_attention(x, x, x, cu_seqlens=prepare_documents(cu, group=dist.group.WORLD))
        else:
            ring_attention(x, x, x, cu_seqlens=cu)
    except ValueError as e:
        return str(e)
    return None


def build_groups(cp):
    from parallelism.dims import ParallelDims

    groups = ParallelDims.infer(world_size=dist.get_world_size(), cp=cp).build()
    return dist.get_process_group_ranks(groups.cp_group), dist.get_process_group_ranks(groups.dp_group)


def ring_in_cp_groups(q_by_replica, k_by_replica, v_by_replica, dout_by_replica, cp):
    """dp x cp layout: each data-parallel replica runs its own ring on its own sample."""
    from parallelism.dims import ParallelDims

    groups = ParallelDims.infer(world_size=dist.get_world_size(), cp=cp).build()
    d, c = groups.dp_rank, groups.cp_rank
    qs, ks, vs, ds = (zigzag_shard(t[d], cp, c).clone() for t in (q_by_replica, k_by_replica, v_by_replica, dout_by_replica))
    for t in (qs, ks, vs):
        t.requires_grad_(True)
    out = ring_attention(qs, ks, vs, group=groups.cp_group, causal=True)
    out.backward(ds)
    return d, c, out.detach(), qs.grad, ks.grad, vs.grad


def only_rank0_calls_ring():
    """Rank 1 never joins: rank 0 must fail after the configured timeout, not hang."""
    if dist.get_rank() == 1:
        return "skipped"
    x = torch.randn(1, 4, 2, 8)
    ring_attention(x, x, x)
    return "finished"


def ring_fwd_bwd_cuda(q, k, v, dout, *, causal):
    """ring_fwd_bwd with the shards on this process's GPU; results come back on the CPU."""
    W, r = dist.get_world_size(), dist.get_rank()
    qs, ks, vs, ds = (zigzag_shard(t, W, r).cuda() for t in (q, k, v, dout))
    for t in (qs, ks, vs):
        t.requires_grad_(True)
    out = ring_attention(qs, ks, vs, causal=causal)
    out.backward(ds)
    return tuple(t.detach().cpu() for t in (out, qs.grad, ks.grad, vs.grad))


def hybrid_fwd_bwd(q, k, v, dout, *, a2a, causal, cu_seqlens=None):
    """cp = whole world as a2a x ring; returns (ring_rank, a2a_rank, out, dq, dk, dv) pieces."""
    from parallelism.dims import ParallelDims
    from parallelism.hybrid_attention import hybrid_attention, hybrid_shard

    W = dist.get_world_size()
    groups = ParallelDims.infer(world_size=W, cp=W, cp_a2a=a2a).build()
    ring_rank = dist.get_rank(groups.ring_group)
    a2a_rank = 0 if groups.a2a_group is None else dist.get_rank(groups.a2a_group)  # None: U = 1
    ring = W // a2a
    pieces = [hybrid_shard(t, ring, a2a, ring_rank, a2a_rank, cu_seqlens=cu_seqlens).clone() for t in (q, k, v, dout)]
    for t in pieces[:3]:
        t.requires_grad_(True)
    out = hybrid_attention(*pieces[:3], a2a_group=groups.a2a_group, ring_group=groups.ring_group, causal=causal,
                           cu_seqlens=cu_seqlens)
    out.backward(pieces[3])
    return ring_rank, a2a_rank, out.detach(), pieces[0].grad, pieces[1].grad, pieces[2].grad


def _ring_flash_attn_contract(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=False, group=None):
    """A stand-in for ring-flash-attn's `zigzag_ring_flash_attn_varlen_func`, written from
    its documented contract, independently of longview's ring: q (total_local, H_q, D),
    k, v (total_local, H_kv, D), `cu_seqlens` the local document offsets, each local
    document = [chunk r, chunk 2W-1-r] of the global one. Gathers every rank's pieces,
    rebuilds each document, attends in float64 and returns this rank's rows (forward only)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    pieces = [[torch.empty_like(t) for _ in range(W)] for t in (q, k, v)]
    for out, t in zip(pieces, (q, k, v)):
        dist.all_gather(out, t.contiguous(), group=group)
    cu = cu_seqlens.tolist()
    rows = []
    for a, b in zip(cu[:-1], cu[1:]):
        half = (b - a) // 2
        glob = []
        for per_rank in pieces:  # q, k, v of this document, in global order
            chunks = [None] * (2 * W)
            for rr in range(W):
                chunks[rr], chunks[2 * W - 1 - rr] = per_rank[rr][a:a + half], per_rank[rr][a + half:b]
            glob.append(torch.cat(chunks).double())
        gq, gk, gv = glob
        gk, gv = (t.repeat_interleave(gq.shape[1] // t.shape[1], dim=1) for t in (gk, gv))
        scores = torch.einsum("qhd,khd->hqk", gq, gk) * softmax_scale
        if causal:
            n = gq.shape[0]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), gv)
        rows += [out[r * half:(r + 1) * half], out[(2 * W - 1 - r) * half:(2 * W - r) * half]]
    return torch.cat(rows).to(q.dtype)


def ring_flash_attn_adapter(q, k, v, *, causal, cu_seqlens=None):
    """(this rank's output through the ring-flash-attn adapter, longview's ring's), the
    package replaced by `_ring_flash_attn_contract` (it needs CUDA)."""
    import sys
    import types

    from parallelism import ring_flash_attn
    from parallelism.ring_attention import Documents

    W, r = dist.get_world_size(), dist.get_rank()
    qs, ks, vs = (zigzag_shard(t, W, r, cu_seqlens=cu_seqlens) for t in (q, k, v))
    docs = (Documents.from_cu_seqlens(cu_seqlens).local(W, qs.shape[1]) if cu_seqlens is not None
            else [(0, qs.shape[1])])
    sys.modules["ring_flash_attn"] = types.SimpleNamespace(zigzag_ring_flash_attn_varlen_func=_ring_flash_attn_contract)
    try:  # this worker process serves other tests after this one
        got = ring_flash_attn.ring_flash_attention(qs, ks, vs, group=dist.group.WORLD, causal=causal, docs=docs,
                                                   softmax_scale=q.shape[-1] ** -0.5)
    finally:
        del sys.modules["ring_flash_attn"]
    return got, ring_attention(qs, ks, vs, causal=causal, cu_seqlens=cu_seqlens)
