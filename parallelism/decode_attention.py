"""Attention of a new token over a key/value cache spread across a context-parallel group.

After a long prompt is prefilled with ring attention, each rank keeps the keys and values
of its own tokens as its KV cache: nothing is gathered, so a 1M-token cache never sits on
one rank. To decode one token, every rank holds the same query; each attends to its cache
shard alone (one block-kernel call, non-causal: the new token comes after everything
cached) and returns its partial output with its log-sum-exp. The partials merge exactly:

    m = max_r lse_r,   out = Σ_r exp(lse_r - m) · out_r  /  Σ_r exp(lse_r - m)

in float32, by two all-reduces (the max, then one sum over the weighted outputs and the
weights packed together). A rank whose shard is empty contributes weight 0. Every rank
ends with the same output, so the group agrees on the next token without another
message.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .attention_kernels import _expand_kv, resolve_kernel
from .dims import named_collectives


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """q: (B, 1, H_q, D), the same on every rank of `group`; k, v: (B, S_held, H_kv, D),
    this rank's cache shard (S_held may be 0 on some ranks, not on all). Returns
    (B, 1, H_q, D) in q's dtype, the same on every rank. group None: one process."""
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"decode_attention: one new token per call, got {t} (causality among new tokens is "
                         "not handled here; prefill them with ring attention)")
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    if k.shape[1]:
        blk = resolve_kernel(kernel, q.device, q.dtype, d)
        out, lse = blk.forward(q, _expand_kv(k, h), _expand_kv(v, h), False, scale)  # (B,1,H,D), (B,H,1)
        out, lse = out.float(), lse.float().transpose(1, 2)  # lse: (B, 1, H)
    else:
        out = q.new_zeros((b, t, h, d), dtype=torch.float32)
        lse = q.new_full((b, t, h), float("-inf"), dtype=torch.float32)
    if group is None or dist.get_world_size(group) == 1:
        if not k.shape[1]:
            raise ValueError("decode_attention: the cache is empty")
        return out.to(q.dtype)
    with named_collectives(group, "decode attention"):
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # (B, 1, H)
        w = torch.exp(lse - m)  # 0 where this rank holds nothing
        packed = torch.cat([out * w[..., None], w[..., None]], dim=-1)  # (B, 1, H, D + 1)
        dist.all_reduce(packed, group=group)
    return (packed[..., :d] / packed[..., d:]).to(q.dtype)
