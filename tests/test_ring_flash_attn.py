"""ring-flash-attn's ring behind longview's interface (parallelism/ring_flash_attn.py).

The package needs CUDA (it imports flash-attn), so on CPU the adapter is checked against
a stand-in written from the package's documented contract (tests/ring_cases.py): the
layout translation (shapes, local document offsets, batch rows as documents) must give
longview's ring's output. The package itself runs in the GPU-marked test below.
"""

import pytest
import torch

from parallelism.attention_kernels import KernelUnavailable, check_kernel
from tests import ring_cases
from tests.test_ring_attention import make_inputs


@pytest.mark.parametrize("world_size,packed,batch", [(2, True, 1), (4, True, 1), (2, False, 2)])
def test_the_adapter_lays_out_what_ring_flash_attn_expects(gloo_world, world_size, packed, batch):
    q, k, v, _ = make_inputs(batch, 16 * world_size, 4, 2, torch.float32, seed=world_size)
    cu = torch.tensor([0, 4 * world_size, 16 * world_size], dtype=torch.int32) if packed else None
    for got, want in gloo_world(world_size).run(ring_cases.ring_flash_attn_adapter, q, k, v, causal=True,
                                                 cu_seqlens=cu):
        # float64 reference against longview's float32 ring: float32 rounding only.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_it_is_refused_by_name_where_it_cannot_run():
    with pytest.raises(KernelUnavailable, match=r"kernel='ring_flash_attn' cannot run here: it runs on CUDA devices "
                                                 r"only, not cpu; block kernels supported here: \['cpu_flash'\]"):
        check_kernel("ring_flash_attn", torch.device("cpu"), torch.bfloat16, 64)
    check_kernel("auto", torch.device("cpu"), torch.bfloat16, 64)  # the block kernels still resolve


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a ring of ranks on distinct GPUs (NCCL refuses two on one)")
def test_ring_flash_attn_matches_longviews_ring_on_gpus():
    """On a machine with >= 2 GPUs and the `gpu` extra: run with
    `torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_ring_flash_attn.py`."""
    import torch.distributed as dist

    from parallelism.ring_attention import ring_attention
    from parallelism.zigzag import zigzag_shard

    if not dist.is_initialized():
        pytest.skip("needs torchrun (one process per GPU)")
    W, r = dist.get_world_size(), dist.get_rank()
    torch.cuda.set_device(r)
    q, k, v, dout = (t.cuda() for t in make_inputs(1, 1024 * W, 8, 2, torch.bfloat16, seed=3))
    cu = torch.tensor([0, 256 * W, 1024 * W], dtype=torch.int32, device="cuda")
    results = []
    for kernel in ("ring_flash_attn", "auto"):
        qs, ks, vs, ds = (zigzag_shard(t, W, r, cu_seqlens=cu).clone().requires_grad_(True) for t in (q, k, v, dout))
        out = ring_attention(qs, ks, vs, causal=True, cu_seqlens=cu, kernel=kernel)
        out.backward(ds)
        results.append((out, qs.grad, ks.grad, vs.grad))
    for got, want in zip(*results):
        # two bf16 rings: a few bf16 steps (2^-8 relative) apart
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
