"""Backbone FLOPs of PIIP models, counted as the PIIP paper counts them: one
multiply-add = one FLOP, over the matrix products and convolutions of the backbone
(patch embeddings, ViT blocks with their windowed or global attention, interaction
units). Normalisations, activations, softmax and bilinear sampling are left out (a
fraction of a percent). Task heads and the branch merge are not backbone.

The count follows the modules of `model.py` one by one; `tests/test_piip.py` checks it
against PyTorch's own operator counter on small configs.
"""

from __future__ import annotations

import json
import math

from .model import BranchConfig, PIIPConfig, piip_config


def block_macs(b: BranchConfig, global_attn: bool) -> float:
    n, d = b.grid**2, b.dim
    hidden = int(d * b.mlp_ratio)
    linear = (n + 1) * (3 * d * d + d * d + 2 * d * hidden)  # qkv, proj, MLP (CLS token included)
    if global_attn:
        attn = 2 * (n + 1) ** 2 * d  # QK^T and PV over all tokens
    else:
        ws = b.window_size
        padded = math.ceil(b.grid / ws) ** 2 * ws * ws
        attn = 2 * padded * ws * ws * d  # within each (zero-padded) window
        attn += 2 * (n + 1) * d  # the CLS token attends to every token
    return linear + attn


def branch_macs(b: BranchConfig) -> float:
    embed = b.grid**2 * b.dim * 3 * b.patch_size**2
    return embed + sum(block_macs(b, i in b.global_blocks) for i in range(b.depth))


def injector_macs(dim: int, n_q: int, n_feat: int, cfg: PIIPConfig) -> float:
    hidden = int(dim * cfg.cffn_ratio)
    ffn = n_q * (2 * dim * hidden + 9 * hidden)  # fc1, fc2, depth-wise 3x3
    if cfg.attn_type == "deform":
        inner = int(dim * cfg.deform_ratio)
        hp = cfg.interaction_heads * cfg.n_points
        attn = n_feat * dim * inner + n_q * dim * 3 * hp + n_q * inner * dim  # value, offsets+weights, out
    else:
        attn = n_q * dim * dim + n_feat * 2 * dim * dim + 2 * n_q * n_feat * dim + n_q * dim * dim
    return attn + ffn


def unit_macs(a: BranchConfig, b: BranchConfig, cfg: PIIPConfig) -> float:
    na, nb = a.grid**2, b.grid**2
    proj = nb * b.dim * a.dim + na * a.dim * b.dim
    return proj + injector_macs(a.dim, na, nb, cfg) + injector_macs(b.dim, nb, na, cfg)


def backbone_flops(cfg: PIIPConfig) -> dict[str, float]:
    """{"branches": [...], "interactions": x, "total": y} in FLOPs (multiply-adds)."""
    per_branch = [branch_macs(b) for b in cfg.branches]
    units = 0.0
    if len(cfg.branches) > 1:
        units = cfg.interactions * sum(unit_macs(a, b, cfg) for a, b in zip(cfg.branches[:-1], cfg.branches[1:]))
    return {"branches": per_branch, "interactions": units, "total": sum(per_branch) + units}


