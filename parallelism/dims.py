"""The one owner of process groups.

`ParallelDims` validates the parallel degrees against the world size and builds every
process group longview uses. Nothing else in the code base calls `new_group`: kernels
and models receive the group they need from here, explicitly.

Rank layout: rank = dp_index * cp + cp_index. Context-parallel ranks are adjacent, so
on a multi-GPU node the ring's neighbour-to-neighbour traffic stays on the fast
intra-node links, and the less frequent data-parallel gradient reduction crosses nodes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_KINDS = {"cp": "context-parallel", "dp": "data-parallel", "a2a": "all-to-all", "ring": "ring",
          "branch": "PIIP branch", "checkpoint": "checkpoint"}


def _new_group(ranks: list[int], desc: str, timeout_s: float | None, backend: str | None = None):
    timeout = None if timeout_s is None else _dt.timedelta(seconds=timeout_s)
    return dist.new_group(ranks, timeout=timeout, group_desc=desc, backend=backend)


def checkpoint_group(timeout_s: float | None = None):
    """A gloo group of the whole world for checkpointing. Collective: every rank calls it.

    Checkpoints are written in a background thread while training runs collectives of
    its own: on a group of their own those cannot interleave with training's, and gloo
    carries the small CPU messages (plans, metadata, verdicts) on any machine."""
    return _new_group(list(range(dist.get_world_size())), "checkpoint", timeout_s, backend="gloo")


def shard_mesh(device: torch.device):
    """The one-dimensional device mesh of the whole world that FSDP shards over (it
    uses the default group: no new group)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(dist.group.WORLD, device.type)


def describe(group) -> str:
    """'context-parallel group cp[dp=0] (ranks 0, 1)': what errors call a group."""
    if group is None or group is dist.group.WORLD:
        return f"the world group (ranks 0..{dist.get_world_size() - 1})"
    desc = getattr(group, "group_desc", "") or "?"
    kind = _KINDS.get(desc.split("[", 1)[0], "process")
    ranks = ", ".join(map(str, dist.get_process_group_ranks(group)))
    return f"{kind} group {desc} (ranks {ranks})"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete: a peer of the named group stalled or died."""


# Messages of the backends when a peer never answers or went away.
_PEER_FAILURE = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


@contextlib.contextmanager
def named_collectives(group, what: str):
    """Re-raises a backend's timeout / dead-peer error inside the block as a
    CollectiveTimeout that names `what` and the group it ran on."""
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as e:
        if not any(m in str(e).lower() for m in _PEER_FAILURE):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise CollectiveTimeout(
            f"{what} on {describe(group)} timed out on global rank {rank}: a peer of this group stalled or died "
            f"({str(e).splitlines()[0][:200]})") from e


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    world_size: int
    dp: int = 1  # data-parallel degree (replicas that see different samples)
    cp: int = 1  # context-parallel degree (ranks that share one sample's sequence)
    # Hybrid context parallelism: cp = cp_a2a x ring. Heads are split by all-to-all over
    # groups of cp_a2a adjacent ranks (meant for one node); the ring runs across groups.
    cp_a2a: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "cp", "cp_a2a"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims.{name} must be a positive integer, got {value!r}")
        if self.dp * self.cp != self.world_size:
            raise ValueError(
                f"ParallelDims: dp ({self.dp}) x cp ({self.cp}) = {self.dp * self.cp} "
                f"does not match world_size ({self.world_size})"
            )
        if self.cp % self.cp_a2a:
            raise ValueError(f"ParallelDims: cp_a2a ({self.cp_a2a}) does not divide cp ({self.cp})")

    @classmethod
    def infer(cls, *, world_size: int, cp: int, cp_a2a: int = 1) -> ParallelDims:
        """Fills in dp from the world size; cp must divide it."""
        if cp < 1 or world_size % cp:
            raise ValueError(f"ParallelDims: cp={cp} does not divide world_size={world_size}")
        return cls(world_size=world_size, dp=world_size // cp, cp=cp, cp_a2a=cp_a2a)

    @property
    def cp_ring(self) -> int:
        return self.cp // self.cp_a2a

    def cp_ranks(self, dp_index: int) -> list[int]:
        return [dp_index * self.cp + i for i in range(self.cp)]

    def dp_ranks(self, cp_index: int) -> list[int]:
        return [d * self.cp + cp_index for d in range(self.dp)]

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_index, cp_index) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        return divmod(rank, self.cp)

    def build(self, timeout_s: float | None = None) -> ParallelGroups:
        """Creates the groups. Collective: every rank must call it, in the same order.

        timeout_s: collective timeout of every group (torch gives new groups its own
        30-minute default, not the world's timeout, unless told)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build() needs torch.distributed to be initialised first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.world_size={self.world_size} but the process group has {dist.get_world_size()} ranks"
            )
        rank = dist.get_rank()
        dp_index, cp_index = self.coords(rank)
        cp_group = dp_group = None
        # new_group is collective over the whole world: all ranks create all groups.
        for d in range(self.dp):
            g = _new_group(self.cp_ranks(d), f"cp[dp={d}]", timeout_s)
            if d == dp_index:
                cp_group = g
        for c in range(self.cp):
            g = _new_group(self.dp_ranks(c), f"dp[cp={c}]", timeout_s)
            if c == cp_index:
                dp_group = g
        # Inside each cp group: all-to-all groups of cp_a2a adjacent ranks, and ring
        # groups of the ranks at the same position in every all-to-all group. With
        # cp_a2a = 1 the ring is the cp group itself and there is no all-to-all group
        # (creating groups is a collective over the whole world: none needlessly).
        a2a_group, ring_group = None, cp_group
        u = self.cp_a2a
        for d in range(self.dp if u > 1 else 0):
            base = self.cp_ranks(d)
            for j in range(self.cp_ring):
                g = _new_group(base[j * u:(j + 1) * u], f"a2a[dp={d},ring={j}]", timeout_s)
                if d == dp_index and j == cp_index // u:
                    a2a_group = g
            for i in range(u):
                g = _new_group(base[i::u], f"ring[dp={d},a2a={i}]", timeout_s)
                if d == dp_index and i == cp_index % u:
                    ring_group = g
        return ParallelGroups(dims=self, rank=rank, cp_group=cp_group, dp_group=dp_group,
                              a2a_group=a2a_group, ring_group=ring_group)


