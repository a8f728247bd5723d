"""Zigzag sharding of sequences over a context-parallel group.

A sequence of length S is cut into 2·W equal chunks; rank r keeps chunks r and 2W-1-r,
in that order. Under a causal mask the early chunk has little work and the late chunk
much, so every rank gets the same amount of attention work.

Packed batches (several documents in one row, described by `cu_seqlens`) are sharded
document by document, so each rank holds the same two chunks *of every document*. That
keeps the local layout identical on every rank: the local document offsets are the
global ones divided by W, which the ring attention relies on.

Every per-token tensor (embeddings, positions, labels, loss weights) must go through
the same function so that they stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips (torch's default)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, multiple: int) -> list[int]:
    """Validates global document offsets and returns them as Python ints."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (flash-attn convention), got {cu_seqlens.dtype}")
    offs = [int(x) for x in cu_seqlens.tolist()]
    if offs[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offs[0]}")
    if offs[-1] != total:
        raise ValueError(f"cu_seqlens ends at {offs[-1]} but the sequence dimension has {total} tokens")
    for i in range(len(offs) - 1):
        n = offs[i + 1] - offs[i]
        if n <= 0:
            raise ValueError(f"cu_seqlens: document {i} has length {n}; lengths must be positive")
        if n % multiple:
            raise ValueError(
                f"cu_seqlens: document {i} has length {n}, not a multiple of 2*world_size={multiple}; "
                "pad it with parallelism.zigzag.zigzag_pad"
            )
    return offs


def _check_length(total: int, multiple: int) -> None:
    if total % multiple:
        raise ValueError(
            f"sequence length {total} is not a multiple of 2*world_size={multiple}; "
            "pad it with parallelism.zigzag.zigzag_pad"
        )


def zigzag_shard(
    x: torch.Tensor,
    world_size: int,
    rank: int,
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns rank's zigzag shard of `x` along `dim` (chunks rank and 2W-1-rank).

    With `cu_seqlens` (global int32 offsets starting at 0) each document is sharded on
    its own and the pieces are concatenated in document order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
    dim = dim % x.dim()
    total = x.shape[dim]
    multiple = 2 * world_size
    if cu_seqlens is None:
        _check_length(total, multiple)
        chunks = x.chunk(multiple, dim=dim)
        return torch.cat([chunks[rank], chunks[multiple - 1 - rank]], dim=dim)
    offs = _check_cu_seqlens(cu_seqlens, total, multiple)
    pieces = []
    for start, end in zip(offs[:-1], offs[1:]):
        c = (end - start) // multiple
        pieces.append(x.narrow(dim, start + rank * c, c))
        pieces.append(x.narrow(dim, start + (multiple - 1 - rank) * c, c))
    return torch.cat(pieces, dim=dim)


def zigzag_unshard(
    shards: Sequence[torch.Tensor],
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `zigzag_shard`: rebuilds the full tensor from every rank's shard."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("zigzag_unshard needs at least one shard")
    dim = dim % shards[0].dim()
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"all shards must have the same shape, got {sorted(shapes)}")
    local = shards[0].shape[dim]
    multiple = 2 * world_size
    if cu_seqlens is None:
        if local % 2:
            raise ValueError(f"shard length {local} along dim {dim} is odd; a zigzag shard holds two equal chunks")
        halves = [s.chunk(2, dim=dim) for s in shards]
        ordered = [halves[r][0] for r in range(world_size)] + [halves[r][1] for r in reversed(range(world_size))]
        return torch.cat(ordered, dim=dim)
    offs = _check_cu_seqlens(cu_seqlens, local * world_size, multiple)
    pieces = []
    for start, end in zip(offs[:-1], offs[1:]):
        c = (end - start) // multiple
        lstart = start // world_size  # the document's offset inside every shard
        first = [s.narrow(dim, lstart, c) for s in shards]
        second = [s.narrow(dim, lstart + c, c) for s in reversed(shards)]
        pieces.extend(first + second)
    return torch.cat(pieces, dim=dim)


def local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int) -> torch.Tensor:
    """Document offsets inside each rank's shard (the same on every rank)."""
    return cu_seqlens // world_size


@dataclass(frozen=True)
class Padded:
    """A tensor padded for zigzag sharding, with the document offsets that go with it."""

    tensor: torch.Tensor
    cu_seqlens: torch.Tensor | None
    # For every padded position, whether it holds a real token: (S_padded,)
    valid: torch.Tensor


def zigzag_pad(
    x: torch.Tensor,
    world_size: int,
    *,
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    value: float | int = 0,
) -> Padded:
    """Pads the sequence (or each document) at its end to a multiple of 2·world_size.

    Padding goes after each document's last token, so under a causal mask no real token
    ever attends to it. Use `zigzag_pad_labels` for labels: their padding must be
    ignored by the loss.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    dim = dim % x.dim()
    multiple = 2 * world_size
    total = x.shape[dim]
    offs = [0, total] if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, total, 1)
    pieces, valid, new_offs = [], [], [0]
    for start, end in zip(offs[:-1], offs[1:]):
        n = end - start
        pad = (-n) % multiple
        pieces.append(x.narrow(dim, start, n))
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            pieces.append(torch.full(shape, value, dtype=x.dtype, device=x.device))
        valid.append(torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)]))
        new_offs.append(new_offs[-1] + n + pad)
    out_cu = None if cu_seqlens is None else torch.tensor(new_offs, dtype=torch.int32, device=cu_seqlens.device)
    return Padded(torch.cat(pieces, dim=dim), out_cu, torch.cat(valid).to(x.device))


def zigzag_pad_labels(
    labels: torch.Tensor,
    world_size: int,
    *,
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Padded:
    """`zigzag_pad` for labels: padding positions get `ignore_index` so the loss skips them."""
    return zigzag_pad(labels, world_size, dim=dim, cu_seqlens=cu_seqlens, value=ignore_index)
