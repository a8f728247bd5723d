"""V2PE position ids: visual tokens advance the position by a small, variable step δ.

Walk the tokens with a running position p (the first token gets 0):
- a text token (including `<img>` and `</img>`) gets p+1 (0 if it is the first token);
- the N context tokens of one image get p+δ·k for k = 1..N, after which
  p = ceil(p + δ·N), so the text after the image continues at integers.

Modes: "default" (δ = 1), "v2pe_fix" (δ = stride/256, one stride for inference) and
"v2pe_rnd" (training: δ drawn per image from {1, 1/2, ..., 1/256}).

Positions are multiples of 1/256. They are computed exactly in integer "ticks" of 1/256
and returned as float64, which represents every tick exactly up to 2^45 positions; the
RoPE angles are formed in float64 too. float32 would not do: its spacing is 1/32 at
2^18 and 1/8 at 2^20, so neighbouring visual tokens of a 1M-token sample would collapse
onto the same position.
"""

from __future__ import annotations

import torch

TICKS = 256  # positions are multiples of 1/TICKS
MODES = ("default", "v2pe_fix", "v2pe_rnd")
# v2pe_rnd draws δ = 1/2^j, j = 0..8, uniformly per image, in ticks: 256, 128, ..., 1.
RND_DELTA_TICKS = tuple(TICKS >> j for j in range(9))


def _image_runs(input_ids: torch.Tensor, img_start_id: int, img_context_id: int, img_end_id: int):
    """(start, end) of every run of context tokens, checked to sit inside <img> ... </img>."""
    ids = input_ids
    is_ctx = ids == img_context_id
    if not bool(is_ctx.any()):
        return []
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), is_ctx.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = torch.diff(padded)
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    n = ids.numel()
    for s, e in zip(starts, ends):
        if s == 0 or int(ids[s - 1]) != img_start_id:
            raise ValueError(f"image context tokens at {s}..{e - 1} are not preceded by <img> (id {img_start_id})")
        if e >= n or int(ids[e]) != img_end_id:
            raise ValueError(f"image context tokens at {s}..{e - 1} are not followed by </img> (id {img_end_id})")
    return list(zip(starts, ends))


def _delta_ticks(mode: str, n_images: int, stride: int | None, generator: torch.Generator | None) -> list[int]:
    if mode == "default":
        return [TICKS] * n_images
    if mode == "v2pe_fix":
        if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= TICKS:
            raise ValueError(f"mode 'v2pe_fix' needs stride, an integer in 1..{TICKS}; got {stride!r}")
        return [stride] * n_images  # δ = stride/256, i.e. `stride` ticks
    if mode == "v2pe_rnd":
        picks = torch.randint(len(RND_DELTA_TICKS), (n_images,), generator=generator).tolist()
        return [RND_DELTA_TICKS[i] for i in picks]
    raise ValueError(f"mode={mode!r} is not one of {MODES}")


def v2pe_position_ticks(
    input_ids: torch.Tensor,
    *,
    img_start_id: int,
    img_context_id: int,
    img_end_id: int,
    mode: str,
    stride: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Exact positions in ticks of 1/256 (int64), and the δ (in ticks) used for each image."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (one sample), got shape {tuple(input_ids.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    runs = _image_runs(input_ids, img_start_id, img_context_id, img_end_id)
    deltas = _delta_ticks(mode, len(runs), stride, generator)
    n = input_ids.numel()
    out = torch.empty(n, dtype=torch.int64)
    p = None  # running position in ticks; None before the first token
    cursor = 0

    def text(upto: int) -> None:
        nonlocal p, cursor
        length = upto - cursor
        if length <= 0:
            return
        if p is None:  # the first token sits at 0, the rest follow at +1
            out[cursor:upto] = torch.arange(length, dtype=torch.int64) * TICKS
            p = (length - 1) * TICKS
        else:
            out[cursor:upto] = p + torch.arange(1, length + 1, dtype=torch.int64) * TICKS
            p += length * TICKS
        cursor = upto

    for (s, e), d in zip(runs, deltas):
        text(s)  # everything up to and including <img>
        k = e - s
        out[s:e] = p + torch.arange(1, k + 1, dtype=torch.int64) * d
        p = -(-(p + d * k) // TICKS) * TICKS  # ceil to the next integer position
        cursor = e
    text(n)
    return out, deltas


def v2pe_position_ids(
    input_ids: torch.Tensor,
    *,
    img_start_id: int,
    img_context_id: int,
    img_end_id: int,
    mode: str,
    stride: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """float64 V2PE positions of one sample (1-D LongTensor of token ids)."""
    ticks, _ = v2pe_position_ticks(
        input_ids, img_start_id=img_start_id, img_context_id=img_context_id, img_end_id=img_end_id,
        mode=mode, stride=stride, generator=generator,
    )
    return ticks.to(torch.float64) / TICKS  # exact: ticks < 2^53 and TICKS is a power of two


def v2pe_position_ids_packed(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """Positions of a packed row: they restart at 0 at every document boundary."""
    offs = cu_seqlens.tolist()
    if offs[0] != 0 or offs[-1] != input_ids.numel():
        raise ValueError(f"cu_seqlens must run from 0 to {input_ids.numel()}, got {offs[0]}..{offs[-1]}")
    return torch.cat([v2pe_position_ids(input_ids[a:b], **kwargs) for a, b in zip(offs[:-1], offs[1:])])


class V2PERotary(torch.nn.Module):
    """RoPE from float64 positions: angles in float64, cos/sin cast to the activation dtype.

    Uses the "rotate half" layout of InternLM2/Llama: the two halves of the head
    dimension form the (x, y) pairs.

    `scaling` is the checkpoint's `rope_scaling` as InternLM2 implements it, applied only
    to plain positions (`rope_len` > 0, the longest document of the batch): "dynamic"
    (NTK) raises the base once a sequence is longer than `max_positions`, "linear"
    divides positions by `factor`. V2PE positions (`rope_len` = 0) use the plain base, as
    the V2PE authors switch scaling off in their V2PE position modes.
    """

    def __init__(self, head_dim: int, base: float = 1_000_000.0, *, scaling: str | None = None, factor: float = 1.0,
                 max_positions: int = 32768):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        if scaling not in (None, "dynamic", "linear"):
            raise ValueError(f"rope scaling {scaling!r} is not one of dynamic, linear")
        self.head_dim, self.base, self.scaling, self.factor, self.max_positions = (
            head_dim, base, scaling, factor, max_positions)
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)  # (D/2,) float64

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, rope_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (..., S) float64 -> cos, sin: (..., S, D) in `dtype`."""
        if positions.dtype != torch.float64:
            raise ValueError(f"V2PE positions must be float64 to stay exact, got {positions.dtype}")
        inv_freq = self.inv_freq
        if rope_len and self.scaling == "linear":
            positions = positions / self.factor
        elif rope_len > self.max_positions and self.scaling == "dynamic":
            # InternLM2's dynamic NTK: the base grows with the sequence length.
            d = self.head_dim
            base = self.base * ((self.factor * rope_len / self.max_positions) - (self.factor - 1)) ** (d / (d - 2))
            inv_freq = self._inv_freq(base)
        angles = positions.unsqueeze(-1) * inv_freq.to(positions.device)  # (..., S, D/2) float64
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); cos/sin: (B, S, D) -> rotated x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)
