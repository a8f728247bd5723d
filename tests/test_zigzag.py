import pytest
import torch

from parallelism.zigzag import (
    IGNORE_INDEX,
    local_cu_seqlens,
    zigzag_pad,
    zigzag_pad_labels,
    zigzag_shard,
    zigzag_unshard,
)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_keeps_chunks_r_and_mirror(world_size):
    S = 8 * world_size
    x = torch.arange(S).view(1, S)
    c = S // (2 * world_size)
    for r in range(world_size):
        shard = zigzag_shard(x, world_size, r)
        first = torch.arange(r * c, (r + 1) * c)
        second = torch.arange((2 * world_size - 1 - r) * c, (2 * world_size - r) * c)
        assert torch.equal(shard[0], torch.cat([first, second]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_round_trip_any_dim(world_size, dim):
    shape = [4, 5, 6]
    shape[dim] = 24
    x = torch.randn(*shape)
    shards = [zigzag_shard(x, world_size, r, dim=dim) for r in range(world_size)]
    assert torch.equal(zigzag_unshard(shards, dim=dim), x)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_round_trip_packed_documents(world_size):
    m = 2 * world_size
    lengths = [m, 3 * m, 2 * m]
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], sum(lengths)], dtype=torch.int32)
    x = torch.arange(sum(lengths)).view(1, -1, 1).expand(2, -1, 3).contiguous()
    shards = [zigzag_shard(x, world_size, r, cu_seqlens=cu) for r in range(world_size)]
    assert torch.equal(zigzag_unshard(shards, cu_seqlens=cu), x)
    # Each shard holds, for every document, its chunks r and 2W-1-r, in document order.
    loc = local_cu_seqlens(cu, world_size).tolist()
    for r, s in enumerate(shards):
        for d, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            c = (b - a) // m
            piece = s[0, loc[d] : loc[d + 1], 0]
            want = torch.cat([torch.arange(a + r * c, a + (r + 1) * c), torch.arange(a + (m - 1 - r) * c, a + (m - r) * c)])
            assert torch.equal(piece, want)


def test_shard_errors_name_the_multiple_and_helper():
    with pytest.raises(ValueError, match=r"multiple of 2\*world_size=6.*zigzag_pad"):
        zigzag_shard(torch.zeros(1, 10), 3, 0)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"document 1 has length 6.*2\*world_size=4"):
        zigzag_shard(torch.zeros(1, 10), 2, 0, cu_seqlens=cu)
    with pytest.raises(ValueError, match="int32"):
        zigzag_shard(torch.zeros(1, 8), 2, 0, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="ends at 6"):
        zigzag_shard(torch.zeros(1, 8), 2, 0, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="rank 2"):
        zigzag_shard(torch.zeros(1, 8), 2, 2)


def test_pad_documents_and_labels():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    ids = torch.arange(1, 13).view(1, 12)
    padded = zigzag_pad(ids, 2, cu_seqlens=cu, value=0)
    # document 0: 5 -> 8 tokens, document 1: 7 -> 8 tokens; padding goes at each end
    assert padded.cu_seqlens.tolist() == [0, 8, 16]
    assert padded.tensor[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8, 9, 10, 11, 12, 0]
    assert padded.valid.tolist() == [True] * 5 + [False] * 3 + [True] * 7 + [False]
    labels = zigzag_pad_labels(ids, 2, cu_seqlens=cu)
    assert (labels.tensor[0][~labels.valid] == IGNORE_INDEX).all()
    assert torch.equal(labels.tensor[0][labels.valid], ids[0])
    # The padded result shards without error and round-trips.
    shards = [zigzag_shard(padded.tensor, 2, r, cu_seqlens=padded.cu_seqlens) for r in range(2)]
    assert torch.equal(zigzag_unshard(shards, cu_seqlens=padded.cu_seqlens), padded.tensor)


def test_pad_plain_sequence_is_noop_when_aligned():
    x = torch.randn(2, 12, 3)
    p = zigzag_pad(x, 3)
    assert torch.equal(p.tensor, x) and p.cu_seqlens is None and p.valid.all()
    p = zigzag_pad(x, 4)
    assert p.tensor.shape == (2, 16, 3) and int(p.valid.sum()) == 12
