"""PIIP: parameter-inverted image pyramid (single-process model).

Branches are ordered large-model-first: the largest ViT sees the lowest resolution,
the smallest ViT the highest (e.g. PIIP-TSB 1568/896/448 = ViT-B@448, ViT-S@896,
ViT-T@1568). Each branch's blocks are split into `interactions` equal groups; after
every group, adjacent branches exchange features through a bidirectional interaction
unit: projection between widths, cross-attention (deformable, 1 level, 4 points, in
plain PyTorch with `grid_sample`, or plain attention) and a ConvFFN, each added
through a zero-initialised learnable gate. A merge (per-branch Conv3x3 + GroupNorm +
ReLU, projection to one width, upsampling to the finest grid, learned weighted sum)
feeds a segmentation head; classification averages each branch's CLS-token logits.

No distributed code here: `parallelism/` places branches on device groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (width, depth, heads) of the DeiT-style ViTs, patch 16; n/m/p are CPU-sized stand-ins
# (nano, micro, pico) with the same inverted layout, for tests and the demo.
VIT_SIZES = {"t": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "h": (1280, 32, 16),
             "n": (32, 4, 2), "m": (64, 4, 4), "p": (96, 4, 4)}


def baseline_global_blocks(depth: int) -> tuple[int, ...]:
    """The PIIP authors' ViT baselines for detection: every third block global, the rest
    windowed (blocks 3, 6, 9, 12 of ViT-B, as ViTDet; 3, 6, …, 24 of ViT-L, eight of them,
    where ViTDet-L has four)."""
    return tuple(range(2, depth, 3))


@dataclass(kw_only=True, frozen=True)
class BranchConfig:
    size: str
    resolution: int
    patch_size: int = 16
    window_size: int = 14
    global_blocks: tuple[int, ...] = ()  # indices of blocks with global attention
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.size not in VIT_SIZES:
            raise ValueError(f"branch size {self.size!r} is not one of {list(VIT_SIZES)}")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution {self.resolution} is not divisible by the patch size {self.patch_size}")

    @property
    def dim(self) -> int:
        return VIT_SIZES[self.size][0]

    @property
    def depth(self) -> int:
        return VIT_SIZES[self.size][1]

    @property
    def heads(self) -> int:
        return VIT_SIZES[self.size][2]

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size


@dataclass(kw_only=True, frozen=True)
class PIIPConfig:
    branches: tuple[BranchConfig, ...]  # largest model (lowest resolution) first
    interactions: int = 12
    attn_type: str = "deform"  # "deform" | "plain"
    interaction_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    cffn_ratio: float = 0.25
    merge_dim: int = 256
    num_classes: int = 1000
    seg_classes: int = 150

    def __post_init__(self):
        if self.attn_type not in ("deform", "plain"):
            raise ValueError(f"attn_type {self.attn_type!r} is not 'deform' or 'plain'")
        for b in self.branches:
            if b.depth % self.interactions:
                raise ValueError(f"branch {b.size}: depth {b.depth} is not a multiple of interactions={self.interactions}")
        if len(self.branches) > 1:
            for b in self.branches:
                if b.dim % self.interaction_heads:
                    raise ValueError(f"branch {b.size}: width {b.dim} not divisible by {self.interaction_heads} heads")


VARIANTS = {
    "piip-tsb": ("b", "s", "t"),
    "piip-sbl": ("l", "b", "s"),
    "piip-tsbl": ("l", "b", "s", "t"),
    "piip-tiny": ("p", "m", "n"),
    "vit-t": ("t",), "vit-s": ("s",), "vit-b": ("b",), "vit-l": ("l",), "vit-h": ("h",),
    "vit-p": ("p",), "vit-m": ("m",), "vit-n": ("n",),  # CPU-sized baselines of piip-tiny's branches
}


# Window size of every block, as in the PIIP detection configs (TSB: 14, SBL: 28).
WINDOWS = {"piip-tsb": 14, "piip-sbl": 28, "piip-tsbl": 14}


def piip_config(variant: str, resolutions: list[int], **kw) -> PIIPConfig:
    """A named variant at the given resolutions (large model's, i.e. lowest, first).

    PIIP variants window every block (as the PIIP detection configs do); single-branch
    ViT baselines use the PIIP authors' baseline layout: window 14, every third block global.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
    sizes = VARIANTS[variant]
    if len(resolutions) != len(sizes):
        raise ValueError(f"{variant} has {len(sizes)} branches but {len(resolutions)} resolutions were given")
    single = len(sizes) == 1
    window = kw.pop("window_size", WINDOWS.get(variant, 14))
    branches = tuple(
        BranchConfig(size=s, resolution=r, window_size=window,
                     global_blocks=baseline_global_blocks(VIT_SIZES[s][1]) if single else ())
        for s, r in zip(sizes, sorted(resolutions))
    )
    kw.setdefault("interactions", min(b.depth for b in branches))
    return PIIPConfig(branches=branches, **kw)


# --- ViT branch ----------------------------------------------------------------------------


def window_partition(x: torch.Tensor, h: int, w: int, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, h*w, C) -> (B * n_windows, ws*ws, C), zero-padding the grid to multiples of ws."""
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def window_unpartition(x: torch.Tensor, b: int, h: int, w: int, hp: int, wp: int, ws: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, :h, :w].reshape(b, h * w, c)


class Block(nn.Module):
    """Pre-norm ViT block with layer scale; windowed (ViTDet) or global attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int | None):
        super().__init__()
        self.heads, self.window = heads, window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), 1.0))
        self.gamma2 = nn.Parameter(torch.full((dim,), 1.0))

    def forward(self, x: torch.Tensor, cls: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, h*w, C) patch tokens, cls: (B, 1, C)."""
        b, n, c = x.shape
        z = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        qkv = self.qkv(self.norm1(z))  # (B, 1+N, 3C)
        dh = c // self.heads

        def heads(t):  # (B', T, 3C) -> q, k, v each (B', heads, T, dh)
            return t.view(t.shape[0], t.shape[1], 3, self.heads, dh).permute(2, 0, 3, 1, 4)

        if self.window is None:
            q, k, v = heads(qkv)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n + 1, c)
        else:
            # Patch tokens attend within (zero-padded) windows; the CLS token attends to all.
            win, (hp, wp) = window_partition(qkv[:, 1:], h, w, self.window)
            q, k, v = heads(win)
            a_x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(win.shape[0], -1, c)
            a_x = window_unpartition(a_x, b, h, w, hp, wp, self.window)
            q, k, v = heads(qkv)
            a_cls = F.scaled_dot_product_attention(q[:, :, :1], k, v).transpose(1, 2).reshape(b, 1, c)
            a = torch.cat([a_cls, a_x], dim=1)
        z = z + self.gamma1 * self.proj(a)
        z = z + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(z))))
        return z[:, 1:], z[:, :1]


class Branch(nn.Module):
    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.mlp_ratio, None if i in cfg.global_blocks else cfg.window_size)
            for i in range(cfg.depth)
        )

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image: (B, 3, R, R) at this branch's resolution -> tokens (B, g*g, C), cls (B, 1, C)."""
        r = self.cfg.resolution
        if image.shape[-2:] != (r, r):
            raise ValueError(f"branch {self.cfg.size} expects {r}x{r} images, got {tuple(image.shape[-2:])}")
        x = self.patch_embed(image).flatten(2).transpose(1, 2) + self.pos_embed
        return x, self.cls_token.expand(x.shape[0], -1, -1)

    def run_blocks(self, x, cls, start: int, end: int):
        g = self.cfg.grid
        for blk in self.blocks[start:end]:
            x, cls = blk(x, cls, g, g)
        return x, cls


