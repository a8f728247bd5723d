"""Block attention kernels that return the log-sum-exp of each query row.

The ring merges partial results, so every block call must return its softmax
normaliser (the log-sum-exp, LSE) next to the output, and the backward must accept the
*final* output and LSE of the whole row (not the block's). These kernels wrap the
fused ops that do exactly that:

- `cpu_flash`: aten `_scaled_dot_product_flash_attention_for_cpu` (+ backward).
- `cudnn`, `flash`, `efficient`: the CUDA SDPA ops of the same names.
- `flash_attn`: the flash-attn package's `_flash_attn_forward/_backward` (`gpu` extra).

Beside them, whole-ring kernels (`RING_KERNELS`) run the ring themselves (transfers
included) and replace longview's: `ring_flash_attn`, ring-flash-attn's zigzag ring.
`check_kernel` and `KERNEL_CHOICES` cover both kinds: a name is one or the other.

All kernels use the (B, S, H, D) layout on both sides; the aten ops want (B, H, S, D),
which is a transposed view (no copy). LSE is always (B, H, S) float32.

A causal block here is always square (a rank's own Q against its own K/V), so the
alignment of the causal mask (top-left vs bottom-right) never matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ring_flash_attn

aten = torch.ops.aten



class KernelUnavailable(ValueError):
    """The kernel asked for is unknown, or cannot run on this device, dtype or head dim."""


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) view


def _expand_kv(k: torch.Tensor, h_q: int) -> torch.Tensor:
    """(B, S, H_kv, D) -> (B, S, H_q, D): repeats each K/V head for its query group."""
    h_kv = k.shape[2]
    if h_kv == h_q:
        return k
    return k.repeat_interleave(h_q // h_kv, dim=2)


def _reduce_kv_grad(dk: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(B, S, H_q, D) -> (B, S, H_kv, D): sums the gradient of the repeated heads."""
    b, s, h_q, d = dk.shape
    if h_q == h_kv:
        return dk
    return dk.view(b, s, h_kv, h_q // h_kv, d).sum(dim=3)


@dataclass
class BlockKernel:
    name: str
    # forward(q, k, v, causal, scale) -> (out (B,S,H_q,D) in q.dtype, lse (B,H_q,S) fp32)
    forward: Callable
    # backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv) with k/v's head count
    backward: Callable


# --- CPU -------------------------------------------------------------------------------


def _cpu_fwd(q, k, v, causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale
    )
    return _bhsd(out), lse


def _cpu_bwd(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(), 0.0, causal, scale=scale
    )
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


# --- CUDA (SDPA ops) ------------------------------------------------------------------
# The CUDA ops want equal head counts, so K/V are expanded per block (after the ring
# transfer, never before) and the gradients of the repeated heads are summed back.


@dataclass
class _CudaAux:
    """Side outputs of a forward call that the backward op signature requires.

    With dropout 0 they carry no information, but the ops want tensors of the exact
    kind their own forward produced, so the first forward's are kept and reused.
    """

    by_key: dict = field(default_factory=dict)


_AUX = _CudaAux()


def _cudnn_fwd(q, k, v, causal, scale):
    h_q = q.shape[2]
    k, v = _expand_kv(k, h_q), _expand_kv(v, h_q)
    res = aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale
    )
    out, lse, seed, offset = res[0], res[1], res[6], res[7]
    _AUX.by_key.setdefault(("cudnn", q.device), (seed, offset))
    b, h, s = lse.shape[0], lse.shape[1], lse.shape[2]
    return _bhsd(out), lse.reshape(b, h, s)  # cuDNN's LSE is (B, H, S, 1)


def _cudnn_bwd(dout, q, k, v, out, lse, causal, scale):
    h_q, h_kv = q.shape[2], k.shape[2]
    ke, ve = _expand_kv(k, h_q), _expand_kv(v, h_q)
    seed, offset = _AUX.by_key[("cudnn", q.device)]
    sq, sk = q.shape[1], k.shape[1]
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), _bhsd(out), lse.unsqueeze(-1).contiguous(),
        seed, offset, None, None, None, sq, sk, 0.0, causal, scale=scale,
    )
    return _bhsd(dq), _reduce_kv_grad(_bhsd(dk), h_kv), _reduce_kv_grad(_bhsd(dv), h_kv)


def _flash_fwd(q, k, v, causal, scale):
    h_q = q.shape[2]
    k, v = _expand_kv(k, h_q), _expand_kv(v, h_q)
    res = aten._scaled_dot_product_flash_attention(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale)
    _AUX.by_key.setdefault(("flash", q.device), (res[6], res[7]))
    return _bhsd(res[0]), res[1]


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    h_q, h_kv = q.shape[2], k.shape[2]
    ke, ve = _expand_kv(k, h_q), _expand_kv(v, h_q)
    seed, offset = _AUX.by_key[("flash", q.device)]
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), _bhsd(out), lse.contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale,
    )
    return _bhsd(dq), _reduce_kv_grad(_bhsd(dk), h_kv), _reduce_kv_grad(_bhsd(dv), h_kv)


def _efficient_fwd(q, k, v, causal, scale):
    h_q = q.shape[2]
    k, v = _expand_kv(k, h_q), _expand_kv(v, h_q)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, scale=scale
    )
    _AUX.by_key.setdefault(("efficient", q.device), (seed, offset))
    return _bhsd(out), lse[..., : q.shape[1]]  # its LSE is padded to a multiple of 32


