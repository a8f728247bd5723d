"""Which sample a step draws: a function of (seed, epoch) only, so a resumed run draws
exactly what the uninterrupted one did."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def sample_at(i: int, n: int, seed: int) -> int:
    """Index of the i-th sample drawn from n: a fresh permutation per epoch, a function
    of (seed, epoch) only, so a resumed run draws exactly what the uninterrupted one did.
    One permutation per epoch is computed (and kept), not one per draw."""
    epoch, j = divmod(i, n)
    return _epoch_order(n, seed, epoch)[j]
