"""Ring attention on W real gloo processes against single-process SDPA on full tensors."""

import pytest
import torch
import torch.nn.functional as F

import parallelism.ring_attention as ring_attention_module
from parallelism.ring_attention import ring_attention, simulated_ring_attention
from parallelism.zigzag import zigzag_shard, zigzag_unshard
from tests import ring_cases

WORLD_SIZES = [1, 2, 3, 4]
D = 16
# Tolerances, by input dtype, against a float64 reference computed from the same inputs.
# float32: the ring merges W partial softmaxes, reassociating sums that SDPA does in
#   one pass; errors stay a few float32 ulps of O(1) values, well under 1e-5.
# bfloat16: outputs and gradients are rounded to bf16 (8 mantissa bits, relative step
#   2^-8 ~ 0.004) and the kernel multiplies bf16 probabilities by V, so a few bf16
#   steps of error are expected; 2e-2 is ~5 steps and far below an algorithmic error
#   (a wrong block or a missing merge moves values by O(0.1-1)).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def reference(q, k, v, dout, causal, cu_seqlens=None):
    """Plain SDPA in float64 on the full sequence (per document when packed)."""
    q, k, v, dout = (t.detach().double().requires_grad_(True) for t in (q, k, v, dout))
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(
            q[:, a:b].transpose(1, 2), k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2),
            is_causal=causal, enable_gqa=True,
        )
        outs.append(o.transpose(1, 2))
    out = torch.cat(outs, dim=1)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def make_inputs(B, S, h_q, h_kv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, S, h, D, generator=g).to(dtype)  # noqa: E731
    return mk(h_q), mk(h_kv), mk(h_kv), mk(h_q)


CASES = {
    # name: (causal, h_q, h_kv, dtype, packed)
    "causal-mha-fp32": (True, 4, 4, torch.float32, False),
    "causal-gqa-fp32": (True, 4, 2, torch.float32, False),
    "causal-gqa-bf16": (True, 4, 2, torch.bfloat16, False),
    "full-gqa-fp32": (False, 4, 2, torch.float32, False),
    "full-mha-bf16": (False, 4, 4, torch.bfloat16, False),
    "packed-causal-gqa-fp32": (True, 4, 2, torch.float32, True),
    "packed-causal-mha-bf16": (True, 4, 4, torch.bfloat16, True),
    "packed-full-gqa-fp32": (False, 4, 2, torch.float32, True),
}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_ring_matches_full_attention(gloo_world, world_size, case):
    causal, h_q, h_kv, dtype, packed = CASES[case]
    if packed:
        # Three documents of different lengths, each a multiple of 2W for every W tested (24).
        lengths = [24, 72, 48]
        cu = torch.tensor([0, 24, 96, 144], dtype=torch.int32)
        B, S = 1, sum(lengths)
    else:
        cu, B, S = None, 2, 48
    q, k, v, dout = make_inputs(B, S, h_q, h_kv, dtype, seed=world_size * 100 + len(case))
    results = gloo_world(world_size).run(ring_cases.ring_fwd_bwd, q, k, v, dout, causal=causal, cu_seqlens=cu)
    got = [zigzag_unshard([res[i] for res in results], cu_seqlens=cu) for i in range(4)]
    want = reference(q, k, v, dout, causal, cu)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, **TOL[dtype], msg=lambda m: f"{case} W={world_size} {name}: {m}")


def test_packed_documents_do_not_see_each_other(gloo_world):
    """Changing one document's K/V must leave every other document's output unchanged."""
    cu = torch.tensor([0, 16, 48], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 48, 2, 2, torch.float32, seed=7)
    k2 = k.clone()
    k2[:, 16:] += 5.0  # perturb document 1 only
    world = gloo_world(2)
    a = world.run(ring_cases.ring_fwd_bwd, q, k, v, dout, causal=False, cu_seqlens=cu)
    b = world.run(ring_cases.ring_fwd_bwd, q, k2, v, dout, causal=False, cu_seqlens=cu)
    out_a = zigzag_unshard([r[0] for r in a], cu_seqlens=cu)
    out_b = zigzag_unshard([r[0] for r in b], cu_seqlens=cu)
    assert torch.equal(out_a[:, :16], out_b[:, :16])  # bit-identical: same blocks, same inputs
    assert not torch.allclose(out_a[:, 16:], out_b[:, 16:])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("merge_budget", [1, 1 << 30])
def test_simulated_ring_forward_matches(world_size, merge_budget, monkeypatch):
    """The one-process schedule used by the GPU benchmark gives the exact forward,
    whether blocks merge one at a time (budget 1 byte) or all at the end."""
    monkeypatch.setattr(ring_attention_module, "MERGE_BUDGET_BYTES", merge_budget)
    q, k, v, dout = make_inputs(1, 64, 4, 2, torch.float32, seed=3)
    kv = [(zigzag_shard(k, world_size, r), zigzag_shard(v, world_size, r)) for r in range(world_size)]
    outs = [simulated_ring_attention(zigzag_shard(q, world_size, r), kv, r) for r in range(world_size)]
    want = reference(q, k, v, dout, True)[0]
    torch.testing.assert_close(zigzag_unshard(outs).double(), want, **TOL[torch.float32])