def _efficient_bwd(dout, q, k, v, out, lse, causal, scale):
    h_q, h_kv = q.shape[2], k.shape[2]
    ke, ve = _expand_kv(k, h_q), _expand_kv(v, h_q)
    seed, offset = _AUX.by_key[("efficient", q.device)]
    s = lse.shape[-1]
    padded = lse.new_zeros(*lse.shape[:-1], math.ceil(s / 32) * 32)
    padded[..., :s] = lse
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), None, _bhsd(out), padded,
        seed, offset, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return _bhsd(dq), _reduce_kv_grad(_bhsd(dk), h_kv), _reduce_kv_grad(_bhsd(dv), h_kv)


# --- flash-attn package -------------------------------------------------------------


def _flash_attn_module():
    try:
        import flash_attn.flash_attn_interface as fai
    except ImportError as e:
        raise ImportError(
            "kernel='flash_attn' needs the flash-attn package: pip install 'longview[gpu]'"
        ) from e
    return fai


def _fa_fwd(q, k, v, causal, scale):
    fai = _flash_attn_module()
    res = fai._flash_attn_forward(
        q, k, v, 0.0, scale, causal=causal, window_size_left=-1, window_size_right=-1,
        softcap=0.0, alibi_slopes=None, return_softmax=False,
    )
    return res[0], res[1]  # out (B,S,H,D), softmax_lse (B,H,S)


def _fa_bwd(dout, q, k, v, out, lse, causal, scale):
    fai = _flash_attn_module()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fai._flash_attn_backward(
        dout, q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
        -1, -1, 0.0, None, False, rng_state=None,
    )
    return dq, dk, dv


KERNELS: dict[str, BlockKernel] = {
    "cpu_flash": BlockKernel("cpu_flash", _cpu_fwd, _cpu_bwd),
    "cudnn": BlockKernel("cudnn", _cudnn_fwd, _cudnn_bwd),
    "flash": BlockKernel("flash", _flash_fwd, _flash_bwd),
    "efficient": BlockKernel("efficient", _efficient_fwd, _efficient_bwd),
    "flash_attn": BlockKernel("flash_attn", _fa_fwd, _fa_bwd),
}


def _flash_attn_installed() -> bool:
    try:
        _flash_attn_module()
    except ImportError:
        return False
    return True


def supported_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Kernels that can run on this device/dtype/head dim, fastest first.

    Order on CUDA from a measurement on one H200 (bf16, 16 heads of 128, causal, 32K
    tokens): cuDNN 641 TFLOP/s forward against 340 for the flash kernels;
    memory-efficient attention is the only fused op that takes float32.
    """
    if device.type == "cpu":
        return ["cpu_flash"]
    if device.type != "cuda":
        return []
    half = dtype in (torch.float16, torch.bfloat16)
    major, _ = torch.cuda.get_device_capability(device)
    names = []
    if half and major >= 8 and head_dim <= 128 and head_dim % 8 == 0:
        names.append("cudnn")
    if half and major >= 8 and head_dim <= 256 and head_dim % 8 == 0:
        if _flash_attn_installed():
            names.append("flash_attn")
        names.append("flash")
    names.append("efficient")
    return names


def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> BlockKernel:
    """Maps a kernel name (or "auto") to a kernel, with an error naming what is possible."""
    if name != "auto" and name not in KERNELS:
        raise KernelUnavailable(f"kernel={name!r} is unknown; choose 'auto' or one of {', '.join(KERNELS)}")
    possible = supported_kernels(device, dtype, head_dim)
    if name == "auto":
        if not possible:
            raise KernelUnavailable(f"no attention kernel supports device {device}, dtype {dtype}, head dim {head_dim}")
        return KERNELS[possible[0]]
    if name not in possible:
        raise KernelUnavailable(
            f"kernel={name!r} does not support device {device.type}, dtype {dtype}, head dim {head_dim}; "
            f"supported here: {possible or 'none'}"
        )
    return KERNELS[name]


@dataclass(frozen=True)
class RingKernel:
    """A kernel that runs the whole zigzag ring itself (it replaces longview's ring).

    unsupported(device, dtype, head_dim): why it cannot run here, or None.
    attention(q, k, v, *, group, causal, docs, softmax_scale): q (B, S_local, H_q, D),
    k, v (B, S_local, H_kv, D) zigzag-sharded over `group`; docs: each packed document's
    local (offset, length). Returns (B, S_local, H_q, D)."""

    name: str
    unsupported: Callable[[torch.device, torch.dtype, int], str | None]
    attention: Callable[..., torch.Tensor]


RING_KERNELS: dict[str, RingKernel] = {
    ring_flash_attn.NAME: RingKernel(ring_flash_attn.NAME, ring_flash_attn.unsupported,
                                     ring_flash_attn.ring_flash_attention),
}
KERNEL_CHOICES = ("auto", *KERNELS, *RING_KERNELS)  # what `kernel=` (parallelism.kernel) may name


def check_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """KernelUnavailable, naming what can run, when `name` (a block kernel, "auto", or a
    whole-ring kernel) cannot run on this device, dtype and head dim."""
    if name in RING_KERNELS:
        why = RING_KERNELS[name].unsupported(device, dtype, head_dim)
        if why:
            raise KernelUnavailable(f"kernel={name!r} cannot run here: {why}; block kernels supported here: "
                                    f"{supported_kernels(device, dtype, head_dim) or 'none'}")
        return
    resolve_kernel(name, device, dtype, head_dim)