@dataclass(kw_only=True)
class ParallelGroups:
    dims: ParallelDims
    rank: int
    cp_group: dist.ProcessGroup = field(repr=False)
    dp_group: dist.ProcessGroup = field(repr=False)
    a2a_group: dist.ProcessGroup = field(repr=False, default=None)  # heads all-to-all; None when cp_a2a = 1
    ring_group: dist.ProcessGroup = field(repr=False, default=None)  # ring across a2a groups (= cp_group at 1)

    @property
    def hybrid(self) -> tuple | None:
        """(a2a_group, ring_group) for hybrid context parallelism, None for a plain ring."""
        return (self.a2a_group, self.ring_group) if self.dims.cp_a2a > 1 else None

    @property
    def cp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]


def init_distributed(
    *,
    backend: str | None = None,
    timeout_s: float = 600.0,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> None:
    """Initialises the default process group with a collective timeout from config.

    A peer that dies or never joins makes collectives fail after `timeout_s` instead of
    hanging forever. With no arguments it reads the torchrun / Ray Train environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    dist.init_process_group(
        backend=backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=_dt.timedelta(seconds=timeout_s),
    )


@dataclass(kw_only=True, frozen=True)
class BranchLayout:
    """PIIP branch placement: branch i runs on a contiguous range of ranks_per_branch[i]
    ranks; the ranks of one branch are data parallel among themselves (each takes an
    even share of the batch)."""

    ranks_per_branch: tuple[int, ...]
    world_size: int

    def __post_init__(self):
        if not self.ranks_per_branch or any(not isinstance(r, int) or r < 1 for r in self.ranks_per_branch):
            raise ValueError(f"BranchLayout: ranks per branch must be positive integers, got {self.ranks_per_branch}")
        if sum(self.ranks_per_branch) != self.world_size:
            raise ValueError(
                f"BranchLayout: ranks per branch {list(self.ranks_per_branch)} add up to "
                f"{sum(self.ranks_per_branch)}, not the world size {self.world_size}"
            )

    def ranks(self, branch: int) -> list[int]:
        start = sum(self.ranks_per_branch[:branch])
        return list(range(start, start + self.ranks_per_branch[branch]))

    def branch_of(self, rank: int) -> int:
        for b in range(len(self.ranks_per_branch)):
            if rank in self.ranks(b):
                return b
        raise ValueError(f"rank {rank} is outside world_size {self.world_size}")

    def build(self, timeout_s: float | None = None) -> BranchGroups:
        """Creates one process group per branch (collective: every rank calls it)."""
        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise RuntimeError(f"BranchLayout.build() needs an initialised world of {self.world_size} ranks")
        rank = dist.get_rank()
        mine = None
        for b in range(len(self.ranks_per_branch)):
            g = _new_group(self.ranks(b), f"branch[{b}]", timeout_s)
            if b == self.branch_of(rank):
                mine = g
        return BranchGroups(layout=self, rank=rank, branch=self.branch_of(rank), group=mine)


@dataclass(kw_only=True)
class BranchGroups:
    layout: BranchLayout
    rank: int
    branch: int
    group: dist.ProcessGroup = field(repr=False)

    @property
    def index_in_branch(self) -> int:
        return self.layout.ranks(self.branch).index(self.rank)
