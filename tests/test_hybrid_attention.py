"""Hybrid context parallelism (all-to-all x ring) against single-process attention."""

import pytest
import torch

from parallelism.hybrid_attention import hybrid_unshard
from tests import ring_cases
from tests.test_ring_attention import TOL, make_inputs, reference


@pytest.mark.parametrize("world_size, a2a", [(2, 2), (4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_matches_full_attention(gloo_world, world_size, a2a, causal):
    q, k, v, dout = make_inputs(2, 64, 8, 4, torch.float32, seed=world_size * 10 + a2a)
    res = gloo_world(world_size).run(ring_cases.hybrid_fwd_bwd, q, k, v, dout, a2a=a2a, causal=causal)
    ring = world_size // a2a
    want = reference(q, k, v, dout, causal)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        pieces = [[None] * a2a for _ in range(ring)]
        for r in res:
            pieces[r[0]][r[1]] = r[2 + i]
        torch.testing.assert_close(hybrid_unshard(pieces).double(), want[i], **TOL[torch.float32],
                                   msg=lambda m: f"U={a2a} R={ring} {name}: {m}")


def test_hybrid_packed_documents(gloo_world):
    cu = torch.tensor([0, 16, 48, 64], dtype=torch.int32)  # each a multiple of 2*ring*a2a = 8
    q, k, v, dout = make_inputs(1, 64, 8, 4, torch.float32, seed=5)
    res = gloo_world(4).run(ring_cases.hybrid_fwd_bwd, q, k, v, dout, a2a=2, causal=True, cu_seqlens=cu)
    want = reference(q, k, v, dout, True, cu)
    for i in range(4):
        pieces = [[None] * 2 for _ in range(2)]
        for r in res:
            pieces[r[0]][r[1]] = r[2 + i]
        torch.testing.assert_close(hybrid_unshard(pieces, cu_seqlens=cu).double(), want[i], **TOL[torch.float32])


def test_a2a_degree_must_divide_kv_heads(gloo_world):
    q, k, v, dout = make_inputs(1, 64, 8, 2, torch.float32, seed=1)
    from parallelism.local_world import RankError

    with pytest.raises(RankError, match=r"all-to-all degree 4 does not divide H_kv=2"):
        gloo_world(4).run(ring_cases.hybrid_fwd_bwd, q, k, v, dout, a2a=4, causal=True)
