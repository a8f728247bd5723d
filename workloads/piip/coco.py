"""COCO-format instance data for PIIP detection: read with pycocotools, scored with COCOeval.

A dataset is an instances JSON (`images`, `annotations`, `categories`, as COCO releases
them) and the folder its `file_name`s are relative to (local or s3://). Reading follows
the rules of longview's other readers (`workloads.files`, `workloads.images`): image
references stay inside that folder (or a root `allowed_roots` names), files are read with
bounds on bytes and decoded pixels, and a bad sample (unreadable image, an annotation
with a bad box, category or segmentation) is one DataError naming the image and the
annotation, or, with on_bad_sample "skip", counted by reason and left out.

Training samples: crowd annotations are left out of the targets and images without any
other annotation are skipped (as torchvision's detection references do); masks come from
pycocotools (`annToMask`: polygons and RLE); category ids map to contiguous labels 1..K
in id order. `coco_evaluate` runs the detector over a set and returns COCOeval's box and
mask AP (AP, AP50, AP75, small, medium, large), the predictions converted back to the
dataset's category ids and image sizes (masks as RLE).

`write_shapes_coco` makes a dataset that needs no download: shapes of many sizes on a
noisy background, the smallest only a few pixels wide, so that a detector seeing the
image at low resolution alone misses them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import posixpath
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..data_errors import DataError, LoadReport, printable
from ..files import FileCache, resolve_image
from ..images import MAX_IMAGE_PIXELS, open_image

log = logging.getLogger(__name__)

SHAPES = ("disc", "square", "triangle")
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        coco.createIndex()
    return coco


@dataclass
class Sample:
    image_id: int
    name: str
    image: torch.Tensor  # (3, H, W) float in [0, 1]
    target: dict  # boxes (N, 4) x1 y1 x2 y2, labels (N,) 1..K, masks (N, H, W) uint8


class CocoDataset:
    def __init__(self, annotations: str, image_root: str | None = None, *, train: bool = True,
                 allowed_roots: tuple[str, ...] = (), on_bad_sample: str = "fail", max_image_bytes: int = 64 << 20,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_json_bytes: int = 2 << 30):
        import fsspec

        self.annotations = annotations
        self.root = (image_root or posixpath.dirname(annotations)).rstrip("/")
        self.train, self.allowed, self.skip = train, tuple(allowed_roots), on_bad_sample == "skip"
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        fs, path = fsspec.core.url_to_fs(annotations)
        if not fs.isfile(path):
            raise DataError(f"{annotations}: no such annotations file (a COCO instances JSON)", "missing_file")
        if fs.size(path) > max_json_bytes:
            raise DataError(f"{annotations}: more than {max_json_bytes} bytes", "too_large")
        try:
            data = json.loads(fs.cat_file(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{annotations}: not JSON ({e})", "record") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise DataError(f"{annotations}: '{key}' must be a list (COCO's instances layout)", "layout")
        self.report = LoadReport(annotations)
        cats = sorted({c.get("id") for c in data["categories"] if isinstance(c, dict)}, key=str)
        if not cats or not all(isinstance(c, int) for c in cats):
            raise DataError(f"{annotations}: categories need integer ids", "layout")
        self.category_ids = cats  # label k (1..K) is category_ids[k - 1]
        self.label_of = {c: i + 1 for i, c in enumerate(cats)}
        self.names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
        images = {}
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
                raise DataError(f"{annotations}: an image entry needs an integer 'id' and a 'file_name': "
                                f"{printable(im, 100)}", "record")
            if im["id"] in images:  # which one would its annotations belong to? (skip: the first)
                first = printable(images[im["id"]]["file_name"])
                e = DataError(f"{annotations}: image id {im['id']} is given twice ({first} and "
                              f"{printable(im['file_name'])})", "duplicate_id")
                if not self.skip:
                    raise e
                self.report.skip(e)
                continue
            images[im["id"]] = im
        by_image: dict[int, list] = {i: [] for i in images}
        bad: set[int] = set()
        for a in data["annotations"]:
            try:
                by_image[self._check(a, images)].append(a)
            except DataError as e:
                if not self.skip:
                    raise
                self.report.skip(e)
                bad.add(a.get("image_id") if isinstance(a, dict) else None)
        self.coco = _coco({**data, "annotations": [a for im in by_image.values() for a in im]})
        self.ids = [i for i in sorted(images) if i not in bad
                    and (not train or any(not a.get("iscrowd", 0) for a in by_image[i]))]
        self.images, self.by_image, self.files = images, by_image, FileCache()
        self.report.loaded = len(self.ids)
        if not self.ids:
            raise DataError(f"{annotations}: no usable image ({self.report.summary()})", "empty")

    def _check(self, a, images) -> int:
        """The image id of a sound annotation; a DataError naming what is wrong."""
        if not isinstance(a, dict):
            raise DataError(f"{self.annotations}: an annotation must be an object: {printable(a, 80)}", "record")
        where = f"{self.annotations}: annotation {printable(a.get('id', '?'), 20)}"
        if a.get("image_id") not in images:
            raise DataError(f"{where}: image_id {printable(a.get('image_id'), 20)} is not among the images", "record")
        im = images[a["image_id"]]
        box = a.get("bbox")
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0):
            raise DataError(f"{where} (image {im['file_name']}): bbox {printable(box, 60)} is not [x, y, w, h] with "
                            "w, h > 0", "bad_box")
        if a.get("category_id") not in self.label_of:
            raise DataError(f"{where} (image {im['file_name']}): category_id {printable(a.get('category_id'), 20)} "
                            "is not among the categories", "bad_category")
        seg = a.get("segmentation")
        where = f"{where} (image {printable(im['file_name'])})"
        if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            for p in seg:
                if len(p) < 6 or len(p) % 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
                    raise DataError(f"{where}: a polygon must be x, y pairs, at least 3 of them (numbers); got "
                                    f"{len(p)} value(s): {printable(p, 60)}", "bad_mask")
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            _check_rle(seg, im, where)
        else:
            raise DataError(f"{where}: segmentation is neither polygons nor RLE", "bad_mask")
        return a["image_id"]

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, i: int) -> Sample:
        """self[i]; with on_bad_sample "skip", a sample that cannot be read when it is met
        (its image file missing or broken) is counted in `report` and the next readable
        one taken in its place, so every rank that meets it takes the same one."""
        n = len(self.ids)
        for k in range(n):
            try:
                return self[(i + k) % n]
            except DataError as e:
                if not self.skip:
                    raise
                self.report.skip(e)
                log.warning("skipped (data.on_bad_sample: skip): %s; %d sample(s) skipped in all", e,
                            self.report.total_skipped)
        raise DataError(f"{self.annotations}: no sample can be read ({self.report.summary()})", "empty")

    def __getitem__(self, i: int) -> Sample:
        image_id = self.ids[i]
        im = self.images[image_id]
        name = f"image {image_id} ({printable(im['file_name'], 120)})"
        path = resolve_image(im["file_name"], self.root, sample=name, allowed=self.allowed)
        pic = open_image(path, sample=name, data=self.files.fetch([path], max_bytes=self.max_image_bytes).get(path),
                         max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels).convert("RGB")
        w, h = pic.size
        image = torch.from_numpy(np.asarray(pic, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        anns = [a for a in self.by_image[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([_mask(self.coco, a, name) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        if masks.shape[1:] != (h, w):
            raise DataError(f"{name}: its masks are {masks.shape[1:]}, the image is {(h, w)} (height, width)",
                            "bad_mask")
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "masks": torch.from_numpy(masks)}
        return Sample(image_id=image_id, name=name, image=image, target=target)


def _check_rle(seg: dict, im: dict, where: str) -> None:
    """An RLE mask (COCO's `{"size": [h, w], "counts": ...}`) that pycocotools can decode
    and that covers its image: DataError otherwise, naming the annotation (pycocotools
    itself says only "Invalid RLE mask representation", when a worker meets it)."""
    from pycocotools import mask as mask_utils

    size, counts = seg["size"], seg["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise DataError(f"{where}: RLE size {printable(size, 40)} is not [height, width]", "bad_mask")
    h, w = im.get("height"), im.get("width")
    if isinstance(h, int) and isinstance(w, int) and size != [h, w]:
        raise DataError(f"{where}: RLE size {size} is not its image's [height, width] [{h}, {w}]", "bad_mask")
    if isinstance(counts, list):  # uncompressed: run lengths that add up to the mask's pixels
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != size[0] * size[1]:
            raise DataError(f"{where}: RLE counts are not run lengths adding up to {size[0]} x {size[1]} pixels",
                            "bad_mask")
    elif isinstance(counts, str):
        try:
            mask_utils.decode({"size": size, "counts": counts.encode("ascii")})
        except (ValueError, UnicodeEncodeError) as e:
            raise DataError(f"{where}: RLE counts do not decode to a {size[0]} x {size[1]} mask ({e})",
                            "bad_mask") from None
    else:
        raise DataError(f"{where}: RLE counts must be a string or a list of run lengths", "bad_mask")


def _mask(coco, a: dict, name: str) -> np.ndarray:
    try:
        return coco.annToMask(a)
    except ValueError as e:  # pycocotools' own words name neither the file nor the annotation
        raise DataError(f"{name}: annotation {printable(a.get('id', '?'), 20)}: its mask cannot be decoded ({e})",
                        "bad_mask") from None


def hflip(sample: Sample) -> Sample:
    """The sample mirrored left to right, boxes and masks with it."""
    w = sample.image.shape[-1]
    boxes = sample.target["boxes"].clone()
    boxes[:, [0, 2]] = w - sample.target["boxes"][:, [2, 0]]
    target = {**sample.target, "boxes": boxes, "masks": sample.target["masks"].flip(-1)}
    return Sample(sample.image_id, sample.name, sample.image.flip(-1), target)


@torch.no_grad()
def predictions(model, dataset: CocoDataset, indices, batch: int = 4) -> list[dict]:
    """The detector's output on dataset[indices] as COCO results (boxes xywh, RLE masks)."""
    from pycocotools import mask as mask_utils

    model.eval()
    out = []
    indices = list(indices)
    for s in range(0, len(indices), batch):
        samples = [dataset[i] for i in indices[s:s + batch]]
        for smp, det in zip(samples, model([x.image for x in samples])):
            for box, score, label, m in zip(det["boxes"], det["scores"], det["labels"], det["masks"]):
                x1, y1, x2, y2 = box.tolist()
                rle = mask_utils.encode(np.asfortranarray((m[0] > 0.5).numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                out.append({"image_id": smp.image_id, "category_id": dataset.category_ids[int(label) - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score), "segmentation": rle})
    return out


def coco_ap(dataset: CocoDataset, results: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval's box and mask AP of `results` on `image_ids`: {"bbox_AP": ..., "segm_APs": ...}."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for kind in ("bbox", "segm"):
        if not results:
            out.update({f"{kind}_{n}": 0.0 for n in AP_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = dataset.coco.loadRes([dict(r) for r in results])
            ev = COCOeval(dataset.coco, dt, kind)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 means "no ground truth of that size": reported as such, not as 0
        out.update({f"{kind}_{n}": float(v) for n, v in zip(AP_NAMES, ev.stats[:6])})
    return out


def coco_evaluate(model, dataset: CocoDataset, indices=None, batch: int = 4) -> dict[str, float]:
    indices = range(len(dataset)) if indices is None else indices
    results = predictions(model, dataset, indices, batch)
    return coco_ap(dataset, results, [dataset.ids[i] for i in indices])


# --- a generated dataset -----------------------------------------------------------------------------


def write_shapes_coco(url: str, n: int, *, size: int = 128, seed: int = 0, min_side: int = 3,
                      max_side: int | None = None, objects: tuple[int, int] = (2, 6)) -> str:
    """Writes URL/images/*.png and URL/instances.json (COCO layout); returns the JSON's URL.

    Each image holds 2 to 6 shapes (disc, square, triangle: the category) of sides drawn
    log-uniformly between `min_side` and `max_side` pixels (default: size / 3), in random
    colours on a noisy background. Masks are stored as RLE, boxes as the masks' extents."""
    import fsspec
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    fs, base = fsspec.core.url_to_fs(url)
    rng = random.Random(seed)
    max_side = max_side or size // 3
    images, annotations = [], []
    for i in range(n):
        noise = np.random.default_rng(seed * 100_003 + i).integers(30, 90, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(*objects)):
            cls = rng.randrange(len(SHAPES))
            side = round(math.exp(rng.uniform(math.log(min_side), math.log(max_side))))
            x0, y0 = rng.randrange(0, size - side), rng.randrange(0, size - side)
            mask_img = Image.new("L", (size, size), 0)
            colour = tuple(rng.randrange(150, 256) for _ in range(3))
            box = [x0, y0, x0 + side - 1, y0 + side - 1]
            for d, fill in ((draw, colour), (ImageDraw.Draw(mask_img), 1)):
                if SHAPES[cls] == "disc":
                    d.ellipse(box, fill=fill)
                elif SHAPES[cls] == "square":
                    d.rectangle(box, fill=fill)
                else:
                    d.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
            m = np.asarray(mask_img, dtype=np.uint8)
            # later shapes may cover earlier ones: earlier masks lose what is drawn over
            for a in annotations[len(annotations) - sum(1 for x in annotations if x["image_id"] == i):]:
                a["_mask"][m > 0] = 0
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cls + 1, "iscrowd": 0,
                                "_mask": m.copy()})
        name = f"images/{i:05d}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        fs.makedirs(posixpath.join(base, "images"), exist_ok=True)
        fs.pipe_file(posixpath.join(base, name), buf.getvalue())
        images.append({"id": i, "file_name": name, "width": size, "height": size})
    kept = []
    for a in annotations:
        m = a.pop("_mask")
        ys, xs = np.nonzero(m)
        if len(xs) < 4:  # covered (almost) whole by later shapes
            continue
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        kept.append({**a, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()), "segmentation": rle})
    doc = {"images": images, "annotations": kept,
           "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}
    path = posixpath.join(base, "instances.json")
    fs.pipe_file(path, json.dumps(doc).encode())
    return url.rstrip("/") + "/instances.json"
