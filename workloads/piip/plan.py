"""`longview plan` for a PIIP job: ranks per branch, memory per GPU, step time, hours.

Each branch trains on its own group of ranks, which split the global batch; the merge
and the task heads (the detector's pyramid, RPN, box and mask heads) run on the first
branch's group (`parallel.owner_branch`). So per rank of branch k:

- memory: every parameter of the model in float32 (a rank keeps copies of the other
  branches' weights, never updated), gradients and AdamW's two moments of the ones it
  owns (float32), and the activations its share of the batch keeps for the backward:
  per ViT block and token the LayerNorm inputs and outputs, q/k/v, the attention
  output, the projections, the MLP's hidden tensors (the shapes `model.Block` keeps);
  for the first branch also the detector's feature maps and RoI features. Parameters
  are counted on the real modules built on the meta device, so they are exact; the
  activations are an estimate.
- step time: its share of the batch through its branch (and heads) forward and
  backward (three passes' FLOPs) at a rate measured on one GPU, the slowest group
  setting the step. PIIP has no GPU measurement of its own yet: the rate is the V2PE
  training step's measured 35.8 % of peak (internvl2-2b at 128K tokens on one H200,
  BENCHMARKS.md), an assumption the output names.
"""

from __future__ import annotations

import math
from collections import Counter

from ..spec import Budget, Hardware
from .flops import backbone_flops, branch_work, detector_head_macs, propose_layout
from .parallel import owner_branch

GIB = 1 << 30
ASSUMED_MFU = 0.358  # V2PE's measured training rate on one H200 (see the module's docstring)
PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM


def owned_parameter_counts(section) -> tuple[list[int], int]:
    """(parameters each branch's group owns, all parameters), counted on the modules."""
    import torch

    m = section.model_config()
    with torch.device("meta"):
        if section.task == "detection":
            from .detection import PIIPDetector

            model = PIIPDetector(m, section.detection_config(section.planned_classes()))
        else:
            from .model import PIIP

            model = PIIP(m)
    owned: Counter = Counter()
    for name, p in model.named_parameters():
        owned[owner_branch(name)] += p.numel()
    return [owned[k] for k in range(len(m.branches))], sum(owned.values())


def _block_saved_bytes(dim: int, hidden: int, heads: int) -> float:
    """Bytes per token one ViT block keeps for its backward (float32): both LayerNorms'
    input and output, q/k/v, the attention output and its log-sum-exp, the projection,
    the residual, the MLP's fc1 output, its GELU and the fc2 output."""
    return 4 * (2 * dim + 2 * dim + 3 * dim + dim + dim + dim + 2 * hidden + dim) + 4 * heads


