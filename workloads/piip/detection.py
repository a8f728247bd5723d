"""Mask R-CNN on a PIIP backbone: PIIP's headline task (object detection and instance
segmentation), with torchvision's detector.

The backbone is `model.PIIP`: each branch sees the image at its own resolution, the
interaction units exchange features, and `BranchMerge` sums the branches' final tokens
on the finest token grid (stride 16 of the largest input). From that one map a simple
feature pyramid, as ViTDet builds one for plain ViTs and the PIIP authors for their
detection backbones, makes strides 4, 8, 16 and 32 (two transposed convolutions, one,
none, a max-pool), and torchvision's `FeaturePyramidNetwork` (with its extra stride-64
level) feeds torchvision's RPN, RoI heads and mask head, built by its `MaskRCNN`. A
single-branch ViT (`vit-b`, ...) goes through the same detector as the baseline.

Nothing of the detector is written here but the pyramid: anchors, box coding, sampling,
losses, RoI Align, NMS and post-processing are torchvision's (see `vision_ops` for
machines where its compiled operators do not load). This file holds no distributed
code: `heads()` takes the branches' tokens, so `parallel.detection_loss` can run the
branches on their device groups and the heads on branch 0's.

Images: lists of (3, H, W) float tensors in [0, 1]. torchvision's transform resizes each
so its longer side is the largest branch resolution S and normalises it (mean 0.5, std
0.5, as the PIIP authors); the batch is zero-padded at the bottom and right to S x S
(boxes keep their coordinates), then resized to each branch's resolution.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import PIIP, PIIPConfig, make_pyramid, resize_for
from .vision_ops import torchvision

PYRAMID_STRIDES = (4, 8, 16, 32)  # then the FPN's extra max-pool level: 64


@dataclass(kw_only=True, frozen=True)
class DetectionConfig:
    num_classes: int  # object categories, background not counted
    # Anchor size of each pyramid level (strides 4, 8, 16, 32, 64): torchvision's COCO
    # defaults; smaller images want smaller ones.
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    fpn_channels: int = 256
    detections_per_image: int = 100
    # RPN proposals kept after NMS (training, evaluation) and RoIs sampled per image for
    # the box head: torchvision's COCO defaults; small images on CPUs want fewer.
    rpn_proposals: tuple[int, int] = (2000, 1000)
    roi_samples: int = 512

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"detection.num_classes must be at least 1, got {self.num_classes}")
        if len(self.anchor_sizes) != len(PYRAMID_STRIDES) + 1:
            raise ValueError(f"detection.anchor_sizes needs {len(PYRAMID_STRIDES) + 1} sizes (strides 4 to 64), "
                             f"got {list(self.anchor_sizes)}")


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(32 if c % 32 == 0 else 1, c)


class SimplePyramid(nn.Module):
    """(B, C, G, G) at stride 16 -> FPN maps '0'..'3' (strides 4..32) and 'pool' (64)."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        tv = torchvision()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), _norm(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up8 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.fpn = tv.ops.FeaturePyramidNetwork([dim // 4, dim // 2, dim, dim], out_channels,
                                                extra_blocks=tv.ops.feature_pyramid_network.LastLevelMaxPool())
        self.out_channels = out_channels  # what torchvision's MaskRCNN reads of a backbone

    def forward(self, x: torch.Tensor) -> OrderedDict:
        levels = [self.up4(x), self.up8(x), x, F.max_pool2d(x, 2)]  # strides 4, 8, 16, 32
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))


class PIIPDetector(nn.Module):
    def __init__(self, cfg: PIIPConfig, det: DetectionConfig):
        super().__init__()
        tv = torchvision()
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        self.cfg, self.det = cfg, det
        self.size = max(b.resolution for b in cfg.branches)
        if self.size % 32:
            raise ValueError(f"the largest branch resolution {self.size} must be a multiple of 32 (the detector pads "
                             "batches to multiples of 32)")
        self.piip = PIIP(cfg)
        # The heads' widths follow the FPN's: at torchvision's 256 they are its defaults
        # (a 1024-wide box MLP, a mask head of four 256-channel 3x3 convolutions); a
        # CPU-sized detector narrows them with it.
        c = det.fpn_channels
        box_head = TwoMLPHead(c * 7 * 7, 4 * c)
        mask_head = MaskRCNNHeads(c, (c,) * 4, 1)
        anchors = AnchorGenerator(tuple((s,) for s in det.anchor_sizes), ((0.5, 1.0, 2.0),) * len(det.anchor_sizes))
        rcnn = MaskRCNN(SimplePyramid(cfg.merge_dim, det.fpn_channels), num_classes=None,
                        min_size=self.size, max_size=self.size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                        rpn_anchor_generator=anchors, box_detections_per_img=det.detections_per_image,
                        rpn_post_nms_top_n_train=det.rpn_proposals[0], rpn_post_nms_top_n_test=det.rpn_proposals[1],
                        rpn_pre_nms_top_n_train=det.rpn_proposals[0], rpn_pre_nms_top_n_test=det.rpn_proposals[1],
                        box_batch_size_per_image=det.roi_samples, box_head=box_head,
                        box_predictor=FastRCNNPredictor(4 * c, det.num_classes + 1), mask_head=mask_head,
                        mask_predictor=MaskRCNNPredictor(c, c, det.num_classes + 1))
        # torchvision's parts, used as they are
        self.transform, self.neck, self.rpn, self.roi_heads = rcnn.transform, rcnn.backbone, rcnn.rpn, rcnn.roi_heads
        self._tv_version = tv.__version__

    def prepare(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """torchvision's resize and normalisation; the batch padded to S x S. Returns
        (ImageList, targets, original sizes)."""
        original = [tuple(im.shape[-2:]) for im in images]
        image_list, targets = self.transform(images, targets)
        h, w = image_list.tensors.shape[-2:]
        image_list.tensors = F.pad(image_list.tensors, (0, self.size - w, 0, self.size - h))  # (B, 3, S, S)
        return image_list, targets, original

    def pyramid(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> the input of every branch at its resolution."""
        return make_pyramid(batch, self.cfg)

    def branch_input(self, batch: torch.Tensor, k: int) -> torch.Tensor:
        """(B, 3, S, S) -> branch k's input (B, 3, R_k, R_k), as `pyramid` makes it."""
        return resize_for(batch, self.cfg.branches[k])

    def heads(self, feats: list[torch.Tensor], image_list, targets=None, original_sizes=None):
        """Branch tokens -> losses (training) or detections in original image coordinates."""
        features = self.neck(self.piip.merge(feats))
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """One process: torchvision's Mask R-CNN forward with PIIP as the backbone."""
        image_list, targets, original = self.prepare(images, targets)
        feats, _ = self.piip.forward_features(self.pyramid(image_list.tensors))
        return self.heads(feats, image_list, targets, original)