def test_single_process_without_distributed_is_plain_attention():
    q, k, v, dout = make_inputs(2, 10, 4, 1, torch.float32, seed=5)  # odd-free: W=1 needs no padding
    q.requires_grad_(True)
    out = ring_attention(q, k, v)
    out.backward(dout)
    want = reference(q, k, v, dout, True)
    torch.testing.assert_close(out.double(), want[0], **TOL[torch.float32])
    torch.testing.assert_close(q.grad.double(), want[1], **TOL[torch.float32])


def test_bad_inputs_single_process():
    q = torch.randn(1, 8, 4, 16)
    kv = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="H_q=4 is not a multiple of H_kv=3"):
        ring_attention(q, kv, kv)
    with pytest.raises(ValueError, match="k .* and v .* must have the same shape"):
        ring_attention(q, torch.randn(1, 8, 2, 16), torch.randn(1, 8, 4, 16))
    with pytest.raises(ValueError, match="dtypes differ"):
        ring_attention(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="must agree in batch, length and head dim"):
        ring_attention(q, torch.randn(1, 6, 4, 16), torch.randn(1, 6, 4, 16))
    with pytest.raises(ValueError, match=r"q must be \(B, S_local, H, D\)"):
        ring_attention(q[0], q, q)
    with pytest.raises(ValueError, match="batch must be 1"):
        ring_attention(torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16),
                       cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="kernel='cudnn' does not support device cpu"):
        ring_attention(q, q, q, kernel="cudnn")
    with pytest.raises(ValueError, match="kernel='fast' is unknown"):
        ring_attention(q, q, q, kernel="fast")


def test_bad_inputs_in_a_ring(gloo_world):
    world = gloo_world(2)
    x = torch.randn(1, 5, 2, 8)  # S_local=5 -> global 10, not a multiple of 4
    msgs = world.run(ring_cases.ring_error, x, x, x)
    assert all(m and "global length 10" in m and "2*world_size=4" in m and "zigzag_pad" in m for m in msgs), msgs
    y = torch.randn(1, 6, 2, 8)  # global 12 = documents of 4 and 8? 6 is not a multiple of 4
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    msgs = world.run(ring_cases.ring_error, y, y, y, cu_seqlens=cu)
    assert all(m and "document 0 has length 6" in m for m in msgs), msgs


def test_ranks_with_different_inputs_fail_instead_of_hanging(gloo_world):
    world = gloo_world(2)
    msgs = world.run(ring_cases.mismatched_inputs, "length")
    assert all(m and "S_local ranges 4..6" in m for m in msgs), msgs
    msgs = world.run(ring_cases.mismatched_inputs, "documents")
    assert all(m and "cu_seqlens_checksum" in m for m in msgs), msgs
    msgs = world.run(ring_cases.mismatched_inputs, "prepared")
    assert all(m and "different document offsets" in m for m in msgs), msgs
    # The world is still usable afterwards: nothing was left half-sent.
    q, k, v, dout = make_inputs(1, 8, 2, 2, torch.float32, seed=1)
    assert len(world.run(ring_cases.ring_fwd_bwd, q, k, v, dout, causal=True)) == 2


def test_rings_on_context_parallel_subgroups(gloo_world):
    """World of 4 as dp=2 x cp=2: two independent rings on two samples, group ranks != global ranks."""
    cp = 2
    samples = [make_inputs(1, 32, 4, 2, torch.float32, seed=s) for s in (11, 12)]
    stacked = [torch.stack([s[i] for s in samples]) for i in range(4)]
    res = gloo_world(4).run(ring_cases.ring_in_cp_groups, *stacked, cp)
    for d in range(2):
        mine = sorted((r for r in res if r[0] == d), key=lambda r: r[1])
        got = [zigzag_unshard([r[2 + i] for r in mine]) for i in range(4)]
        want = reference(*samples[d], causal=True)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g.double(), w, **TOL[torch.float32], msg=lambda m: f"replica {d} {name}: {m}")


def test_absent_peer_times_out_from_config():
    """The collective timeout given to the process group ends a ring whose peer never comes."""
    from parallelism.local_world import LocalWorld, RankError

    with LocalWorld(2, timeout_s=3) as world:
        with pytest.raises(RankError) as err:
            world.run(ring_cases.only_rank0_calls_ring)
    text = str(err.value)
    assert "rank 0" in text and "rank 1" not in text
    assert "timed out" in text.lower() or "timeout" in text.lower(), text
