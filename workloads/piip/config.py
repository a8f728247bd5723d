"""PIIP's config section (`piip:`), used as it is by its runner, data and planner."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..fields import APPLY, NEW_RUN, REFUSE, FieldError, bounded, no_credentials


@dataclass(kw_only=True, frozen=True)
class PIIPSection:
    # The branches' shapes and the data are the run's; branch placement reshards (each
    # parameter is restored by name wherever its branch now lives).
    RESUME: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("variant", "resolutions", "interactions", "attn_type", "task", "data",
                         "synthetic_samples", "image_root", "anchor_sizes", "fpn_channels", "window_size",
                         "pretrained"), REFUSE),
        "rpn_proposals": APPLY, "roi_samples": APPLY,
        "eval_data": APPLY, "flip": NEW_RUN, "on_bad_sample": APPLY, "baseline": APPLY,
        "batch_size": NEW_RUN, "ranks_per_branch": APPLY, "eval_samples": APPLY,
    }
    variant: str = "piip-tiny"
    # one per branch, any order
    resolutions: list[int] = bounded(ge=1, default_factory=lambda: [32, 48, 64])
    interactions: int | None = bounded(None, gt=0)  # default: the smallest branch depth
    attn_type: Literal["deform", "plain"] = "deform"
    # Attention window of the windowed blocks (unset: the variant's, 14 or 28 as the PIIP
    # authors'); small images want small windows (a 3x3 token grid padded to 14x14 is waste).
    window_size: int | None = bounded(None, gt=0)
    task: Literal["classification", "segmentation", "detection"] = "classification"
    ranks_per_branch: list[int] = bounded(ge=1, default_factory=list)  # empty: proposed from the branches' FLOPs
    # "synthetic" (procedural shapes), an image-folder URL, or for detection a COCO
    # instances JSON (its images under `image_root`, default: the JSON's folder)
    data: str = "synthetic"
    synthetic_samples: int = bounded(64, gt=0)
    eval_samples: int = bounded(90, gt=0)  # held-out procedural samples `longview eval` scores
    # detection: the COCO instances JSON `longview eval` scores (COCO's val2017); unset
    # with synthetic data: held-out generated shapes
    eval_data: str | None = None
    image_root: str | None = None
    flip: bool = True  # detection: each training sample mirrored left to right with probability 1/2
    on_bad_sample: Literal["fail", "skip"] = "fail"
    # detection: Mask R-CNN's anchor size per pyramid level (strides 4 to 64) and FPN width
    anchor_sizes: list[int] = bounded(ge=1, default_factory=lambda: [32, 64, 128, 256, 512])
    fpn_channels: int = bounded(256, gt=0)
    rpn_proposals: list[int] = bounded(ge=1, default_factory=lambda: [2000, 1000])  # kept after NMS: train, eval
    roi_samples: int = bounded(512, gt=0)  # RoIs sampled per image for the box head
    # `longview experiment`'s single-branch ViT, run at the highest of `resolutions`
    baseline: str = "vit-b"
    # A published ViT checkpoint per branch (largest model first, as the variant names
    # them; "" for a branch that starts from scratch): DeiT / AugReg in timm's or the DeiT
    # authors' layout, .safetensors or .pth (see pretrained.py). Empty: none.
    pretrained: list[str] = field(default_factory=list)
    batch_size: int = bounded(4, gt=0)  # global batch; each branch splits it over its ranks

    def __post_init__(self):
        try:
            self.model_config()
        except ValueError as e:
            raise FieldError("", str(e)) from None
        for key in ("data", "eval_data", "image_root"):
            no_credentials(key, getattr(self, key))
        for url in self.pretrained:
            no_credentials("pretrained", url)
        if self.pretrained and len(self.pretrained) != len(self.resolutions):
            raise FieldError("pretrained", f"{len(self.pretrained)} checkpoint(s) for {len(self.resolutions)} branches "
                                           "(one per branch, largest model first; \"\" for none)")
        if self.task == "detection":
            if len(self.anchor_sizes) != 5:
                raise FieldError("anchor_sizes", f"{list(self.anchor_sizes)}: one size per pyramid level, five "
                                                 "(strides 4, 8, 16, 32, 64)")
            if len(self.rpn_proposals) != 2:
                raise FieldError("rpn_proposals", f"{list(self.rpn_proposals)}: two counts, training and evaluation")
            if max(self.resolutions) % 32:
                raise FieldError("resolutions", f"the largest, {max(self.resolutions)}, must be a multiple of 32 for "
                                                "detection (batches are padded to multiples of 32)")
            if self.data != "synthetic" and not self.data.endswith(".json"):
                raise FieldError("data", f"{self.data}: detection reads a COCO instances JSON (or 'synthetic')")
        if self.ranks_per_branch and len(self.ranks_per_branch) != len(self.resolutions):
            raise FieldError("ranks_per_branch", f"{list(self.ranks_per_branch)} has {len(self.ranks_per_branch)} "
                                                 f"entries for {len(self.resolutions)} branches")

    def model_config(self):
        """The `PIIPConfig` of this variant at these resolutions (computed once)."""
        return _piip_config(self.variant, tuple(int(r) for r in self.resolutions), self.attn_type, self.interactions,
                            self.window_size)

    def detection_config(self, num_classes: int):
        """The detector's options (`detection.DetectionConfig`) for a dataset of `num_classes`."""
        from .detection import DetectionConfig

        return DetectionConfig(num_classes=num_classes, anchor_sizes=tuple(self.anchor_sizes),
                               fpn_channels=self.fpn_channels, rpn_proposals=tuple(self.rpn_proposals),
                               roi_samples=self.roi_samples)

    def planned_classes(self) -> int:
        """Classes the planner assumes: the generated shapes', or COCO's 80 (it reads no
        annotations; the class-sized layers are a sliver of the heads)."""
        from .coco import SHAPES  # config sections load with the spec, before any model code

        return len(SHAPES) if self.data == "synthetic" else 80

    def head_macs(self) -> float:
        """Multiply-adds per training image of the detector's parts beside the backbone
        (merge, pyramid, RPN, box head over roi_samples RoIs, mask head over the positive
        quarter of them): they run on the first branch's ranks. 0 for the other tasks."""
        if self.task != "detection":
            return 0.0
        from .flops import detector_head_macs  # config sections load with the spec, before any model code

        det = self.detection_config(self.planned_classes())
        return detector_head_macs(self.model_config(), det, rois=self.roi_samples,
                                  masks=self.roi_samples // 4)["total"]

    def layout(self, workers: int) -> tuple[int, ...]:
        """Ranks per branch: as configured, else proportional to each branch's FLOPs, the
        detector's heads counted on the first branch's."""
        from .flops import propose_layout  # config sections load with the spec, before any model code

        if self.ranks_per_branch:
            return tuple(self.ranks_per_branch)
        return propose_layout(self.model_config(), workers, first_branch_extra=self.head_macs())


@functools.lru_cache(maxsize=16)
def _piip_config(variant: str, resolutions: tuple, attn_type: str, interactions: int | None,
                 window_size: int | None = None):
    from .model import piip_config  # config sections load with the spec, before any model code

    kw = {"attn_type": attn_type}
    if interactions is not None:
        kw["interactions"] = interactions
    if window_size is not None:
        kw["window_size"] = window_size
    return piip_config(variant, list(resolutions), **kw)


SECTIONS = {"piip": PIIPSection}
