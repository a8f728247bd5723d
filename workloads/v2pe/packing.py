"""Packed batches: encoded samples packed into rows (documents separated by `cu_seqlens`),
their V2PE positions, and each rank's zigzag share of a row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from parallelism.collectives import split_evenly
from parallelism.hybrid_attention import hybrid_shard
from parallelism.zigzag import IGNORE_INDEX

from ..data_errors import DataError
from .data import DataConfig, EncodedSample
from .positions import v2pe_position_ids
from .tokenizer import Tokenizer


@dataclass
class V2PEBatch:
    """One packed row of documents, on one rank (whole, or its context-parallel shard).

    Per-token tensors are (1, S); `visual_index[0, t]` is the row of the batch's visual
    tokens (tile-major, all tiles of the batch) that replaces token t, or -1.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor  # float64
    visual_index: torch.Tensor
    loss_weight: torch.Tensor  # float32, 0 where the target is ignored
    pixels: torch.Tensor  # (N_tiles, 3, H, W): all the batch's tiles, or this rank's share
    cu_seqlens: torch.Tensor  # int32 global document offsets
    num_tiles: int  # tiles of the whole batch
    sample_ids: tuple[str, ...] = ()
    # Plain positions ("default" mode): the longest document's length, which the
    # checkpoint's rope_scaling scales by; 0 for V2PE positions (no scaling).
    rope_len: int = 0

    def to(self, device: torch.device, pixel_dtype: torch.dtype) -> V2PEBatch:
        """This batch on `device`, its pixels in the model's dtype (positions stay float64)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        moved["pixels"] = self.pixels.to(device, pixel_dtype)
        return replace(self, **moved)


def pack(
    samples: Sequence[EncodedSample],
    *,
    tokenizer: Tokenizer,
    tokens_per_tile: int,
    multiple: int,
    mode: str,
    stride: int | None = None,
    generator: torch.Generator | None = None,
) -> V2PEBatch:
    """Packs samples into one row; each document is padded to a multiple of `multiple`
    (2 x context-parallel degree) and gets its own V2PE positions."""
    ids, tgts, pos, vis, docs = [], [], [], [], [0]
    next_visual = 0
    for s in samples:
        p = v2pe_position_ids(
            s.input_ids, img_start_id=tokenizer.img_start_id, img_context_id=tokenizer.img_context_id,
            img_end_id=tokenizer.img_end_id, mode=mode, stride=stride, generator=generator,
        )
        is_ctx = s.input_ids == tokenizer.img_context_id
        n_ctx = int(is_ctx.sum())
        if n_ctx != s.pixels.shape[0] * tokens_per_tile:
            raise DataError(
                f"sample {s.sample_id}: {n_ctx} image context tokens but {s.pixels.shape[0]} tiles x {tokens_per_tile}"
            )
        v = torch.full_like(s.input_ids, -1)
        v[is_ctx] = torch.arange(next_visual, next_visual + n_ctx)
        next_visual += n_ctx
        n = len(s)
        pad = (-n) % multiple
        # Padding continues the positions past the document's end; its targets are ignored
        # and, being last under a causal mask, no real token attends to it.
        last = float(p[-1]) if n else -1.0
        ids.append(torch.cat([s.input_ids, torch.full((pad,), tokenizer.pad_id)]))
        tgts.append(torch.cat([s.targets, torch.full((pad,), IGNORE_INDEX)]))
        pos.append(torch.cat([p, last + torch.arange(1, pad + 1, dtype=torch.float64)]))
        vis.append(torch.cat([v, torch.full((pad,), -1)]))
        docs.append(docs[-1] + n + pad)
    input_ids = torch.cat(ids).unsqueeze(0)
    targets = torch.cat(tgts).unsqueeze(0)
    pixels = torch.cat([s.pixels for s in samples]) if samples else torch.zeros(0, 3, 1, 1)
    return V2PEBatch(
        input_ids=input_ids,
        targets=targets,
        positions=torch.cat(pos).unsqueeze(0),
        visual_index=torch.cat(vis).unsqueeze(0),
        loss_weight=(targets != IGNORE_INDEX).float(),
        pixels=pixels,
        cu_seqlens=torch.tensor(docs, dtype=torch.int32),
        num_tiles=pixels.shape[0],
        sample_ids=tuple(s.sample_id for s in samples),
        rope_len=max((len(s) for s in samples), default=0) if mode == "default" else 0,
    )


def make_batch(
    samples: Sequence[EncodedSample],
    *,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    cp: int,
    generator: torch.Generator | None = None,
) -> V2PEBatch:
    """`pack` with the position mode and stride from config, padded for a CP degree."""
    return pack(samples, tokenizer=tokenizer, tokens_per_tile=cfg.tokens_per_tile, multiple=2 * cp,
                mode=cfg.position_mode, stride=cfg.position_stride, generator=generator)


def shard_batch(batch: V2PEBatch, world_size: int, rank: int, *, a2a: int = 1) -> V2PEBatch:
    """This rank's context-parallel share: every per-token tensor sharded with the same
    function, and an even share of the tiles to encode (features are gathered).

    a2a=1: the zigzag shard over `world_size` ring ranks. a2a>1 (hybrid context
    parallelism): the group is `world_size // a2a` all-to-all groups of `a2a` adjacent
    ranks; the row is zigzag-sharded over the groups and each group's shard cut into
    `a2a` contiguous pieces (`hybrid_shard`). Rows must be padded to a multiple of
    2 * world_size either way.
    """
    cu = batch.cu_seqlens
    if a2a < 1 or world_size % a2a:
        raise ValueError(f"shard_batch: the all-to-all degree {a2a} does not divide the context-parallel size "
                         f"{world_size}")
    ring_size, ring_rank, a2a_rank = world_size // a2a, rank // a2a, rank % a2a

    def sh(t):
        return hybrid_shard(t, ring_size, a2a, ring_rank, a2a_rank, dim=1, cu_seqlens=cu)

    lo, hi = split_evenly(batch.num_tiles, world_size, rank)
    return V2PEBatch(
        input_ids=sh(batch.input_ids),
        targets=sh(batch.targets),
        positions=sh(batch.positions),
        visual_index=sh(batch.visual_index),
        loss_weight=sh(batch.loss_weight),
        pixels=batch.pixels[lo:hi],
        cu_seqlens=cu,
        num_tiles=batch.num_tiles,
        sample_ids=batch.sample_ids,
        rope_len=batch.rope_len,
    )


def pack_rows(lengths: Sequence[int], budget: int, multiple: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices grouped in order into rows whose padded length stays within `budget`."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        padded = math.ceil(n / multiple) * multiple
        if padded > budget:
            raise DataError(f"sample {names[i] if names else i}: {n} tokens (padded {padded}) exceed the packing "
                            f"budget {budget}")
        if used + padded > budget and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += padded
    if cur:
        rows.append(cur)
    return rows


def pack_greedy(samples: Sequence[EncodedSample], budget: int, multiple: int) -> list[list[EncodedSample]]:
    """Groups samples in order into rows whose padded length stays within `budget`."""
    rows = pack_rows([len(s) for s in samples], budget, multiple, [s.sample_id for s in samples])
    return [[samples[i] for i in row] for row in rows]

