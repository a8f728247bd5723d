"""ring-flash-attn's zigzag ring (`zigzag_ring_flash_attn_varlen_func`) behind longview's
ring interface, for GPU clusters that have the package (the `gpu` extra's flash-attn and
`ring-flash-attn`). Chosen with `parallelism.kernel: ring_flash_attn`.

The two rings lay a sequence out the same way: each document (a multiple of 2W tokens)
in 2W chunks, rank r holding chunks r and 2W-1-r, one after the other; a rank's packed
documents one after the other. So the only translation is of shapes and offsets:
longview's (B, S_local, H, D) with global document offsets becomes ring-flash-attn's
(total_local, H, D) with local offsets (each global offset / W), and back. GQA needs no
expansion: flash-attn's varlen kernels take K/V with their own head count.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch

NAME = "ring_flash_attn"


@functools.cache  # asked at every attention call (`check_kernel`): look once per process
def installed() -> bool:
    # find_spec only: importing ring_flash_attn imports flash-attn, which needs CUDA.
    return importlib.util.find_spec("ring_flash_attn") is not None


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ring-flash-attn cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"it runs on CUDA devices only, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 or bfloat16, not {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"flash-attn takes head dims that are multiples of 8 up to 256, not {head_dim}"
    if not installed():
        return "the ring-flash-attn package is not installed (pip install 'longview[gpu]')"
    return None


def ring_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, causal: bool,
                         docs: Sequence[tuple[int, int]], softmax_scale: float) -> torch.Tensor:
    """q: (B, S_local, H_q, D), k, v: (B, S_local, H_kv, D), zigzag-sharded over `group`;
    docs: the local (offset, length) of each packed document (B == 1), or [(0, S_local)]
    for B rows of one sequence each. Returns (B, S_local, H_q, D)."""
    from ring_flash_attn import zigzag_ring_flash_attn_varlen_func

    b, s, h, d = q.shape
    lengths = [n for _, n in docs] * b  # B > 1: each row is one document
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    out = zigzag_ring_flash_attn_varlen_func(
        q.reshape(b * s, h, d), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu.to(q.device), max(lengths), softmax_scale=softmax_scale, causal=causal, group=group)
    return out.reshape(b, s, h, d)  # (B, S_local, H_q, D)
