"""torchvision, whether or not its compiled operators load.

The detector is torchvision's (`torchvision.models.detection`). Its compiled operators
(`torchvision._C`) are built against one torch build: the wheel the package index serves
is linked to CUDA torch, and beside a CPU-only torch (longview's CPU machines) it cannot
load them; torchvision's import then fails while registering shapes for them. Of those
operators Mask R-CNN calls two: RoI Align, for which torchvision carries its own Python
implementation and uses it when the compiled one is missing, and NMS, for which it has
none. `torchvision()` imports the package either way: where the compiled operators are
missing it skips their shape registrations and gives `torchvision.ops.boxes` an NMS in
plain torch (`nms`, below, tested against the definition). Its Python RoI Align is
exact but slow on CPUs (eager: seconds per call; compiled: half a minute of compiling in
every process, then still ~1 s a call here), so `roi_align` below takes the same
samples with `grid_sample` instead; tests hold it to torchvision's own to float rounding. Where the compiled
operators load, nothing is changed.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, as torchvision's: indices of kept boxes, by
    decreasing score; a box is dropped when its IoU with a kept, higher-scoring box is
    above `iou_threshold`. boxes: (N, 4) x1, y1, x2, y2; scores: (N,)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N, N)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=torch.finfo(torch.float32).tiny)
    over = (iou > iou_threshold).cpu()
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):  # greedy: a kept box suppresses the lower-scoring ones it overlaps
        if keep[i]:
            keep[i + 1:] &= ~over[i, i + 1:]
    return order[keep.to(order.device)]


def roi_align(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoI Align as torchvision's kernel computes it: each output bin the mean of a grid
    of bilinear samples (sampling_ratio² of them, or with sampling_ratio <= 0 as many as
    the RoI's bin spans pixels, at least one), a sample more than one pixel outside the
    map counting 0 and one within it clamped to the edge. The samples are taken with
    `grid_sample` (align_corners, at the clamped pixel coordinates, which makes its
    interpolation the kernel's), one call per image and sampling grid.
    input: (B, C, H, W); rois: (K, 5) batch index, x1, y1, x2, y2 -> (K, C, ph, pw)."""
    b, c, h, w = input.shape
    k, ph, pw = rois.shape[0], pooled_height, pooled_width
    off = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - off, rois[:, 2] * spatial_scale - off
    rw, rh = rois[:, 3] * spatial_scale - off - x1, rois[:, 4] * spatial_scale - off - y1
    if not aligned:  # the kernel's legacy rule: RoIs at least one pixel wide
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        grids = torch.full((k, 2), sampling_ratio, dtype=torch.long, device=rois.device)
    else:  # adaptive: as many samples per bin as it spans pixels
        grids = torch.stack([torch.ceil(rh / ph), torch.ceil(rw / pw)], 1).long().clamp(min=1)
    out = input.new_zeros((k, c, ph, pw))
    index = rois[:, 0].long()
    keys = torch.stack([index, grids[:, 0], grids[:, 1]], 1)
    for key in keys.unique(dim=0).tolist():
        i, sy, sx = key
        sel = (keys == torch.tensor(key, device=keys.device)).all(1).nonzero().flatten()
        steps = lambda n, s: (torch.arange(n, dtype=input.dtype, device=input.device)[:, None]  # noqa: E731
                              + (torch.arange(s, dtype=input.dtype, device=input.device) + 0.5) / s).flatten()
        ys = y1[sel, None] + steps(ph, sy)[None] * (rh[sel] / ph)[:, None]  # (n, ph*sy)
        xs = x1[sel, None] + steps(pw, sx)[None] * (rw[sel] / pw)[:, None]  # (n, pw*sx)
        keep = ((ys >= -1) & (ys <= h))[:, :, None] & ((xs >= -1) & (xs <= w))[:, None, :]  # (n, ph*sy, pw*sx)
        gy = ys.clamp(0, h - 1) * (2 / max(h - 1, 1)) - 1
        gx = xs.clamp(0, w - 1) * (2 / max(w - 1, 1)) - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (n, ph*sy, pw*sx, 2)
        got = F.grid_sample(input[i:i + 1], grid.reshape(1, -1, pw * sx, 2), mode="bilinear",
                            align_corners=True)  # (1, C, n*ph*sy, pw*sx): this image's RoIs stacked
        got = got.view(c, len(sel), ph * sy, pw * sx).transpose(0, 1) * keep[:, None].to(got.dtype)
        out[sel] = got.reshape(len(sel), c, ph, sy, pw, sx).mean(dim=(3, 5))
    return out


reference_roi_align = None  # torchvision's Python RoI Align, once `torchvision()` replaced it


@functools.lru_cache(maxsize=1)
def torchvision():
    """The torchvision module, usable for detection on this machine."""
    try:
        import torchvision as tv

        return tv
    except RuntimeError as e:  # its compiled operators are missing: see the module's docstring
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision as tv
    import torchvision.ops.boxes as boxes

    boxes.nms = nms
    global reference_roi_align
    ra = sys.modules["torchvision.ops.roi_align"]  # the module: the package's name is the function
    reference = ra._roi_align
    reference_roi_align = getattr(reference, "__wrapped__", reference)  # torchvision's, uncompiled: for tests

    ra._roi_align = roi_align
    # Said by one process of a job (RANK, as torch.distributed's launchers set it), not once per worker.
    log.log(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.DEBUG,
            "torchvision %s: its compiled operators do not load beside torch %s; using torchvision's own "
            "Python RoI Align and longview's NMS", tv.__version__, torch.__version__)
    return tv
