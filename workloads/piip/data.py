"""PIIP data: image folders (local or S3 through fsspec) and a procedural dataset.

Layouts read by `ImageFolder`:
- classification: ROOT/<class name>/<image>.png|jpg  (classes sorted by name)
- segmentation:   ROOT/images/<name>.png and ROOT/masks/<name>.png (pixel = class id)

`write_shapes` draws a dataset that needs no download: each image holds one filled
shape (disc, square or triangle: the class) in a random colour, place and size on a
noisy background, with its mask (0 = background, 1 + class = the shape's pixels).
"""

from __future__ import annotations

import io
import posixpath
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("disc", "square", "triangle")
IMAGE_EXT = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    pass


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _to_tensor(data: bytes, name: str, mode: str = "RGB") -> torch.Tensor:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert(mode)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file: one DataError naming it
        raise DataError(f"image {name} cannot be read ({e})") from None
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(img.height, img.width, -1).permute(2, 0, 1)


@dataclass
class Example:
    name: str
    image: torch.Tensor  # (3, H, W) float in [-1, 1]
    label: int  # class index (classification) or -1
    mask: torch.Tensor | None  # (H, W) long class ids (segmentation) or None


class ImageFolder:
    def __init__(self, root: str, task: str):
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task {task!r} is not 'classification' or 'segmentation'")
        self.root, self.task = root.rstrip("/"), task
        self.fs, base = _fs(root)
        self.base = base.rstrip("/")
        files = sorted(p for p in self.fs.find(self.base) if p.lower().endswith(IMAGE_EXT))
        if task == "classification":
            rel = [posixpath.relpath(p, self.base) for p in files]
            self.classes = sorted({r.split("/")[0] for r in rel if "/" in r})
            self.items = [(p, self.classes.index(r.split("/")[0])) for p, r in zip(files, rel) if "/" in r]
        else:
            images = [p for p in files if posixpath.relpath(p, self.base).startswith("images/")]
            self.classes = []
            self.items = []
            for p in images:
                m = posixpath.join(self.base, "masks", posixpath.basename(p).rsplit(".", 1)[0] + ".png")
                if not self.fs.exists(m):
                    raise DataError(f"segmentation image {p} has no mask {m}")
                self.items.append((p, m))
        if not self.items:
            raise DataError(f"{root}: no images in the {task} layout")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        path, extra = self.items[i]
        img = _to_tensor(self.fs.cat_file(path), path).float() / 127.5 - 1.0
        if self.task == "classification":
            return Example(path, img, int(extra), None)
        mask = _to_tensor(self.fs.cat_file(extra), extra, mode="L")[0].long()
        if mask.shape != img.shape[1:]:
            raise DataError(f"mask {extra} is {tuple(mask.shape)}, its image {path} is {tuple(img.shape[1:])}")
        return Example(path, img, -1, mask)


def batch(examples: list[Example], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images resized to size x size (the pyramid's largest), labels, masks (nearest)."""
    imgs = torch.stack([F.interpolate(e.image[None], size=(size, size), mode="bilinear", antialias=True,
                                      align_corners=False)[0] for e in examples])
    labels = torch.tensor([e.label for e in examples])
    masks = None
    if examples and examples[0].mask is not None:
        masks = torch.stack([F.interpolate(e.mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
                             for e in examples])
    return imgs, labels, masks


def write_shapes(url: str, n: int, *, size: int = 64, seed: int = 0) -> dict[str, int]:
    """Writes both layouts under URL/classification and URL/segmentation; returns class counts."""
    from PIL import Image, ImageDraw

    fs, base = _fs(url)
    rng = random.Random(seed)
    counts = {s: 0 for s in SHAPES}
    for i in range(n):
        cls = rng.randrange(len(SHAPES))
        bg = tuple(rng.randrange(40, 90) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        mask = Image.new("L", (size, size), 0)
        r = rng.randrange(size // 6, size // 3)
        cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
        colour = tuple(rng.randrange(150, 256) for _ in range(3))
        box = [cx - r, cy - r, cx + r, cy + r]
        for draw, fill in ((ImageDraw.Draw(img), colour), (ImageDraw.Draw(mask), 1 + cls)):
            if SHAPES[cls] == "disc":
                draw.ellipse(box, fill=fill)
            elif SHAPES[cls] == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        counts[SHAPES[cls]] += 1
        name = f"{i:05d}.png"
        for path, pic in ((posixpath.join(base, "classification", SHAPES[cls], name), img),
                          (posixpath.join(base, "segmentation", "images", name), img),
                          (posixpath.join(base, "segmentation", "masks", name), mask)):
            buf = io.BytesIO()
            pic.save(buf, format="PNG")
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.pipe_file(path, buf.getvalue())
    return counts
