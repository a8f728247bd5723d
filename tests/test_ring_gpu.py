"""CUDA paths of ring attention. Run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

from parallelism.attention_kernels import KERNELS, supported_kernels
from parallelism.ring_attention import simulated_ring_attention
from parallelism.zigzag import zigzag_shard, zigzag_unshard
from tests import ring_cases
from tests.test_ring_attention import make_inputs, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# bf16 inputs against a float64 reference: a few bf16 steps (2^-8 relative) of error.
BF16 = dict(atol=3e-2, rtol=3e-2)


def cuda_kernels():
    if not torch.cuda.is_available():
        return []
    return supported_kernels(torch.device("cuda"), torch.bfloat16, 64)


@pytest.mark.parametrize("causal", [True, False])
def test_each_cuda_kernel_matches_reference(causal):
    for name in cuda_kernels():
        q, k, v, dout = (t.cuda() for t in make_inputs(1, 256, 4, 2, torch.bfloat16, seed=1))
        q = q.requires_grad_(True)
        kern = KERNELS[name]
        out, lse = kern.forward(q, k, v, causal, 0.125)
        dq, dk, dv = kern.backward(dout, q, k, v, out, lse, causal, 0.125)
        want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal)
        for label, g, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
            torch.testing.assert_close(g.cpu().double(), w, **BF16, msg=lambda m: f"{name} {label}: {m}")


def test_simulated_ring_on_gpu():
    for name in cuda_kernels():
        q, k, v, dout = (t.cuda() for t in make_inputs(1, 1024, 4, 2, torch.bfloat16, seed=2))
        kv = [(zigzag_shard(k, 4, r), zigzag_shard(v, 4, r)) for r in range(4)]
        outs = [simulated_ring_attention(zigzag_shard(q, 4, r), kv, r, kernel=name) for r in range(4)]
        want = reference(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), True)[0]
        torch.testing.assert_close(zigzag_unshard(outs).cpu().double(), want, **BF16)


def test_two_ranks_on_one_gpu_through_gloo_staging(gloo_world):
    """NCCL refuses two ranks on one GPU; gloo with host staging checks the CUDA path."""
    q, k, v, dout = make_inputs(1, 512, 4, 2, torch.bfloat16, seed=3)
    res = gloo_world(2).run(ring_cases.ring_fwd_bwd_cuda, q, k, v, dout, causal=True)
    got = [zigzag_unshard([r[i] for r in res]) for i in range(4)]
    want = reference(q, k, v, dout, True)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, **BF16, msg=lambda m: f"{label}: {m}")