# --- interaction -----------------------------------------------------------------------------


class DeformableCrossAttention(nn.Module):
    """One-level deformable attention: each query samples `points` locations per head of
    the feature map around its own position (bilinear, `grid_sample`)."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float):
        super().__init__()
        self.heads, self.points = heads, points
        self.inner = int(dim * ratio)
        if self.inner % heads:
            raise ValueError(f"deformable attention: {self.inner} value channels do not split into {heads} heads")
        self.value = nn.Linear(dim, self.inner)
        self.offsets = nn.Linear(dim, heads * points * 2)
        self.weights = nn.Linear(dim, heads * points)
        self.out = nn.Linear(self.inner, dim)
        nn.init.zeros_(self.offsets.weight)
        with torch.no_grad():  # initial offsets: a small ring of points around the reference
            ang = torch.arange(heads * points, dtype=torch.float32) * (2 * math.pi / (heads * points))
            self.offsets.bias.copy_(torch.stack([ang.cos(), ang.sin()], -1).flatten())

    def forward(self, q: torch.Tensor, hq: int, feat: torch.Tensor, hf: int) -> torch.Tensor:
        """q: (B, hq*hq, C) queries on an hq grid; feat: (B, hf*hf, C) on an hf grid."""
        b, nq, c = q.shape
        h, p, dh = self.heads, self.points, self.inner // self.heads
        value = self.value(feat).view(b, hf, hf, h, dh).permute(0, 3, 4, 1, 2).reshape(b * h, dh, hf, hf)
        # Reference point of each query: its cell centre, in [0, 1] image coordinates.
        lin = (torch.arange(hq, device=q.device, dtype=q.dtype) + 0.5) / hq
        ref = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).view(1, nq, 1, 1, 2)  # (x, y)
        off = self.offsets(q).view(b, nq, h, p, 2) / hf  # offsets in feature-map cells
        loc = (ref + off) * 2 - 1  # grid_sample's [-1, 1]
        attn = self.weights(q).view(b, nq, h, p).softmax(-1)
        grid = loc.permute(0, 2, 1, 3, 4).reshape(b * h, nq, p, 2)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: (B*H, Dh, Nq, P) -> weighted sum over points
        out = (sampled * attn.permute(0, 2, 1, 3).reshape(b * h, 1, nq, p)).sum(-1)
        return self.out(out.view(b, h * dh, nq).transpose(1, 2))


class PlainCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, hq: int, feat: torch.Tensor, hf: int) -> torch.Tensor:
        b, nq, c = q.shape
        qh = self.q(q).view(b, nq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(feat).view(b, feat.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(b, nq, c))


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, g: int) -> torch.Tensor:
        y = self.fc1(x)
        b, n, c = y.shape
        y = self.dw(y.transpose(1, 2).reshape(b, c, g, g)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(y))


class Injector(nn.Module):
    """Adds information from another branch's (projected) features into `x`, gated."""

    def __init__(self, dim: int, cfg: PIIPConfig):
        super().__init__()
        self.q_norm = nn.LayerNorm(dim, eps=1e-6)
        self.f_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = (DeformableCrossAttention(dim, cfg.interaction_heads, cfg.n_points, cfg.deform_ratio)
                     if cfg.attn_type == "deform" else PlainCrossAttention(dim, cfg.interaction_heads))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * cfg.cffn_ratio))
        # Zero-initialised gates: at the start each branch is exactly its pretrained ViT.
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        self.ffn_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, gx: int, feat: torch.Tensor, gf: int) -> torch.Tensor:
        x = x + self.attn_gate * self.attn(self.q_norm(x), gx, self.f_norm(feat), gf)
        return x + self.ffn_gate * self.ffn(self.ffn_norm(x), gx)


