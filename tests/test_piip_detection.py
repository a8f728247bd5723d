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


def single(state, dtype=torch.float32):
    model = PIIPDetector(CFG, DET).to(dtype)
    model.load_state_dict(state)
    model.train()
    images, targets = batch()
    images = [im.to(dtype) for im in images]
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
    # float64: proposals are ranked and sampled by score, and float32 rounding that
    # differs between processes (other thread counts) could swap near-equal ones
    torch.manual_seed(0)
    state = {k: v.double() for k, v in PIIPDetector(CFG, DET).state_dict().items()}
    want_terms, want_grads = single(state, torch.float64)
    images, targets = batch()
    images = [im.double() for im in images]
    got = gloo_world(sum(ranks)).run(piip_cases.detection_step, CFG, DET, state, images, targets, ranks)
    (head,) = [g for g in got if g[0] == 0]  # branch 0 holds the whole batch: the heads see what one process sees
    for name, v in want_terms.items():
        # float64; the branches' features cross process boundaries unchanged, the
        # heads run the same operations in the same order: only reductions taken in
        # another order (other batch splits, thread counts) differ in the last bits.
        assert head[2][name] == pytest.approx(v.item(), rel=1e-9, abs=1e-12), name
    assert got[0][1] == pytest.approx(sum(want_terms.values()).item(), rel=1e-9)
    seen = set()
    for _, _, _, grads in got:
        for name, g in grads.items():
            # Same reasoning; gradients of the branch split over two ranks are sums of two
            # halves. Elements that nearly cancel are bounded relative to the tensor's
            # largest; 1e-12 is the floor for gradients that are all but zero (behind the
            # zero-initialised interaction gates).
            w = want_grads[name]
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-7 * float(w.abs().max()) + 1e-12)
            seen.add(name)
    assert seen == set(want_grads)  # every parameter with a gradient is owned by some group and checked


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [2, 0])  # the poolers' fixed grid; mask targets' adaptive one
def test_roi_align_is_torchvisions_to_float_rounding(aligned, sampling):
    """longview's RoI Align (grid_sample) against torchvision's own, forward and
    backward. torchvision's Python version clamps samples outside the map to its edge
    where its compiled kernel (and longview's) counts those more than a pixel out as 0:
    they are compared on RoIs inside the map, and the kernel's rule is checked apart."""
    from workloads.piip import vision_ops

    vision_ops.torchvision()
    roi_align = vision_ops.roi_align
    # torchvision's Python RoI Align where its compiled operators did not load, else its kernel
    reference = vision_ops.reference_roi_align or torch.ops.torchvision.roi_align
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 13, 17, generator=g, dtype=torch.float64, requires_grad=True)
    # the map covers 68 x 52 image pixels (scale 1/4); RoIs of 0 to 25 x 20 pixels inside it
    xy = torch.rand(30, 2, generator=g, dtype=torch.float64) * torch.tensor([40.0, 30.0], dtype=torch.float64)
    wh = torch.rand(30, 2, generator=g, dtype=torch.float64) * torch.tensor([25.0, 20.0], dtype=torch.float64)
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=g).double(), xy, xy + wh], 1)
    want = reference(feats, rois, 0.25, 7, 7, sampling, aligned)
    got = roi_align(feats, rois, 0.25, 7, 7, sampling, aligned)
    # float64: the two sum the same products in another order
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    gw = torch.autograd.grad(want.square().sum(), feats)[0]
    gg = torch.autograd.grad(got.square().sum(), feats)[0]
    torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)
    outside = torch.tensor([[0.0, -40, -40, -20, -20], [1.0, 100, 10, 120, 30]], dtype=torch.float64)
    assert roi_align(feats, outside, 0.25, 7, 7, sampling, aligned).abs().max() == 0  # every sample > 1 pixel out


def test_head_flops_match_pytorch_operator_counter():
    """`flops.detector_head_macs` counts the detector's parts beside the backbone as
    PyTorch's counter does (which counts a multiply-add as two), at the numbers of
    proposals and detections this image gave."""
    from torch.utils.flop_counter import FlopCounterMode

    from workloads.piip.flops import detector_head_macs

    torch.manual_seed(0)
    model = PIIPDetector(CFG, DET).eval()
    seen = {}
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.__setitem__("rois", o.shape[0]))
    model.roi_heads.mask_head.register_forward_hook(lambda m, i, o: seen.__setitem__("masks", o.shape[0]))
    with torch.no_grad():
        image_list, _, original = model.prepare([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))])
        feats, _ = model.piip.forward_features(model.pyramid(image_list.tensors))
        counter = FlopCounterMode(display=False)
        with counter:
            model.heads(feats, image_list, None, original)
    assert seen["rois"] > 0 and seen["masks"] > 0  # both heads ran: the count covers them
    counted = detector_head_macs(CFG, DET, rois=seen["rois"], masks=seen["masks"])
    assert counted["total"] == counter.get_total_flops() / 2
    # the default is the most the detector keeps: never below what ran
    assert detector_head_macs(CFG, DET)["total"] >= counted["total"]
