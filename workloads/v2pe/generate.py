"""Greedy answers to long prompts, with the prompt spread over a context-parallel group.

1. Prefill: the prompt (up to 1M tokens) is packed and sharded over the group exactly as
   in training (zigzag, or the hybrid all-to-all x ring layout) and run once through the
   decoder with ring attention. Each rank keeps the keys and values of its own prompt
   tokens as its KV cache (`model.KVCache`); padding is left out.
2. The first answer token comes from the last prompt token's logits, on the rank that
   holds it; the group learns it by one all-reduce.
3. Decode: every rank runs the new token through the decoder (the same input on every
   rank); in each layer its query attends to every rank's cache shard and the partial
   results merge by log-sum-exp (`parallelism.decode_attention`). The token's own K/V
   join one rank's cache, the ranks taking turns, so the caches stay balanced.
4. Positions continue by V2PE's rule: a text token after position p sits at ceil(p) + 1.
   Generation stops at `<|im_end|>`, the end-of-sequence token or `max_new_tokens`.

With plain positions and the checkpoint's dynamic rope scaling, new tokens are rotated
with the base for the current length and cached keys keep theirs, as the authors' code
(Hugging Face's cache) does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallelism.hybrid_attention import hybrid_shard
from parallelism.ring_attention import prepare_documents

from .data import EncodedSample
from .model import AttentionSpec, KVCache, V2PEModel
from .packing import pack, shard_batch
from .tokenizer import IM_END, Tokenizer
from .train import encode_visual

EOS = "</s>"  # InternLM2's end of sequence (the byte tokenizer has it too)


@dataclass
class Generation:
    tokens: list[int]  # the answer's ids, without the stop token
    prompt_tokens: int
    stopped: str  # "im_end", "eos" or "max_new_tokens"
    # (S_prompt, vocab) float32 logits of every prompt token when asked for, in prompt
    # order on every rank (a test and the precision benchmark compare them).
    prompt_logits: torch.Tensor | None = None
    prefill_s: float = 0.0  # wall time of the prefill (to the first new token)
    decode_s: float = 0.0  # wall time of the tokens after the first


def _local_index(total: int, world: int, rank: int, a2a: int) -> torch.Tensor:
    """Global positions in the padded row of this rank's tokens, in its local order."""
    ring, ring_rank, a2a_rank = world // a2a, rank // a2a, rank % a2a
    return hybrid_shard(torch.arange(total)[None], ring, a2a, ring_rank, a2a_rank, dim=1)[0]


