"""COCO-format data for PIIP detection: read with pycocotools under longview's reading
rules, and COCOeval's AP computed on what the detector predicts."""

import json

import numpy as np
import pytest
import torch

from workloads.data_errors import DataError
from workloads.piip.coco import CocoDataset, coco_ap, coco_evaluate, hflip, write_shapes_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(str(tmp_path_factory.mktemp("coco")), 6, size=64, seed=1)


def test_a_generated_dataset_reads_back_with_masks_boxes_and_labels(shapes):
    ds = CocoDataset(shapes)
    assert len(ds) == 6 and ds.category_ids == [1, 2, 3]
    s = ds[0]
    assert s.image.shape == (3, 64, 64) and 0 <= s.image.min() and s.image.max() <= 1
    t = s.target
    assert t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0] > 0
    for box, m in zip(t["boxes"], t["masks"]):  # each box is its mask's extent
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    f = hflip(s)
    assert torch.equal(f.image, s.image.flip(-1)) and torch.equal(f.target["masks"], t["masks"].flip(-1))
    assert torch.equal(f.target["boxes"][:, 0], 64 - t["boxes"][:, 2])


def test_ground_truth_as_predictions_scores_ap_one(shapes):
    """COCOeval on the dataset's own annotations as results: the conversion of boxes,
    masks and categories is right when AP is 1 (where a size has objects)."""
    from pycocotools import mask as mask_utils

    ds = CocoDataset(shapes, train=False)
    results = []
    for i in range(len(ds)):
        s = ds[i]
        for box, label, m in zip(s.target["boxes"], s.target["labels"], s.target["masks"]):
            rle = mask_utils.encode(np.asfortranarray(m.numpy()))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box.tolist()
            results.append({"image_id": s.image_id, "category_id": ds.category_ids[int(label) - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0, "segmentation": rle})
    ap = coco_ap(ds, results, ds.ids)
    assert ap["bbox_AP"] == pytest.approx(1.0) and ap["segm_AP"] == pytest.approx(1.0)
    assert coco_ap(ds, [], ds.ids)["bbox_AP"] == 0.0


def test_an_untrained_detector_is_evaluated_end_to_end(shapes):
    from workloads.piip.detection import DetectionConfig, PIIPDetector
    from workloads.piip.model import piip_config

    torch.manual_seed(0)
    model = PIIPDetector(piip_config("piip-tiny", [32, 48, 64], num_classes=2, merge_dim=64),
                         DetectionConfig(num_classes=3, anchor_sizes=(4, 8, 16, 32, 64), fpn_channels=32))
    ap = coco_evaluate(model, CocoDataset(shapes, train=False), range(3))
    assert set(ap) == {f"{k}_{n}" for k in ("bbox", "segm") for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert all(-1.0 <= v <= 1.0 for v in ap.values())


def _rle_counts(mask) -> str:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")


def _write(tmp_path, doc):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("change,message,kept", [
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 5]), r"annotation 1 \(image images/00000.png\): bbox "
                                                               r"\[1, 2, 0, 5\] is not \[x, y, w, h\]", 5),
    (lambda d: d["annotations"][0].update(category_id=9), r"annotation 1 .*category_id 9 is not among", 5),
    (lambda d: d["annotations"][0].update(segmentation="x"), r"annotation 1 .*segmentation is neither", 5),
    # an annotation of no image: dropped and counted, every image stays
    (lambda d: d["annotations"][0].update(image_id=77), r"annotation 1: image_id 77 is not among the images", 6),
    (lambda d: d.pop("categories"), r"'categories' must be a list", None),
    # masks pycocotools would refuse only when a worker decodes them ("Invalid RLE mask
    # representation", naming nothing): refused at load, naming file and annotation
    (lambda d: d["annotations"][0]["segmentation"].update(size=[32, 64]),
     r"instances.json: annotation 1 \(image images/00000.png\): RLE size \[32, 64\] is not its image's \[height, "
     r"width\] \[64, 64\]", 5),
    (lambda d: d["annotations"][0].update(segmentation={"size": [64, 64], "counts": [1, 2, 3]}),
     r"annotation 1 .*RLE counts are not run lengths adding up to 64 x 64 pixels", 5),
    (lambda d: d["annotations"][0]["segmentation"].update(counts=_rle_counts(np.eye(128, 64, dtype=np.uint8))),
     r"annotation 1 .*RLE counts do not decode to a 64 x 64 mask \(Invalid RLE mask representation\)", 5),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 30, 4, 5, 60, 7]]),
     r"annotation 1 .*a polygon must be x, y pairs, at least 3 of them \(numbers\); got 7 value\(s\)", 5),
    # two images under one id: whose annotations would they be? (skip: the second is left out)
    (lambda d: d["images"].append({**d["images"][0], "file_name": "images/dup.png"}),
     r"instances.json: image id 0 is given twice \(images/00000.png and images/dup.png\)", 6),
])
def test_bad_annotations_are_named_or_counted(shapes, tmp_path, change, message, kept):
    doc = json.loads(open(shapes).read())
    change(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=message):
        CocoDataset(path, image_root=shapes.rsplit("/", 1)[0])
    if kept is not None:  # with on_bad_sample: skip, the sample is left out and counted
        ds = CocoDataset(path, image_root=shapes.rsplit("/", 1)[0], on_bad_sample="skip")
        assert ds.report.total_skipped == 1 and len(ds) == kept


def test_images_outside_the_root_and_unreadable_ones_are_named(shapes, tmp_path):
    doc = json.loads(open(shapes).read())
    root = shapes.rsplit("/", 1)[0]
    doc["images"][0]["file_name"] = "../../etc/passwd"
    ds = CocoDataset(_write(tmp_path, doc), image_root=root)
    with pytest.raises(DataError, match=r"image 0 \(../../etc/passwd\): image ../../etc/passwd is outside"):
        ds[0]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    doc["images"][0]["file_name"] = "broken.png"
    ds = CocoDataset(_write(tmp_path, doc), image_root=str(tmp_path))
    with pytest.raises(DataError, match=r"image file .*broken.png cannot be read"):
        ds[0]


def test_a_missing_image_met_in_training_is_named_or_skipped_and_counted(shapes, tmp_path):
    doc = json.loads(open(shapes).read())
    root = shapes.rsplit("/", 1)[0]
    doc["images"][1]["file_name"] = "images/gone.png"
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=r"sample image 1 \(images/gone.png\): image file .*images/gone.png does not "
                                        r"exist"):
        CocoDataset(path, image_root=root).sample(1)
    ds = CocoDataset(path, image_root=root, on_bad_sample="skip")
    assert ds.sample(1).image_id == ds.ids[2] and ds.report.skipped == {"image": 1}  # the next one, counted
    assert ds.sample(0).image_id == ds.ids[0] and ds.report.total_skipped == 1
