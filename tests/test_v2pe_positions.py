import pytest
import torch

from workloads.v2pe.positions import (
    RND_DELTA_TICKS,
    V2PERotary,
    v2pe_position_ids,
    v2pe_position_ids_packed,
    v2pe_position_ticks,
)

T, S, C, E = 5, 1, 2, 3  # a text token, <img>, image context, </img>
IDS = dict(img_start_id=S, img_context_id=C, img_end_id=E)


def ids(*tokens):
    return torch.tensor(tokens, dtype=torch.long)


def test_default_mode_counts_every_token():
    x = ids(T, S, C, C, C, E, T)
    assert v2pe_position_ids(x, mode="default", **IDS).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_fixed_stride_and_the_ceil_after_the_image():
    x = ids(T, T, S, C, C, C, C, C, E, T)
    pos = v2pe_position_ids(x, mode="v2pe_fix", stride=64, **IDS)  # δ = 1/4
    # text 0,1; <img> 2; five context tokens 2.25..3.25; ceil(3.25) = 4; </img> 5; text 6
    assert pos.tolist() == [0, 1, 2, 2.25, 2.5, 2.75, 3.0, 3.25, 5, 6]
    assert pos.dtype == torch.float64


def test_image_ending_on_an_integer_needs_no_rounding():
    x = ids(S, C, C, C, C, E)
    pos = v2pe_position_ids(x, mode="v2pe_fix", stride=64, **IDS)
    # <img> is the first token (0); context 0.25..1.0; ceil(1.0) = 1; </img> 2
    assert pos.tolist() == [0, 0.25, 0.5, 0.75, 1.0, 2]


def test_random_delta_is_drawn_per_image():
    images = [S] + [C] * 4 + [E, T]
    x = ids(*(images * 12))
    ticks, deltas = v2pe_position_ticks(x, mode="v2pe_rnd", generator=torch.Generator().manual_seed(0), **IDS)
    assert len(deltas) == 12 and set(deltas) <= set(RND_DELTA_TICKS)
    assert len(set(deltas)) > 1  # 12 draws from 9 values: not all the same for this seed
    for i, d in enumerate(deltas):
        ctx = ticks[i * 7 + 1 : i * 7 + 5]
        assert torch.equal(torch.diff(ctx), torch.full((3,), d))  # spacing = this image's δ
    # The same generator seed gives the same positions (resumable data pipelines rely on it).
    again, _ = v2pe_position_ticks(x, mode="v2pe_rnd", generator=torch.Generator().manual_seed(0), **IDS)
    assert torch.equal(ticks, again)


def test_packed_positions_restart_per_document():
    doc1, doc2 = ids(T, S, C, C, E, T), ids(T, T, T)
    packed = torch.cat([doc1, doc2])
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    pos = v2pe_position_ids_packed(packed, cu, mode="v2pe_fix", stride=128, **IDS)
    assert pos.tolist() == [0, 1, 1.5, 2.0, 3, 4] + [0, 1, 2]


def test_exact_near_two_to_the_twenty():
    n_text = 2**20  # text at positions 0 .. 2^20 - 1, <img> at 2^20
    x = torch.cat([torch.full((n_text,), T), ids(S), torch.full((256,), C), ids(E)])
    pos = v2pe_position_ids(x, mode="v2pe_fix", stride=1, **IDS)  # δ = 1/256, the finest step
    ctx = pos[n_text + 1 : n_text + 257]  # 2^20 + k/256 for k = 1..256
    assert torch.equal((ctx - 2.0**20) * 256, torch.arange(1, 257, dtype=torch.float64))
    assert pos[-1] == 2**20 + 2  # ceil(2^20 + 1) = 2^20 + 1, then </img> one further
    assert ctx.unique().numel() == 256  # every visual token keeps its own position
    assert ctx.float().unique().numel() < 16  # float32 would collapse them (spacing 1/8 here)
    # The RoPE angles stay distinct too: the highest frequency has inv_freq = 1.
    cos, sin = V2PERotary(64)(ctx, torch.float64)
    assert cos[:, 0].unique().numel() == 256


def test_rotary_casts_to_activation_dtype_and_checks_input():
    rope = V2PERotary(8)
    cos, sin = rope(torch.arange(4, dtype=torch.float64), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (4, 8)
    with pytest.raises(ValueError, match="float64"):
        rope(torch.arange(4, dtype=torch.float32), torch.float32)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"context tokens at 1..2 are not preceded by <img>"):
        v2pe_position_ids(ids(T, C, C, E), mode="default", **IDS)
    with pytest.raises(ValueError, match=r"not followed by </img>"):
        v2pe_position_ids(ids(S, C, C, T), mode="default", **IDS)
    with pytest.raises(ValueError, match=r"stride, an integer in 1..256; got 300"):
        v2pe_position_ids(ids(T), mode="v2pe_fix", stride=300, **IDS)
    with pytest.raises(ValueError, match="mode='v2pe'"):
        v2pe_position_ids(ids(T), mode="v2pe", **IDS)


def test_rope_scaling_applies_to_plain_positions_only():
    """InternLM2's dynamic NTK: past max_positions the base becomes
    θ·(f·L/max − (f−1))^(D/(D−2)) for a sequence of L tokens; linear divides positions."""
    D, theta, f, max_pos = 8, 10_000.0, 2.0, 16
    pos = torch.arange(40, dtype=torch.float64)[None]
    plain = V2PERotary(D, theta)
    dyn = V2PERotary(D, theta, scaling="dynamic", factor=f, max_positions=max_pos)
    base = theta * (f * 40 / max_pos - (f - 1)) ** (D / (D - 2))
    want = V2PERotary(D, base)(pos, torch.float64)
    for got, ref in zip(dyn(pos, torch.float64, rope_len=40), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)  # float64 both: the same base to rounding
    for rope_len in (0, 16):  # V2PE positions (0), or a sequence within the trained length
        for got, ref in zip(dyn(pos, torch.float64, rope_len=rope_len), plain(pos, torch.float64)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    lin = V2PERotary(D, theta, scaling="linear", factor=4.0)
    for got, ref in zip(lin(pos, torch.float64, rope_len=40), plain(pos / 4, torch.float64)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
