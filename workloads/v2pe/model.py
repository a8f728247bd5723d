"""InternVL2-style vision-language model with V2PE rotary positions.

- Vision: InternViT-style encoder (14-pixel patches on 448-pixel tiles, a class token,
  learned position embeddings, pre-norm blocks with layer scale), the last layer's
  patch features, pixel shuffle 0.5 (32x32 patches -> 16x16 = 256 tokens per tile).
- Projector: LayerNorm -> Linear -> GELU -> Linear into the language model's width.
- Decoder: InternLM2-style (RMSNorm, SwiGLU, grouped-query attention with InternLM2's
  packed `wqkv` layout, rotary embeddings from float64 V2PE positions).

This file holds no distributed code. The decoder's attention takes an explicit
`AttentionSpec`: with a context-parallel group it calls `parallelism.ring_attention`,
otherwise single-process attention. Parameter names are longview's own;
`hf_checkpoint.py` maps them to and from the InternVL2 Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallelism.decode_attention import decode_attention
from parallelism.hybrid_attention import hybrid_attention
from parallelism.ring_attention import Documents, local_attention, ring_attention

from .positions import V2PERotary, apply_rotary


def _check_positive_ints(cfg, prefix: str) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in (int, "int") and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{prefix}.{f.name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class VisionConfig:
    image_size: int = 448
    patch_size: int = 14
    # The tile size the position embedding was learned at, when a checkpoint's
    # force_image_size differs from its vision image_size: it is resized (bicubic) to
    # image_size's patch grid in the forward, as InternViT does. None: image_size.
    pretrain_image_size: int | None = None
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive_ints(self, "vision")
        for name in ("image_size", "pretrain_image_size"):
            size = getattr(self, name)
            if size is not None and size % self.patch_size:
                raise ValueError(f"vision.{name} {size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pos_grid(self) -> int:
        """Side of the learned position-embedding grid."""
        return (self.pretrain_image_size or self.image_size) // self.patch_size


@dataclass(kw_only=True, frozen=True)
class LLMConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    # The checkpoint's rope_scaling ("dynamic" NTK or "linear", with its factor), applied
    # to plain positions only (see positions.V2PERotary), and the trained length it scales from.
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 32768

    def __post_init__(self):
        _check_positive_ints(self, "llm")
        if self.rope_scaling not in (None, "dynamic", "linear"):
            raise ValueError(f"llm.rope_scaling {self.rope_scaling!r} is not one of dynamic, linear")
        if not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"llm.rope_scaling_factor must be at least 1, got {self.rope_scaling_factor!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"llm.hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"llm.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(kw_only=True, frozen=True)
class V2PEModelConfig:
    vision: VisionConfig
    llm: LLMConfig
    downsample_ratio: float = 0.5
    # InternVL2 tiling appends a thumbnail of the whole image to multi-tile images
    # (config.json use_thumbnail); the data reader follows the model.
    thumbnail: bool = True
    # The position mode and stride the checkpoint was trained with (V2PE's config.json
    # llm_config.rope_pos_id_version / rope_pos_id_stride); None: not recorded. They are
    # the defaults of data.position_mode / position_stride and of evaluation's δ.
    position_mode: str | None = None
    position_stride: int | None = None

    def __post_init__(self):
        if self.downsample_ratio != 0.5:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not supported (InternVL2 uses 0.5)")
        if self.vision.grid % 2:
            raise ValueError(f"vision grid {self.vision.grid} must be even for pixel shuffle 0.5")

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.grid // 2) ** 2


# Vocabulary of the byte tokenizer used by the tiny model (see data.py): 256 bytes + specials.
TINY_VOCAB = 272

SIZES: dict[str, V2PEModelConfig] = {
    "tiny": V2PEModelConfig(
        vision=VisionConfig(hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64),
        llm=LLMConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2,
                      intermediate_size=128),
    ),
    # InternViT-300M + InternLM2-chat-1.8B dimensions
    "internvl2-2b": V2PEModelConfig(
        vision=VisionConfig(hidden_size=1024, num_heads=16, num_layers=24, intermediate_size=4096),
        llm=LLMConfig(vocab_size=92553, hidden_size=2048, num_heads=16, num_kv_heads=8, num_layers=24,
                      intermediate_size=8192, rope_scaling="dynamic", rope_scaling_factor=2.0),
    ),
    # InternViT-300M + InternLM2.5-7B-chat dimensions
    "internvl2-8b": V2PEModelConfig(
        vision=VisionConfig(hidden_size=1024, num_heads=16, num_layers=24, intermediate_size=4096),
        llm=LLMConfig(vocab_size=92553, hidden_size=4096, num_heads=32, num_kv_heads=8, num_layers=32,
                      intermediate_size=14336, rope_scaling="dynamic", rope_scaling_factor=2.0),
    ),
}


def model_config(size: str, **overrides: Any) -> V2PEModelConfig:
    """A named size, optionally with `vision`/`llm` fields replaced (e.g. image_size for tests)."""
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is unknown; choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    vision = {k[len("vision_"):]: v for k, v in overrides.items() if k.startswith("vision_")}
    llm = {k[len("llm_"):]: v for k, v in overrides.items() if k.startswith("llm_")}
    unknown = [k for k in overrides if not k.startswith(("vision_", "llm_"))]
    if unknown:
        raise ValueError(f"model overrides {unknown} must start with 'vision_' or 'llm_'")
    return replace(cfg, vision=replace(cfg.vision, **vision), llm=replace(cfg.llm, **llm))


# --- vision ----------------------------------------------------------------------------


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ls1 = nn.Parameter(torch.full((c,), 0.1))
        self.norm2 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(c, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, c)
        self.ls2 = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, C)
        n, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, Dh)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        x = x + self.ls1 * self.proj(a)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.patch_embed = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, c))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        # Set by parallelize(): a rank's tiles keep one (T, C) input per block instead of
        # every block's activations (~1 GB per 448px tile for InternViT-300M in bf16).
        self.checkpoint_layers = False

    def position_embedding(self) -> torch.Tensor:
        """(1, 1 + grid², C): the learned one, resized to this tile size's grid if it was
        learned at another (bicubic in float32, as InternViT's _get_pos_embed)."""
        p, g = self.cfg.pos_grid, self.cfg.grid
        if p == g:
            return self.pos_embed
        patches = self.pos_embed[:, 1:].float().reshape(1, p, p, -1).permute(0, 3, 1, 2)  # (1, C, p, p)
        patches = F.interpolate(patches, size=(g, g), mode="bicubic", align_corners=False)
        patches = patches.reshape(1, -1, g * g).permute(0, 2, 1).to(self.pos_embed.dtype)  # (1, g², C)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, H, W) -> patch features (N, grid, grid, C), class token dropped."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (N, grid², C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.checkpoint_layers and torch.is_grad_enabled() else blk(x)
        g = self.cfg.grid
        return x[:, 1:].reshape(x.shape[0], g, g, x.shape[-1])


def pixel_shuffle_half(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/2, W/2, 4C): each 2x2 patch neighbourhood becomes one token.

    Same element order as InternVL2's pixel shuffle (ps_version v2), so its projector
    weights apply unchanged.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, w // 2, 2 * c).permute(0, 2, 1, 3)  # (N, W/2, H, 2C)
    x = x.reshape(n, w // 2, h // 2, 4 * c).permute(0, 2, 1, 3)  # (N, H/2, W/2, 4C)
    return x.contiguous()


class Projector(nn.Module):
    def __init__(self, vision_width: int, llm_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width * 4)
        self.fc1 = nn.Linear(vision_width * 4, llm_width)
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


# --- decoder ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


@dataclass(kw_only=True)
class AttentionSpec:
    """How the decoder's attention sees the sequence this call.

    group: the context-parallel group the sequence is zigzag-sharded over, or None for
    a whole sequence on this process. cu_seqlens: global document offsets (packed rows).
    a2a_group / ring_group: set for hybrid context parallelism (the sequence laid out by
    `parallelism.hybrid_attention.hybrid_shard`): heads are exchanged all-to-all inside
    a2a_group and the ring runs over ring_group. Unset: `group` is one plain ring.
    """

    group: Any = None
    a2a_group: Any = None
    ring_group: Any = None
    cu_seqlens: Documents | torch.Tensor | None = None  # prepare_documents(...): checked once per batch
    kernel: str = "auto"
    # Generation: the KV cache this call fills (prefill) or reads and extends (decode:
    # one new token, attending to the cache shards of every rank of `group`).
    cache: KVCache | None = None
    decode: bool = False


class KVCache:
    """The keys and values (after rotary) of the tokens this process holds, per decoder
    layer: what later tokens attend to. A context-parallel rank holds only its own shard.

    keep: (S_local,) bool, which tokens of the prefill call enter the cache (the sample's,
    not its padding); room: tokens that may be appended later (buffers are allocated once,
    at prefill, with that much room: no copy of the cache per new token). `append` says
    whether this process keeps the token of the current decode call (one rank does)."""

    def __init__(self, layers: int, *, keep: torch.Tensor | None = None, room: int = 0):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.n = [0] * layers
        self.keep, self.room, self.append = keep, room, True

    def add(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends k, v: (B, S, H_kv, D) to the layer's cache; returns the whole cache."""
        if self.keep is not None and self.k[layer] is None:
            k, v = k[:, self.keep], v[:, self.keep]
        if self.k[layer] is None:
            b, s, h, d = k.shape
            self.k[layer] = k.new_empty((b, s + self.room, h, d))
            self.v[layer] = v.new_empty((b, s + self.room, h, d))
        n, s = self.n[layer], k.shape[1]
        if n + s > self.k[layer].shape[1]:
            raise ValueError(f"KV cache of layer {layer} is full ({n} tokens + {s}): more new tokens than its room")
        self.k[layer][:, n:n + s], self.v[layer][:, n:n + s] = k, v
        self.n[layer] = n + s
        return self.get(layer)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n[layer]
        return self.k[layer][:, :n], self.v[layer][:, :n]


class DecoderAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int = 0):
        super().__init__()
        self.index = index  # the layer's place in the decoder: its KV cache slot
        self.h, self.h_kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.groups = self.h // self.h_kv
        # InternLM2 layout: for each KV head, its `groups` query heads, then K, then V.
        self.wqkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.h_kv) * self.d, bias=False)
        self.wo = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, spec: AttentionSpec):
        b, s, _ = x.shape
        qkv = self.wqkv(x).view(b, s, self.h_kv, self.groups + 2, self.d)
        q = qkv[..., : self.groups, :].reshape(b, s, self.h, self.d)  # (B, S, H, D)
        k, v = qkv[..., -2, :], qkv[..., -1, :]  # (B, S, H_kv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if spec.decode and spec.cache is None:
            raise ValueError("decoding needs the KV cache of a prefill (AttentionSpec.cache)")
        if spec.cache is not None and (spec.cache.append or not spec.decode):
            cached = spec.cache.add(self.index, k, v)
        elif spec.cache is not None:
            cached = spec.cache.get(self.index)
        if spec.decode:
            o = decode_attention(q, *cached, group=spec.group, kernel=spec.kernel)
        elif spec.a2a_group is not None:
            o = hybrid_attention(q, k, v, a2a_group=spec.a2a_group, ring_group=spec.ring_group, causal=True,
                                 cu_seqlens=spec.cu_seqlens, kernel=spec.kernel)
        elif spec.group is not None:
            o = ring_attention(q, k, v, group=spec.group, causal=True, cu_seqlens=spec.cu_seqlens, kernel=spec.kernel)
        else:
            o = local_attention(q, k, v, causal=True, cu_seqlens=spec.cu_seqlens, kernel=spec.kernel)
        return self.wo(o.reshape(b, s, self.h * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = DecoderAttention(cfg, index)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down

    def forward(self, x, cos, sin, spec: AttentionSpec):
        x = x + self.attn(self.attn_norm(x), cos, sin, spec)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LMHead(nn.Linear):
    """Vocabulary projection that returns float32 logits (the log-softmax needs the range).

    A module call rather than a bare use of `.weight`, so parameter-sharding wrappers
    (ZeRO-3) gather the weight around it.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class Decoder(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.rotary = V2PERotary(cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling,
                                 factor=cfg.rope_scaling_factor, max_positions=cfg.max_position_embeddings)
        # Set by parallelize(): recompute each layer in the backward instead of storing
        # its activations (memory per layer drops to its input).
        self.checkpoint_layers = False

    def forward(self, h: torch.Tensor, positions: torch.Tensor, spec: AttentionSpec, rope_len: int = 0) -> torch.Tensor:
        """h: (B, S, C) input embeddings, positions: (B, S) float64 -> normed hidden (B, S, C).

        rope_len: for plain positions, the longest document's length (rope_scaling uses
        it); 0 for V2PE positions."""
        cos, sin = self.rotary(positions, h.dtype, rope_len)  # (B, S, D)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, spec, use_reentrant=False)
            else:
                h = layer(h, cos, sin, spec)
        return self.norm(h)


class V2PEModel(nn.Module):
    def __init__(self, cfg: V2PEModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.decoder = Decoder(cfg.llm)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N_tiles, 3, H, W) -> visual tokens (N_tiles * tokens_per_tile, C_llm)."""
        # With no tiles (a rank's share can be empty) the same modules still run on the
        # empty batch, so every vision parameter gets a (zero) gradient on every rank.
        feats = pixel_shuffle_half(self.vision(pixels))  # (N, g/2, g/2, 4C_vit)
        return self.projector(feats.flatten(1, 2)).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
        """Token embeddings with visual tokens placed where visual_index >= 0.

        input_ids, visual_index: (B, S); visual: (N_visual, C). visual_index[b, s] is the
        row of `visual` that replaces token (b, s), or -1 for a text token.
        """
        h = self.decoder.embed(input_ids)  # (B, S, C)
        mask = visual_index >= 0
        if visual.shape[0] == 0 or not bool(mask.any()):
            return h + 0 * visual.sum()  # keep the graph connected for every rank
        picked = visual[visual_index.clamp(min=0)]  # (B, S, C)
        return torch.where(mask.unsqueeze(-1), picked.to(h.dtype), h)

    def forward_hidden(self, input_ids, positions, visual, visual_index, spec: AttentionSpec,
                       rope_len: int = 0) -> torch.Tensor:
        return self.decoder(self.embed(input_ids, visual, visual_index), positions, spec, rope_len)