class ShardedSample:
    """A sample packed and sharded over the context-parallel group exactly as in training
    (zigzag, or the hybrid layout): what a prefill and a teacher-forced pass share."""

    def __init__(self, model: V2PEModel, sample: EncodedSample, *, tokenizer: Tokenizer, mode: str,
                 stride: int | None, cp_group, hybrid: tuple | None):
        self.model = model
        self.W = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.r = 0 if cp_group is None else dist.get_rank(cp_group)
        self.a2a_group, self.ring_group = hybrid or (None, None)
        a2a = 1 if self.a2a_group is None else dist.get_world_size(self.a2a_group)
        self.group = cp_group if self.W > 1 else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch = pack([sample], tokenizer=tokenizer, tokens_per_tile=model.cfg.tokens_per_tile,
                          multiple=2 * self.W, mode=mode, stride=stride)
        self.total = self.batch.input_ids.shape[1]
        self.local = shard_batch(self.batch, self.W, self.r, a2a=a2a) if self.W > 1 else self.batch
        # (S_local,) global positions in the padded row of this rank's tokens
        self.index = _local_index(self.total, self.W, self.r, a2a) if self.W > 1 else torch.arange(self.total)

    def hidden(self, kernel: str, cache: KVCache | None = None,
               visual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """((S_local, C) the decoder's last hidden states of this rank's tokens, the visual
        tokens); visual: from an earlier call on the same sample (positions change with δ,
        the image encodings do not)."""
        local, device = self.local, self.device
        if visual is None:
            visual = encode_visual(self.model, local.to(device, self.dtype), self.group)
        spec = AttentionSpec(group=self.group, a2a_group=self.a2a_group, ring_group=self.ring_group, kernel=kernel,
                             cache=cache, cu_seqlens=prepare_documents(local.cu_seqlens.to(device), group=self.group))
        hidden = self.model.forward_hidden(local.input_ids.to(device), local.positions.to(device), visual,
                                           local.visual_index.to(device), spec, local.rope_len)[0]
        return hidden, visual


@torch.no_grad()
def generate(
    model: V2PEModel,
    prompt: EncodedSample,
    *,
    tokenizer: Tokenizer,
    mode: str,
    stride: int | None = None,
    max_new_tokens: int = 32,
    cp_group=None,
    hybrid: tuple | None = None,
    kernel: str = "auto",
    return_prompt_logits: bool = False,
    stop_at: tuple[str, ...] = (IM_END, EOS),
) -> Generation:
    """Greedy answer to `prompt` (its ids end with `<|im_start|>assistant\\n`; targets are
    not used). cp_group: the group the prompt is spread over (None: this process);
    hybrid: (a2a_group, ring_group) for the hybrid layout. stop_at: the tokens that end the
    answer (the authors' MM-NIAH evaluation stops at `<|im_end|>` only). The same result
    on every rank."""
    t0 = time.perf_counter()
    lay = ShardedSample(model, prompt, tokenizer=tokenizer, mode=mode, stride=stride, cp_group=cp_group, hybrid=hybrid)
    W, r, group, device, L, batch, local, index, total = (lay.W, lay.r, lay.group, lay.device, len(prompt), lay.batch,
                                                          lay.local, lay.index, lay.total)
    # Room for this rank's turns at keeping new tokens (token t goes to rank t mod W).
    cache = KVCache(model.cfg.llm.num_layers, keep=(index < L).to(device), room=-(-max_new_tokens // W) + 1)
    hidden, _ = lay.hidden(kernel, cache)  # (S_local, C)
    cache.keep = None

    logits = None
    if return_prompt_logits:
        mine = model.decoder.lm_head(hidden)  # (S_local, V) float32
        logits = torch.zeros(total, mine.shape[-1], device=device)
        logits[index.to(device)] = mine
        if group is not None:
            dist.all_reduce(logits, group=group)  # each position is held by exactly one rank
        logits = logits[:L]
    last = (index == L - 1).nonzero().flatten()
    first = torch.zeros((), dtype=torch.long, device=device)
    if last.numel():  # this rank holds the last prompt token
        first = model.decoder.lm_head(hidden[last[0]]).argmax() + 1  # + 1: 0 means "not mine" below
    if group is not None:
        dist.all_reduce(first, group=group)
    token = int(first) - 1
    t1 = time.perf_counter()

    stops = {tokenizer.token_id(t): {EOS: "eos", IM_END: "im_end"}.get(t, t) for t in stop_at}
    position = float(batch.positions[0, L - 1])
    out: list[int] = []
    empty = hidden[:0]  # (0, C): no image in a new token
    stopped = "max_new_tokens"
    while True:
        if token in stops:
            stopped = stops[token]
            break
        out.append(token)
        if len(out) >= max_new_tokens:
            break
        position = math.ceil(position) + 1
        cache.append = (len(out) - 1) % W == r  # whose turn to keep this token's K/V
        step = AttentionSpec(group=group, kernel=kernel, cache=cache, decode=True)
        ids = torch.tensor([[token]], device=device)
        pos = torch.tensor([[position]], dtype=torch.float64, device=device)
        rope_len = L + len(out) if local.rope_len else 0
        h = model.forward_hidden(ids, pos, empty, torch.full_like(ids, -1), step, rope_len)  # (1, 1, C)
        # Every rank holds the same merged output, hence the same logits; the group's
        # first rank still says which token it is, so a last-bit difference between
        # ranks can never send them down different answers (and their caches apart).
        chosen = model.decoder.lm_head(h[0, -1]).argmax()
        if group is not None:
            dist.broadcast(chosen, src=dist.get_global_rank(group, 0), group=group)
        token = int(chosen)
    return Generation(tokens=out, prompt_tokens=L, stopped=stopped, prompt_logits=logits, prefill_s=t1 - t0,
                      decode_s=time.perf_counter() - t1)
