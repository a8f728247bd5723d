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
