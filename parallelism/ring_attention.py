"""Context-parallel ring attention over zigzag-sharded sequences.

Each rank keeps its query shard and passes K/V around the ring. At step s rank r holds
the K/V of rank src = (r - s) mod W. With zigzag sharding (rank r holds chunks r and
2W-1-r of every document, each c tokens), the causal structure of a step is:

    src == r : local Q against local K/V, causal (the only square, diagonal block)
    src <  r : all local Q against the first half of src's K/V (chunk src < chunk r),
               full; src's second chunk lies in the future of both local chunks
    src >  r : the second half of local Q (chunk 2W-1-r) against all of src's K/V,
               full; the first local chunk r precedes both of src's chunks

so every step does the same amount of work on every rank. Partial results merge in
float32 with their log-sum-exp. The backward runs the ring again with the final
output and LSE; the dK/dV accumulators travel with the K/V (in float32) and arrive at
their owner after one more hop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from .attention_kernels import (
    RING_KERNELS,
    BlockKernel,
    check_kernel,
    resolve_kernel,
)
from .dims import named_collectives
from .ring_comm import Pending, RingComm, SimulatedRing


class Ring(Protocol):
    world_size: int
    rank: int

    def start_kv(self, tensors: Sequence[torch.Tensor], step: int) -> Pending: ...

    def start_grad(self, tensors: Sequence[torch.Tensor]) -> Pending: ...


@dataclass(frozen=True)
class Block:
    """One kernel call: local Q rows [q0, q0+nq) against the held K/V rows [k0, k0+nk)."""

    q0: int
    nq: int
    k0: int
    nk: int
    causal: bool


def plan_step(rank: int, src: int, causal: bool, docs: Sequence[tuple[int, int]]) -> list[Block]:
    """Blocks of one ring step. `docs` are (local offset, local length) of each document."""
    blocks = []
    for off, n in docs:
        c = n // 2  # each local document is two zigzag chunks of c tokens
        if not causal:
            blocks.append(Block(off, n, off, n, False))
        elif src == rank:
            blocks.append(Block(off, n, off, n, True))
        elif src < rank:
            blocks.append(Block(off, n, off, c, False))
        else:
            blocks.append(Block(off + c, c, off, n, False))
    return blocks


# Block outputs wait until this many bytes are pending, then merge in one pass.
# Merging every block on arrival costs ~6 element-wise passes over the float32 output
# per block, which dominates at short local lengths (measured on one H200, simulated
# 128K-token ring with cuDNN blocks: 259 TFLOP/s per rank at W=32 against 548 at W=4).
# A multi-way merge costs one pass per block plus one.
# The merge's share of the time falls as S_local grows (blocks cost S_local^2, merges
# S_local), so a fixed budget batches many small blocks and only a few large ones,
# and bounds the extra memory at 256 MiB plus one block.
MERGE_BUDGET_BYTES = 256 << 20


class _Merger:
    """Accumulates block results (o_b, lse_b) into the float32 (out, lse) of all rows.

    out: (B, S_local, H, D) fp32, lse: (B, H, S_local) fp32, starting at 0 and -inf.
    Blocks are grouped by their row range; a flush merges each group as
        lse' = logsumexp(lse, lse_1, ..., lse_n)
        out' = out * exp(lse - lse') + sum_i o_i * exp(lse_i - lse')
    which is exact in float32 and never exponentiates a positive number.
    """

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, budget_bytes: int | None = None):
        self.out, self.lse = out, lse
        self.budget = MERGE_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.pending: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.bytes = 0

    def add(self, q0: int, nq: int, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        self.pending.setdefault((q0, nq), []).append((o_b, lse_b))
        self.bytes += o_b.numel() * o_b.element_size()
        if self.bytes >= self.budget:
            self.flush()

    def flush(self) -> None:
        for (q0, nq), blocks in self.pending.items():
            out = self.out[:, q0 : q0 + nq]  # (B, n, H, D)
            lse = self.lse[:, :, q0 : q0 + nq]  # (B, H, n)
            lses = torch.stack([lse] + [l_b for _, l_b in blocks])  # (1+n_blocks, B, H, n)
            new = torch.logsumexp(lses, dim=0)
            # Rows never merged before have lse=-inf: exp(-inf - new) = 0, as wanted.
            w = torch.exp(lses - new).transpose(2, 3).unsqueeze(-1)  # (1+n_blocks, B, n, H, 1)
            out.mul_(w[0])
            for i, (o_b, _) in enumerate(blocks, start=1):
                out.addcmul_(o_b, w[i])
            lse.copy_(new)
        self.pending.clear()
        self.bytes = 0


def _ring_forward(q, k, v, ring: Ring, causal, scale, kernel: BlockKernel, docs):
    """Returns out (B, S_local, H_q, D) in fp32 and lse (B, H_q, S_local) in fp32."""
    W, r = ring.world_size, ring.rank
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    merger = _Merger(out, lse)
    k_cur, v_cur = k, v
    for step in range(W):
        pending = ring.start_kv([k_cur, v_cur], step) if step + 1 < W else None
        src = (r - step) % W
        for b in plan_step(r, src, causal, docs):
            o_b, lse_b = kernel.forward(
                q[:, b.q0 : b.q0 + b.nq], k_cur[:, b.k0 : b.k0 + b.nk], v_cur[:, b.k0 : b.k0 + b.nk], b.causal, scale
            )
            merger.add(b.q0, b.nq, o_b, lse_b)
        if pending is not None:
            k_cur, v_cur = pending.wait()
    merger.flush()
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, ring: Ring, causal, scale, kernel: BlockKernel, docs):
    W, r = ring.world_size, ring.rank
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # dK/dV of the K/V currently held; float32 so W partial sums do not lose bits.
    dk_step = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv_step = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    k_cur, v_cur = k, v
    grad_pending: Pending | None = None
    for step in range(W):
        kv_pending = ring.start_kv([k_cur, v_cur], step) if step + 1 < W else None
        src = (r - step) % W
        dk_step.zero_()
        dv_step.zero_()
        for b in plan_step(r, src, causal, docs):
            qs, ks = slice(b.q0, b.q0 + b.nq), slice(b.k0, b.k0 + b.nk)
            dq_b, dk_b, dv_b = kernel.backward(
                dout[:, qs], q[:, qs], k_cur[:, ks], v_cur[:, ks], out[:, qs], lse[:, :, qs], b.causal, scale
            )
            dq[:, qs] += dq_b
            dk_step[:, ks] += dk_b
            dv_step[:, ks] += dv_b
        if grad_pending is None:  # step 0: this rank's own K/V, accumulator starts here
            dk_acc, dv_acc = dk_step.clone(), dv_step.clone()
        else:  # the accumulator for src's K/V arrived from the previous rank
            dk_acc, dv_acc = grad_pending.wait()
            dk_acc.add_(dk_step)
            dv_acc.add_(dv_step)
        if W > 1:
            # After the last step the accumulator belongs to rank r+1: one more hop.
            grad_pending = ring.start_grad([dk_acc, dv_acc])
        if kv_pending is not None:
            k_cur, v_cur = kv_pending.wait()
    if W > 1:
        dk_acc, dv_acc = grad_pending.wait()
    return dq.to(q.dtype), dk_acc.to(k.dtype, copy=True), dv_acc.to(v.dtype, copy=True)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, scale, kernel, docs):
        out32, lse = _ring_forward(q, k, v, ring, causal, scale, kernel, docs)
        out = out32.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.kernel, ctx.docs = ring, causal, scale, kernel, docs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with named_collectives(getattr(ctx.ring, "group", None), "ring attention (backward)"):
            dq, dk, dv = _ring_backward(
                dout.contiguous(), q, k, v, out, lse, ctx.ring, ctx.causal, ctx.scale, ctx.kernel, ctx.docs
            )
        return dq, dk, dv, None, None, None, None, None


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("ring_attention got a group but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _validate(q, k, v, world_size: int, cu_seqlens) -> list[tuple[int, int]]:
    """Checks the inputs and returns the local (offset, length) of every document."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be (B, S_local, H, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"ring_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"ring_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"ring_attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    (bq, sq, hq, dq), (bk, sk, hk, dk) = q.shape, k.shape
    if (bq, sq, dq) != (bk, sk, dk):
        raise ValueError(
            f"ring_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head dim"
        )
    if hq % hk:
        raise ValueError(f"ring_attention: H_q={hq} is not a multiple of H_kv={hk} (GQA needs whole groups)")
    multiple = 2 * world_size
    if cu_seqlens is None:
        if world_size > 1 and sq % 2:
            raise ValueError(
                f"ring_attention: global length {sq * world_size} (S_local={sq} x {world_size} ranks) is not "
                f"a multiple of 2*world_size={multiple}; pad with parallelism.zigzag.zigzag_pad"
            )
        return [(0, sq)]
    if bq != 1:
        raise ValueError(f"ring_attention: with cu_seqlens the batch must be 1 (packed), got B={bq}")
    if not isinstance(cu_seqlens, Documents):
        cu_seqlens = Documents.from_cu_seqlens(cu_seqlens)  # a host sync: prefer prepare_documents once
    return cu_seqlens.local(world_size, sq)


@dataclass(frozen=True)
class Documents:
    """The global document offsets of one packed sequence, read off the device once.

    Built once per batch (`prepare_documents`) and handed to every layer's attention, so
    no layer call syncs with the host to read `cu_seqlens` or all-reduces to check that
    the ranks agree; `local` only does arithmetic on Python integers."""

    offsets: tuple[int, ...]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> Documents:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError("ring_attention: cu_seqlens must be a 1-D int32 tensor of global offsets starting at 0")
        return cls(tuple(int(x) for x in cu_seqlens.tolist()))

    def local(self, world_size: int, s_local: int) -> list[tuple[int, int]]:
        """(offset, length) of every document in a rank's zigzag shard of S_local tokens."""
        offs = self.offsets
        if offs[0] != 0 or offs[-1] != s_local * world_size:
            raise ValueError(
                f"ring_attention: cu_seqlens must run from 0 to the global length {s_local * world_size}, "
                f"got {offs[0]}..{offs[-1]}"
            )
        multiple = 2 * world_size
        docs = []
        for i, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
            if b - a <= 0 or (b - a) % multiple:
                raise ValueError(
                    f"ring_attention: document {i} has length {b - a}, not a positive multiple of "
                    f"2*world_size={multiple}; pad with parallelism.zigzag.zigzag_pad"
                )
            docs.append((a // world_size, (b - a) // world_size))
        return docs


def prepare_documents(cu_seqlens: torch.Tensor | None, *, group=None) -> Documents | None:
    """`cu_seqlens` checked once for a whole forward and backward: read to the host, and,
    over `group`, compared across ranks (one all-reduce): different document lists on
    different ranks would silently give a wrong answer. Pass the result as `cu_seqlens`
    to every attention call of the batch."""
    if cu_seqlens is None:
        return None
    docs = Documents.from_cu_seqlens(cu_seqlens)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        with named_collectives(group, "document offsets check"):
            sig = [len(docs.offsets), sum(i * x for i, x in enumerate(docs.offsets, 1))]
            t = torch.tensor(sig + [-x for x in sig], dtype=torch.int64,
                             device=cu_seqlens.device if dist.get_backend(group) == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            hi, lo = t[:2].tolist(), [-x for x in t[2:].tolist()]
        if hi != lo:
            raise ValueError(f"ring_attention: ranks of the group got different document offsets "
                             f"(count {lo[0]}..{hi[0]}); this rank has {docs.offsets}")
    return docs


_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


def _check_ranks_agree(group, q, k, cu_seqlens) -> None:
    """Raises if the ranks of `group` were given differently shaped inputs.

    A shape mismatch would otherwise surface as an abort deep inside the transport (gloo
    kills the process) or a hang (NCCL), and different `cu_seqlens` would silently give
    a wrong answer. One all-reduce of a few integers per call costs microseconds next to
    the attention itself.
    """
    cu_sig = 0
    if cu_seqlens is not None:  # order-sensitive checksum of the document offsets
        weights = torch.arange(1, cu_seqlens.numel() + 1, device=cu_seqlens.device)
        cu_sig = int((cu_seqlens.long() * weights).sum())
    sig = [*q.shape, k.shape[2], _DTYPE_CODES.get(q.dtype, 0), 0 if cu_seqlens is None else cu_seqlens.numel(), cu_sig]
    dev = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(sig + [-x for x in sig], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = t[: len(sig)].tolist(), [-x for x in t[len(sig) :].tolist()]
    if hi != lo:
        names = ["B", "S_local", "H_q", "D", "H_kv", "dtype", "num_cu_seqlens", "cu_seqlens_checksum"]
        bad = [f"{n} ranges {a}..{b}" for n, a, b in zip(names, lo, hi) if a != b]
        raise ValueError(
            f"ring_attention: ranks of the group got different inputs ({', '.join(bad)}); "
            f"this rank has q {tuple(q.shape)}, k {tuple(k.shape)}"
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    cu_seqlens: torch.Tensor | Documents | None = None,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Exact attention over a sequence zigzag-sharded across `group`.

    q: (B, S_local, H_q, D); k, v: (B, S_local, H_kv, D), sharded with
    `parallelism.zigzag.zigzag_shard` over `group` (None = the default group, or a
    single process when torch.distributed is not initialised). Returns
    (B, S_local, H_q, D) in q's dtype. With `cu_seqlens` (global int32 document offsets)
    B must be 1 and attention stays within each document; pass `prepare_documents(...)`
    instead of the tensor when several calls share one batch (every decoder layer).
    """
    world_size, _ = _group_size_rank(group)
    docs = _validate(q, k, v, world_size, cu_seqlens)
    with named_collectives(group, "ring attention"):
        if world_size > 1 and not isinstance(cu_seqlens, Documents):
            # prepared documents were compared across ranks once; the shapes follow from them
            _check_ranks_agree(group, q, k, cu_seqlens)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        if kernel in RING_KERNELS:  # a kernel that runs the whole ring itself
            check_kernel(kernel, q.device, q.dtype, q.shape[-1])
            return RING_KERNELS[kernel].attention(q, k, v, group=group, causal=causal, docs=docs,
                                                  softmax_scale=scale)
        blk = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
        ring: Ring = RingComm(group) if world_size > 1 else _SingleRank()
        return _RingAttention.apply(q, k, v, ring, causal, scale, blk, docs)


class _SingleRank:
    """The ring of one rank: no transfers ever start."""

    world_size = 1
    rank = 0

    def start_kv(self, tensors, step):  # pragma: no cover - never called with W == 1
        raise AssertionError("a single rank never exchanges K/V")

    def start_grad(self, tensors):  # pragma: no cover
        raise AssertionError("a single rank never exchanges dK/dV")


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """The same attention on one process, whatever torch.distributed is doing.

    For a model that is not context-parallel (or a data-parallel-only run, where
    `group=None` would wrongly mean the whole world). Handles packed documents.
    """
    docs = _validate(q, k, v, 1, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    blk = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
    return _RingAttention.apply(q, k, v, _SingleRank(), causal, scale, blk, docs)


def simulated_ring_attention(
    q: torch.Tensor,
    kv_by_rank: Sequence[Sequence[torch.Tensor]],
    rank: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Runs `rank`'s exact ring schedule in one process (see `SimulatedRing`).

    Forward values are exact; gradients of K/V are not (no accumulator travels), so use
    it for forward checks and for timing the forward+backward compute.
    """
    ring = SimulatedRing(rank, kv_by_rank)
    k, v = kv_by_rank[rank]
    docs = _validate(q, k, v, ring.world_size, None)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    blk = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
    return _RingAttention.apply(q, k, v, ring, causal, scale, blk, docs)