def detector_head_macs(cfg: PIIPConfig, det, rois: int | None = None, masks: int | None = None) -> dict[str, float]:
    """Multiply-adds of a `detection.PIIPDetector`'s parts beside the backbone, on one
    S x S image in evaluation: the branch merge, the simple pyramid with torchvision's FPN,
    the RPN head over every level, the box head over `rois` proposals and the mask head
    over `masks` detections (default: the most the detector keeps, `det.rpn_proposals[1]`
    and `det.detections_per_image`). RoI Align, NMS and box decoding are not products.

    `tests/test_piip_detection.py` holds this to PyTorch's operator counter on a detector."""
    rois = det.rpn_proposals[1] if rois is None else rois
    masks = det.detections_per_image if masks is None else masks
    c, k = det.fpn_channels, det.num_classes + 1
    d, g = cfg.merge_dim, max(b.grid for b in cfg.branches)  # merged map (B, d, g, g), stride 16
    merge = sum(b.grid**2 * (9 * b.dim * b.dim + b.dim * d) for b in cfg.branches)  # 3x3 then 1x1 per branch
    # strides 4, 8, 16, 32: (channels, side) of each pyramid level, as `SimplePyramid` makes them
    levels = [(d // 4, 4 * g), (d // 2, 2 * g), (d, g), (d, g // 2)]
    up = g * g * (d * (d // 2) * 4) * 2 + (2 * g) ** 2 * (d // 2) * (d // 4) * 4  # 2x2 transposed convs
    fpn = sum(n * n * (cin * c + 9 * c * c) for cin, n in levels)  # lateral 1x1, output 3x3
    sides = [n for _, n in levels] + [math.ceil(levels[-1][1] / 2)]  # the FPN's extra stride-64 level
    anchors = 3  # aspect ratios per location
    rpn = sum(n * n * (9 * c * c + c * anchors * 5) for n in sides)  # 3x3, then objectness and 4 box deltas
    box = rois * (c * 49 * 4 * c + 4 * c * 4 * c + 4 * c * k * 5)  # two-layer MLP, class scores + box deltas
    mask = masks * (196 * (4 * 9 * c * c + 4 * c * c) + 784 * c * k)  # four 3x3 at 14x14, 2x up, 1x1 at 28x28
    parts = {"merge": merge, "pyramid": up + fpn, "rpn": rpn, "box": box, "mask": mask}
    return {**parts, "total": sum(parts.values())}


def branch_work(cfg: PIIPConfig, first_branch_extra: float = 0.0) -> list[float]:
    """Multiply-adds per image each branch's group computes: its blocks, its side of each
    neighbouring interaction unit, and for the first branch `first_branch_extra` (the
    merge and task heads, which run there)."""
    work = [branch_macs(b) for b in cfg.branches]
    work[0] += first_branch_extra
    for k, (a, b) in enumerate(zip(cfg.branches[:-1], cfg.branches[1:])):
        na, nb = a.grid**2, b.grid**2
        work[k] += cfg.interactions * (na * a.dim * b.dim + injector_macs(a.dim, na, nb, cfg))
        work[k + 1] += cfg.interactions * (nb * b.dim * a.dim + injector_macs(b.dim, nb, na, cfg))
    return work


def propose_layout(cfg: PIIPConfig, world_size: int, first_branch_extra: float = 0.0) -> tuple[int, ...]:
    """Ranks per branch, proportional to each branch's FLOPs (its blocks and its sides
    of the interaction units; `first_branch_extra`: the merge and task heads, which run
    on the first branch's group), at least one each, so the groups finish a step together.

    Largest-remainder rounding of world_size x share, then, while a rank is left, it goes
    to the branch with the most FLOPs per rank.
    """
    n = len(cfg.branches)
    if world_size < n:
        raise ValueError(f"{n} branches need at least {n} ranks, got world_size={world_size}")
    work = branch_work(cfg, first_branch_extra)
    ranks = [1] * n
    while sum(ranks) < world_size:
        k = max(range(n), key=lambda i: work[i] / ranks[i])
        ranks[k] += 1
    return tuple(ranks)


def add_flops_arguments(p) -> None:
    p.add_argument("variant")
    p.add_argument("--resolutions", required=True, help="comma-separated, one per branch, e.g. 1568,896,448")
    p.add_argument("--json", action="store_true")


def flops_command(args) -> str:
    """`longview flops VARIANT --resolutions R1,R2,...`: backbone GFLOPs as the paper counts."""

    res = [int(r) for r in args.resolutions.split(",")]
    cfg = piip_config(args.variant, res)
    f = backbone_flops(cfg)
    gflops = f["total"] / 1e9
    if args.json:
        return json.dumps({"variant": args.variant, "resolutions": res, "gflops": round(gflops, 2)})
    lines = [f"{args.variant} @ {'/'.join(map(str, sorted(res, reverse=True)))}: {gflops:.1f} GFLOPs "
             "(backbone, one multiply-add = one FLOP)"]
    lines += [f"  ViT-{b.size.upper()} @ {b.resolution}: {x / 1e9:.1f}" for b, x in zip(cfg.branches, f["branches"])]
    if len(cfg.branches) > 1:
        lines.append(f"  interactions ({cfg.interactions} x {len(cfg.branches) - 1} units): "
                     f"{f['interactions'] / 1e9:.1f}")
        for b in cfg.branches:  # the single-branch baselines at the highest resolution
            base = piip_config(f"vit-{b.size}", [max(res)])
            lines.append(f"  baseline ViT-{b.size.upper()} @ {max(res)}: {backbone_flops(base)['total'] / 1e9:.1f}")
    return "\n".join(lines)
