"""torchvision, whether or not its compiled operators load.

The detector is torchvision's (`torchvision.models.detection`). Its compiled operators
(`torchvision._C`) are built against one torch build: the wheel the package index serves
is linked to CUDA torch, and beside a CPU-only torch (longview's CPU machines) it cannot
load them; torchvision's import then fails while registering shapes for them. Of those
operators Mask R-CNN calls two: RoI Align, for which torchvision carries its own Python
implementation and uses it when the compiled one is missing, and NMS, for which it has
none. `torchvision()` imports the package either way: where the compiled operators are
missing it skips their shape registrations and gives `torchvision.ops.boxes` an NMS in
plain torch (`nms`, below, tested against the definition), and runs the Python RoI
Align eagerly. Where the compiled operators load, nothing is changed.
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import torch

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

    roi_align = sys.modules["torchvision.ops.roi_align"]  # the module: the package's name is the function
    boxes.nms = nms
    # The Python RoI Align, run eagerly: torchvision compiles it on first use, which costs
    # half a minute in every new process on a small CPU; eager gives the same values.
    roi_align._roi_align = getattr(roi_align._roi_align, "__wrapped__", roi_align._roi_align)
    log.info("torchvision %s: its compiled operators do not load beside torch %s; using torchvision's own "
             "Python RoI Align and longview's NMS", tv.__version__, torch.__version__)
    return tv