def _head_activation_bytes(section) -> float:
    """Bytes per image of the detector's tensors kept for the backward (float32): the
    pyramid's levels and the FPN's outputs, the RPN's hidden maps, the box head's RoI
    features and MLP, the mask head's four 14x14 maps and its 28x28 logits."""
    m = section.model_config()
    c, d, g = section.fpn_channels, m.merge_dim, max(b.grid for b in m.branches)
    levels = [(d // 4, 4 * g), (d // 2, 2 * g), (d, g), (d, g // 2)]
    pyramid = sum(n * n * (cin + 2 * c) for cin, n in levels)
    rpn = sum(n * n * c for _, n in levels)
    rois, masks = section.roi_samples, section.roi_samples // 4
    box = rois * (49 * c + 2 * 4 * c)
    mask = masks * (4 * 196 * c + 784 * c)
    return 4 * (pyramid + rpn + box + mask)


def plan_job(cfg, hw: Hardware, tiles: int | None = None, budget: Budget | None = None) -> dict:
    """Ranks per branch, per-rank memory and step time of a PIIP job, and hours for the
    budget (`longview plan`); `tiles` is V2PE's."""
    budget = budget or Budget()
    s = cfg.piip
    m = s.model_config()
    gpus = hw.gpus or cfg.resources.max_workers
    heads = s.head_macs()
    ranks = list(s.ranks_per_branch) if s.ranks_per_branch and gpus == cfg.resources.max_workers else \
        list(propose_layout(m, gpus, first_branch_extra=heads))
    owned, total_params = owned_parameter_counts(s)
    f = backbone_flops(m)
    work = branch_work(m, heads)
    rate = PEAK_TFLOPS * 1e12 * ASSUMED_MFU
    per_branch = []
    for k, b in enumerate(m.branches):
        images = math.ceil(s.batch_size / ranks[k])  # this rank's share of the batch
        act = images * (b.grid**2 + 1) * b.depth * _block_saved_bytes(b.dim, int(b.dim * b.mlp_ratio), b.heads)
        if k == 0 and s.task == "detection":
            act += images * _head_activation_bytes(s)
        mem = {"parameters": 4 * total_params, "gradients": 4 * owned[k], "optimizer": 8 * owned[k],
               "activations": act}
        mem["total"] = sum(mem.values())
        # multiply-adds -> FLOPs (x2), forward + backward (x3)
        per_branch.append({"ranks": ranks[k], "images_per_rank": images, "memory_gib": {k2: v / GIB for k2, v in
                                                                                      mem.items()},
                           "step_s": 2 * 3 * work[k] * images / rate})
    step_s = max(b["step_s"] for b in per_branch)
    peak = max(b["memory_gib"]["total"] for b in per_branch)
    samples = budget.samples or (s.synthetic_samples if s.data == "synthetic" else None)
    out = {"workload": "piip", "variant": s.variant, "resolutions": list(s.resolutions),
           "gflops": f["total"] / 1e9, "branch_gflops": [b / 1e9 for b in f["branches"]],
           "configured_ranks_per_branch": list(s.ranks_per_branch) or None,
           "recommended_ranks_per_branch": list(propose_layout(m, gpus, first_branch_extra=heads)), "gpus": gpus,
           "ranks_per_branch": ranks, "branches": per_branch, "step_s": step_s, "images_per_s": s.batch_size / step_s,
           "memory_gib": peak, "fits": peak <= hw.gpu_memory_gib, "gpu_memory_gib": hw.gpu_memory_gib,
           "assumed_mfu": ASSUMED_MFU, "samples": samples, "epochs": budget.epochs}
    if samples:
        hours = math.ceil(samples * budget.epochs / s.batch_size) * step_s / 3600
        out.update(hours=hours, gpu_hours=hours * gpus)
    if s.task == "detection":
        det = s.detection_config(s.planned_classes())
        h = detector_head_macs(m, det)
        out["head_gflops"] = {k: v / 1e9 for k, v in h.items()}
        out["head_assumes"] = {"classes": s.planned_classes(), "rois": det.rpn_proposals[1],
                               "masks": det.detections_per_image}
    return out


def format_plan(plan: dict) -> str:
    lines = [f"PIIP {plan['variant']} @ {'/'.join(map(str, plan['resolutions']))}: "
             f"{plan['gflops']:.4g} GFLOPs per image (backbone)"]
    lines.append("branch GFLOPs: " + ", ".join(f"{g:.4g}" for g in plan["branch_gflops"]))
    if "head_gflops" in plan:
        h, a = plan["head_gflops"], plan["head_assumes"]
        lines.append(f"detector heads: {h['total']:.4g} GFLOPs per image beside the backbone (merge {h['merge']:.3g}, "
                     f"pyramid {h['pyramid']:.3g}, RPN {h['rpn']:.3g}, box {h['box']:.3g}, mask {h['mask']:.3g}; "
                     f"at {a['rois']} proposals, {a['masks']} masks, {a['classes']} classes; in training they run "
                     "on the first branch's ranks and count in its share)")
    lines.append(f"ranks per branch on {plan['gpus']} GPUs: {plan['recommended_ranks_per_branch']} "
                 "(proportional to each branch's FLOPs, heads included)")
    if plan["configured_ranks_per_branch"]:
        lines.append(f"configured: {plan['configured_ranks_per_branch']}")
    lines.append(f"per rank, with {plan['ranks_per_branch']} (GPUs of {plan['gpu_memory_gib']:g} GiB; step time at "
                 f"{100 * plan['assumed_mfu']:.1f} % of peak, V2PE's measured training rate: PIIP has no GPU "
                 "measurement yet):")
    for k, b in enumerate(plan["branches"]):
        mem = b["memory_gib"]
        lines.append(f"  branch {k}: {b['ranks']} rank(s), {b['images_per_rank']} images each; {mem['total']:.2f} GiB "
                     f"(parameters {mem['parameters']:.2f}, gradients {mem['gradients']:.2f}, optimizer "
                     f"{mem['optimizer']:.2f}, activations {mem['activations']:.2f}); {b['step_s']:.3g} s")
    fit = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"step ~{plan['step_s']:.3g} s ({plan['images_per_s']:,.0f} images/s); {plan['memory_gib']:.2f} GiB on "
                 f"the fullest GPU: {fit}")
    if plan.get("hours") is not None:
        lines.append(f"{plan['samples']} images x {plan['epochs']:g} epoch(s): ~{plan['hours']:.2f} hours, "
                     f"{plan['gpu_hours']:.1f} GPU-hours on {plan['gpus']} GPUs")
    else:
        lines.append("pass --samples N (and --epochs) for hours and GPU-hours")
    return "\n".join(lines)
