"""InternVL2's dynamic tiling of an image (decoding, bounded, is `workloads.images`)."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _closest_grid(width: int, height: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to the image's (InternVL2 rule).

    Among equally close grids the larger one wins if the image has enough pixels to fill
    more than half of it.
    """
    aspect = width / height
    grids = sorted(
        {(c, r) for n in range(1, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1) if c * r <= max_tiles},
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def tiles_for(width: int, height: int, max_tiles: int, tile: int, thumbnail: bool) -> int:
    """How many tiles `tile_image` makes of an image of this size (thumbnail included)."""
    cols, rows = _closest_grid(width, height, max_tiles, tile)
    n = cols * rows
    return n + 1 if thumbnail and n > 1 else n


def _normalised(image, tile_h: int, tile_w: int) -> torch.Tensor:
    """(3, H, W) float32 ImageNet-normalised pixels of an RGB image of that size."""
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(tile_h, tile_w, 3).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def tile_image(image, *, tile: int, max_tiles: int, thumbnail: bool = True) -> torch.Tensor:
    """InternVL2 dynamic tiling: (N_tiles, 3, tile, tile) normalised float32 pixels.

    The image is resized to the closest grid of tiles and cut (row-major); with more than
    one tile a thumbnail of the whole image is appended. The grid is normalised at once
    and cut by a view: the values are those of normalising each tile alone.
    """
    from PIL import Image

    image = image.convert("RGB")
    cols, rows = _closest_grid(image.width, image.height, max_tiles, tile)
    resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    grid = _normalised(resized, rows * tile, cols * tile)  # (3, rows*tile, cols*tile)
    tiles = grid.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if thumbnail and rows * cols > 1:
        thumb = _normalised(image.resize((tile, tile), Image.BICUBIC), tile, tile)
        tiles = torch.cat([tiles, thumb[None]])
    return tiles
