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


def detector_head_flops(model) -> float:
    """Multiply-adds of a `PIIPDetector`'s branch merge, pyramid, RPN and RoI heads (boxes and masks) on
    one S x S image in evaluation, counted by PyTorch's operator counter (which counts a
    multiply-add as two): beside the backbone's, as the PIIP paper reports backbones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, model.size, model.size, generator=g)
    with torch.no_grad():
        image_list, _, original = model.prepare([image])
        feats, _ = model.piip.forward_features(model.pyramid(image_list.tensors))
        feats = [f.clone() for f in feats]
        counter = FlopCounterMode(display=False)
        with counter:
            model.heads(feats, image_list, None, original)
    model.train(was)
    return counter.get_total_flops() / 2  # the branch merge is counted here too: it is not backbone


def propose_layout(cfg: PIIPConfig, world_size: int) -> tuple[int, ...]:
    """Ranks per branch, proportional to each branch's FLOPs (its blocks and its sides
    of the interaction units), at least one each, so the groups finish a stage together.

    Largest-remainder rounding of world_size x share, then, while a rank is left, it goes
    to the branch with the most FLOPs per rank.
    """
    n = len(cfg.branches)
    if world_size < n:
        raise ValueError(f"{n} branches need at least {n} ranks, got world_size={world_size}")
    work = [branch_macs(b) for b in cfg.branches]
    if n > 1:
        for k, (a, b) in enumerate(zip(cfg.branches[:-1], cfg.branches[1:])):
            na, nb = a.grid**2, b.grid**2
            work[k] += cfg.interactions * (na * a.dim * b.dim + injector_macs(a.dim, na, nb, cfg))
            work[k + 1] += cfg.interactions * (nb * b.dim * a.dim + injector_macs(b.dim, nb, na, cfg))
    ranks = [1] * n
    while sum(ranks) < world_size:
        k = max(range(n), key=lambda i: work[i] / ranks[i])
        ranks[k] += 1
    return tuple(ranks)


def plan_job(cfg, hw, tiles: int | None = None) -> dict:
    """Branch FLOPs and ranks per branch of a PIIP job (`longview plan`); `tiles` is V2PE's."""
    m = cfg.piip.model_config()
    gpus = hw.gpus or cfg.resources.max_workers
    f = backbone_flops(m)
    return {"workload": "piip", "variant": cfg.piip.variant, "resolutions": list(cfg.piip.resolutions),
            "gflops": f["total"] / 1e9, "branch_gflops": [b / 1e9 for b in f["branches"]],
            "configured_ranks_per_branch": list(cfg.piip.ranks_per_branch) or None,
            "recommended_ranks_per_branch": list(propose_layout(m, gpus)), "gpus": gpus}


def format_plan(plan: dict) -> str:
    lines = [f"PIIP {plan['variant']} @ {'/'.join(map(str, plan['resolutions']))}: "
             f"{plan['gflops']:.1f} GFLOPs per image"]
    lines.append("branch GFLOPs: " + ", ".join(f"{g:.1f}" for g in plan["branch_gflops"]))
    lines.append(f"ranks per branch on {plan['gpus']} GPUs: {plan['recommended_ranks_per_branch']} "
                 "(proportional to each branch's FLOPs)")
    if plan["configured_ranks_per_branch"]:
        lines.append(f"configured: {plan['configured_ranks_per_branch']}")
    return "\n".join(lines)


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