class InteractionUnit(nn.Module):
    """Between branch a (larger model, lower resolution) and branch b (the next one)."""

    def __init__(self, a: BranchConfig, b: BranchConfig, cfg: PIIPConfig):
        super().__init__()
        self.b_to_a = nn.Linear(b.dim, a.dim)
        self.a_to_b = nn.Linear(a.dim, b.dim)
        self.into_a = Injector(a.dim, cfg)
        self.into_b = Injector(b.dim, cfg)
        self.ga, self.gb = a.grid, b.grid

    def message_for_a(self, xb: torch.Tensor) -> torch.Tensor:
        return self.b_to_a(xb)  # computed where branch b lives; (B, Nb, Ca)

    def message_for_b(self, xa: torch.Tensor) -> torch.Tensor:
        return self.a_to_b(xa)  # (B, Na, Cb)

    def update_a(self, xa: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        return self.into_a(xa, self.ga, msg, self.gb)

    def update_b(self, xb: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        return self.into_b(xb, self.gb, msg, self.ga)


# --- merge and heads -------------------------------------------------------------------------


class BranchMerge(nn.Module):
    def __init__(self, branches: tuple[BranchConfig, ...], dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(b.dim, b.dim, 3, padding=1), nn.GroupNorm(32 if b.dim % 32 == 0 else 1, b.dim),
                          nn.ReLU(), nn.Conv2d(b.dim, dim, 1))
            for b in branches
        )
        self.scales = nn.Parameter(torch.ones(len(branches)))
        self.grids = [b.grid for b in branches]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Each branch's tokens (B, g*g, C_i) -> merged map (B, dim, G, G) on the finest grid."""
        top = max(self.grids)
        out = 0
        for i, (x, g, conv) in enumerate(zip(feats, self.grids, self.convs)):
            y = conv(x.transpose(1, 2).reshape(x.shape[0], -1, g, g))
            if g != top:
                y = F.interpolate(y, size=(top, top), mode="bilinear", align_corners=False)
            out = out + self.scales[i] * y
        return out


class PIIP(nn.Module):
    def __init__(self, cfg: PIIPConfig):
        super().__init__()
        self.cfg = cfg
        self.branches = nn.ModuleList(Branch(b) for b in cfg.branches)
        self.units = nn.ModuleList(
            nn.ModuleList(InteractionUnit(a, b, cfg) for a, b in zip(cfg.branches[:-1], cfg.branches[1:]))
            for _ in range(cfg.interactions if len(cfg.branches) > 1 else 0)
        )
        self.cls_heads = nn.ModuleList(nn.Linear(b.dim, cfg.num_classes) for b in cfg.branches)
        self.merge = BranchMerge(cfg.branches, cfg.merge_dim)
        self.seg_head = nn.Sequential(nn.Conv2d(cfg.merge_dim, cfg.merge_dim, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(cfg.merge_dim, cfg.seg_classes, 1))

    def stage_bounds(self, branch: int, stage: int) -> tuple[int, int]:
        per = self.cfg.branches[branch].depth // self.cfg.interactions
        return stage * per, (stage + 1) * per

    def forward_features(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images[i]: (B, 3, R_i, R_i) -> per-branch tokens and CLS tokens, branch after branch."""
        n = len(self.cfg.branches)
        if len(images) != n:
            raise ValueError(f"PIIP with {n} branches got {len(images)} images")
        xs, cls = zip(*(br.embed(im) for br, im in zip(self.branches, images)))
        xs, cls = list(xs), list(cls)
        stages = self.cfg.interactions
        for s in range(stages):
            for i, br in enumerate(self.branches):
                xs[i], cls[i] = br.run_blocks(xs[i], cls[i], *self.stage_bounds(i, s))
            if n > 1:
                # Messages are computed from the features before this stage's updates, so
                # every unit could run at the same time (as it does across device groups).
                msgs_a = [u.message_for_a(xs[k + 1]) for k, u in enumerate(self.units[s])]
                msgs_b = [u.message_for_b(xs[k]) for k, u in enumerate(self.units[s])]
                new = list(xs)
                for k, u in enumerate(self.units[s]):
                    new[k] = u.update_a(new[k], msgs_a[k])
                    new[k + 1] = u.update_b(new[k + 1], msgs_b[k])
                xs = new
        return xs, cls

    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        xs, cls = self.forward_features(images)
        logits = torch.stack([h(c[:, 0]) for h, c in zip(self.cls_heads, cls)]).mean(0)
        seg = self.seg_head(self.merge(xs))
        return {"logits": logits, "seg": seg}


def make_pyramid(image: torch.Tensor, cfg: PIIPConfig) -> list[torch.Tensor]:
    """One image -> its resized copy for every branch (bilinear, antialiased)."""
    return [resize_for(image, b) for b in cfg.branches]


def resize_for(image: torch.Tensor, b: BranchConfig) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, R, R) at branch b's resolution (bilinear, antialiased)."""
    return F.interpolate(image, size=(b.resolution, b.resolution), mode="bilinear", antialias=True,
                         align_corners=False)

