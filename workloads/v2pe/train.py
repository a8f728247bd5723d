"""V2PE training step under context and data parallelism.

Order of work in one step (see `forward_loss`):
1. Vision: each context-parallel rank encodes an even share of the batch's tiles and
   the visual tokens are all-gathered (with autograd), instead of every rank encoding
   every image.
2. Decoder on this rank's zigzag shard of the packed row; attention rings over the
   context-parallel group.
3. Loss: cross-entropy in chunks over the supervised tokens, each chunk recomputed in
   the backward, so the (tokens x vocabulary) logits never exist at once.

Normalisation: every rank divides its summed loss by the number of supervised tokens
in the whole step (all ranks, data- and context-parallel), so the rank losses add up to
the mean over all tokens and the gradients must be *summed* over all ranks. DeepSpeed
averages over its data-parallel world (here: all ranks), so `Engine.backward`
multiplies the loss by the world size before DeepSpeed's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from parallelism.collectives import gather_rows, split_evenly
from parallelism.dims import named_collectives
from parallelism.ring_attention import prepare_documents
from parallelism.zigzag import IGNORE_INDEX

from ..spec import StepResult
from .model import AttentionSpec, V2PEModel
from .packing import V2PEBatch


@dataclass(kw_only=True, frozen=True)
class TrainStepConfig:
    loss_chunk_tokens: int = 4096  # tokens per cross-entropy chunk: memory O(chunk x vocab)
    activation_checkpointing: bool = True
    kernel: str = "auto"


def _ce_chunk(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # (chunk, V) float32
    return (F.cross_entropy(logits.float(), targets, reduction="none") * w).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    loss_weight: torch.Tensor,
    chunk: int,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed weighted cross-entropy and the number of supervised tokens.

    hidden: (N, C), head: the vocabulary projection (C -> V), targets: (N,) with
    IGNORE_INDEX for skipped tokens, loss_weight: (N,). Only supervised rows are
    projected to the vocabulary, `chunk` rows at a time, each under activation
    checkpointing, so memory is O(chunk x V) instead of O(N x V).

    With `group`, every rank of it runs the same number of chunks (the largest; the
    extra ones are empty). Parameter sharding (ZeRO-3) gathers the head's weight at
    every call, a collective, so the calls must line up across ranks; and a rank with
    no supervised token still gives every parameter a (zero) gradient, which
    per-parameter gradient hooks of data-parallel reducers rely on.
    """
    keep = (targets != IGNORE_INDEX).nonzero().flatten()
    h, t, w = hidden[keep], targets[keep], loss_weight[keep].float()
    n_chunks = torch.tensor(max(1, -(-keep.numel() // chunk)), device=hidden.device)
    if group is not None and dist.get_world_size(group) > 1:
        with named_collectives(group, "loss chunk count"):
            dist.all_reduce(n_chunks, op=dist.ReduceOp.MAX, group=group)
    total = None
    for i in range(int(n_chunks) * chunk)[::chunk]:
        args = (h[i : i + chunk], head, t[i : i + chunk], w[i : i + chunk])
        part = checkpoint(_ce_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _ce_chunk(*args)
        total = part if total is None else total + part
    return total, torch.tensor(float(keep.numel()), device=hidden.device)


def parallelize(model: V2PEModel, cfg: TrainStepConfig) -> V2PEModel:
    """Applies, in order: (1) context parallelism — nothing to wrap, the decoder's
    attention receives the group per call through AttentionSpec; (2) activation
    checkpointing per decoder layer and per vision block; (3) parameter/optimizer sharding happens when the
    engine is built (DeepSpeed ZeRO or FSDP over `fsdp_units`, `build_engine`)."""
    model.decoder.checkpoint_layers = cfg.activation_checkpointing
    model.vision.checkpoint_layers = cfg.activation_checkpointing
    return model


def fsdp_units(model: V2PEModel) -> tuple[list[torch.nn.Module], tuple[str, ...]]:
    """(modules FSDP gathers one at a time, the model's methods called instead of forward).

    One unit per vision block and decoder layer (each gathered just before it runs), and
    the token embedding (called before the decoder's forward); the vocabulary head,
    norms and projector stay with the root, which FSDP keeps gathered from the forward to
    the backward: the chunked loss calls the head once per chunk."""
    units = [*model.vision.blocks, *model.decoder.layers, model.decoder.embed]
    return units, ("encode_images", "forward_hidden")


def encode_visual(model: V2PEModel, batch: V2PEBatch, cp_group) -> torch.Tensor:
    """All visual tokens of the batch, each tile encoded on exactly one CP rank."""
    if batch.num_tiles == 0:
        return model.encode_images(batch.pixels[:0])
    mine = model.encode_images(batch.pixels)  # this rank's share of the tiles
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return mine
    W = dist.get_world_size(cp_group)
    per_tile = model.cfg.tokens_per_tile
    counts = [(hi - lo) * per_tile for lo, hi in (split_evenly(batch.num_tiles, W, r) for r in range(W))]
    return gather_rows(mine, cp_group, counts)


def forward_loss(
    model: V2PEModel,
    batch: V2PEBatch,
    *,
    cp_group=None,
    loss_group=None,
    hybrid: tuple | None = None,
    cfg: TrainStepConfig = TrainStepConfig(),
) -> tuple[torch.Tensor, dict]:
    """Loss of this rank's share, normalised by the supervised tokens of all ranks.

    cp_group: the group the batch is sharded over (None: whole rows here).
    loss_group: the ranks whose tokens make up the step (None: this process only).
    hybrid: (a2a_group, ring_group) when the batch was sharded with `shard_batch(...,
    a2a=U)` for U > 1 (hybrid context parallelism); None: cp_group is one ring.
    """
    visual = encode_visual(model, batch, cp_group)
    a2a_group, ring_group = hybrid or (None, None)
    # The document list is read and compared across the group once here, not in every layer.
    spec = AttentionSpec(group=cp_group, a2a_group=a2a_group, ring_group=ring_group,
                         cu_seqlens=prepare_documents(batch.cu_seqlens, group=cp_group), kernel=cfg.kernel)
    hidden = model.forward_hidden(batch.input_ids, batch.positions, visual, batch.visual_index, spec, batch.rope_len)
    loss_sum, n_tokens = chunked_cross_entropy(
        hidden.flatten(0, 1), model.decoder.lm_head, batch.targets.flatten(), batch.loss_weight.flatten(),
        cfg.loss_chunk_tokens, group=loss_group,
    )
    global_tokens = n_tokens.clone()
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        with named_collectives(loss_group, "token count"):
            dist.all_reduce(global_tokens, group=loss_group)
    loss = loss_sum / global_tokens.clamp(min=1.0)
    return loss, {"tokens": float(n_tokens), "global_tokens": float(global_tokens), "seq_local": batch.input_ids.shape[1]}


def train_step(engine, batch: V2PEBatch, *, cp_group=None, loss_group=None, hybrid: tuple | None = None,
               cfg: TrainStepConfig = TrainStepConfig()) -> StepResult:
    """One micro-step: forward, backward, and the optimizer step at accumulation boundaries.

    Returns the step's global loss (mean over every supervised token of every rank),
    token counts, and, when the optimizer stepped, the gradient norm and learning rate.
    """
    loss, stats = forward_loss(engine.module, batch, cp_group=cp_group, loss_group=loss_group, hybrid=hybrid, cfg=cfg)
    # Weighted by its supervised tokens over all ranks: accumulated micro-steps then add
    # up to the mean over every token of the optimizer step, however the batch was split.
    engine.backward(loss, weight=stats["global_tokens"])
    stepped = engine.step()
    total = loss.detach().clone()
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        with named_collectives(loss_group, "loss sum"):
            dist.all_reduce(total, group=loss_group)
    return StepResult(loss=float(total), tokens=stats["global_tokens"], stepped=stepped,
                      grad_norm=engine.last_grad_norm if stepped else None, lr=engine.lr if stepped else None)
