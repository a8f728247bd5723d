import pytest
import torch.distributed as dist

from parallelism.dims import ParallelDims
from tests import ring_cases


def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ValueError, match=r"dp \(2\) x cp \(3\) = 6 does not match world_size \(4\)"):
        ParallelDims(world_size=4, dp=2, cp=3)
    with pytest.raises(ValueError, match="ParallelDims.cp must be a positive integer, got 0"):
        ParallelDims(world_size=4, dp=4, cp=0)
    with pytest.raises(ValueError, match="cp=3 does not divide world_size=4"):
        ParallelDims.infer(world_size=4, cp=3)
    with pytest.raises(TypeError):
        ParallelDims(4, 1, 4)  # keyword-only: positional degrees are too easy to swap


def test_layout_keeps_context_parallel_ranks_adjacent():
    dims = ParallelDims.infer(world_size=8, cp=4)
    assert dims.dp == 2
    assert dims.cp_ranks(1) == [4, 5, 6, 7]
    assert dims.dp_ranks(2) == [2, 6]
    assert dims.coords(6) == (1, 2)


def test_groups_built_on_real_ranks(gloo_world):
    got = gloo_world(4).run(ring_cases.build_groups, 2)
    for rank, (cp_ranks, dp_ranks) in enumerate(got):
        assert cp_ranks == ([0, 1] if rank < 2 else [2, 3])
        assert dp_ranks == [rank % 2, rank % 2 + 2]


def _stalled_peer(stall_s: float):
    """Rank 1 never joins the all-gather; rank 0 must fail with the group named."""
    import time

    import torch

    from parallelism.collectives import gather_rows
    from parallelism.dims import CollectiveTimeout

    groups = ParallelDims(world_size=2, cp=2).build(timeout_s=2)
    if dist.get_rank() == 1:
        time.sleep(stall_s)
        return None
    t0 = time.monotonic()
    try:
        gather_rows(torch.ones(2, 3), groups.cp_group, [2, 2])
    except CollectiveTimeout as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_a_stalled_peer_fails_the_collective_naming_the_group():
    from parallelism.local_world import LocalWorld

    # The world's own timeout is long (120 s): the group's 2 s must be the one that acts.
    with LocalWorld(2, timeout_s=120) as world:
        (message, waited), _ = world.run(_stalled_peer, 6.0)
    assert "all-gather of rows on context-parallel group cp[dp=0] (ranks 0, 1) timed out" in message
    assert "a peer of this group stalled or died" in message
    assert waited < 6.0  # it gave up at the group's timeout, before the peer came back
