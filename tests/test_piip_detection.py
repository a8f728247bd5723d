"""PIIP detection: torchvision's Mask R-CNN on the PIIP backbone, in one process and
with each branch on its own group of gloo processes."""

import pytest
import torch

from tests import piip_cases
from workloads.piip.detection import DetectionConfig, PIIPDetector
from workloads.piip.model import piip_config
from workloads.piip.vision_ops import nms

CFG = piip_config("piip-tiny", [32, 48, 64], num_classes=2, merge_dim=64)
DET = DetectionConfig(num_classes=3, anchor_sizes=(4, 8, 16, 32, 64), fpn_channels=32)


def reference_nms(boxes, scores, thr):
    """NMS by its definition, one box at a time."""
    keep = []
    for i in sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i)):
        if all(_iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def _iou(a, b):
    lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    inter = (rb - lt).clamp(min=0).prod()
    area = lambda x: (x[2] - x[0]).clamp(min=0) * (x[3] - x[1]).clamp(min=0)  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


@pytest.mark.parametrize("seed", range(5))
def test_nms_is_greedy_suppression_by_iou(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], 1)
    scores = torch.rand(60, generator=g)
    scores[7] = scores[3]  # a tie: the lower index first, as a stable sort gives
    for thr in (0.0, 0.3, 0.7):
        assert nms(boxes, scores, thr).tolist() == reference_nms(boxes, scores, thr)
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def batch(n=3, seed=0):
    """Images of different shapes with one or two objects each (boxes, labels, masks)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        h, w = 64 - 8 * i, 48 + 8 * i
        im = torch.rand(3, h, w, generator=g) * 0.2
        boxes, masks = [], []
        for j in range(1 + i % 2):
            x0, y0 = 4 + 20 * j, 6 + 10 * j
            x1, y1 = x0 + 14 + 4 * i, y0 + 12
            im[:, y0:y1, x0:x1] = 0.9
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[y0:y1, x0:x1] = 1
            boxes.append([x0, y0, x1, y1])
            masks.append(m)
        images.append(im)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1 + i % 3] * len(boxes)),
                        "masks": torch.stack(masks)})
    return images, targets


def single(state):
    model = PIIPDetector(CFG, DET)
    model.load_state_dict(state)
    model.train()
    images, targets = batch()
    torch.manual_seed(0)
    terms = model(images, targets)
    sum(terms.values()).backward()
    return terms, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_one_process_trains_and_detects_in_original_coordinates():
    torch.manual_seed(0)
    model = PIIPDetector(CFG, DET)
    terms, grads = single(model.state_dict())
    assert set(terms) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    # every branch's ViT and every interaction unit learn from the detector's loss
    for k in range(3):
        assert any(n.startswith(f"piip.branches.{k}.") for n in grads)
    assert any(n.startswith("piip.units.") for n in grads) and any(n.startswith("roi_heads.mask_head") for n in grads)
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        out = model(images)
    for im, o in zip(images, out):
        assert o["masks"].shape[-2:] == im.shape[-2:] and o["boxes"].shape[1] == 4
        assert (o["boxes"][:, 2] <= im.shape[-1]).all() and (o["boxes"][:, 3] <= im.shape[-2]).all()


@pytest.mark.parametrize("ranks", [(1, 1, 1), (1, 2, 1)])
def test_branches_on_their_groups_match_one_process(gloo_world, ranks):
    torch.manual_seed(0)
    state = PIIPDetector(CFG, DET).state_dict()
    want_terms, want_grads = single(state)
    images, targets = batch()
    got = gloo_world(sum(ranks)).run(piip_cases.detection_step, CFG, DET, state, images, targets, ranks)
    (head,) = [g for g in got if g[0] == 0]  # branch 0 holds the whole batch: the heads see what one process sees
    for name, v in want_terms.items():
        # float32; the branches' features cross process boundaries unchanged, the
        # heads run the same operations in the same order: only the ViT's batched
        # matmuls over other batch splits differ in the last bits.
        assert head[2][name] == pytest.approx(v.item(), rel=1e-4, abs=1e-5), name
    assert got[0][1] == pytest.approx(sum(want_terms.values()).item(), rel=1e-4)
    seen = set()
    for _, _, _, grads in got:
        for name, g in grads.items():
            # same reasoning; gradients of the branch split over two ranks are sums of two
            # halves. Elements near zero are sums that cancel: their float32 rounding
            # shows at ~1e-5 absolute (gradients here are up to ~1e-1).
            torch.testing.assert_close(g, want_grads[name], rtol=1e-3, atol=5e-5)
            seen.add(name)
    assert seen == set(want_grads)  # every parameter with a gradient is owned by some group and checked
