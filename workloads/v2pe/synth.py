"""Long interleaved image-text samples with a needle task, made from nothing.

In the spirit of V2PE's Long-VQA / Long-MR data: a document of numbered images, each
framed by filler text, then one question about the images:

- "marked":  exactly one image carries a marker; which one?      -> "Image k"
- "count":   several images carry a marker; how many?             -> "n"
- "colour":  what is the background colour of image k?            -> colour name
- "needle":  exactly one image carries a marker; what colour is it?  -> colour name.
  Images carry no numbers, so the answer never depends on how many there are: the
  task of the length-generalisation experiment, where longer samples hold more images.

Images are square tiles (one tile each under dynamic tiling) drawn procedurally: a
solid colour from a fixed palette with noise, and for a marked image a black square in
its centre. The filler text is sized so that the encoded sample has exactly the
requested number of tokens under the byte tokenizer (at most that many, within a token
or two, under a checkpoint's subword tokenizer; `tokens` records the count); `answer`
in every record is the key the images support.
Written as JSONL + PNG files to any fsspec URL (local folder, s3://...).
"""

from __future__ import annotations

import io
import json
import posixpath
import random
from dataclasses import dataclass

from ..data_errors import DataError
from ..files import concurrency
from .chat import render_tokens
from .tokenizer import ByteTokenizer, Tokenizer

PALETTE = {
    "red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
    "purple": (130, 50, 160), "orange": (230, 130, 30), "teal": (30, 150, 150), "grey": (128, 128, 128),
}
TASKS = ("marked", "count", "colour", "needle")
_WORDS = (
    "the river bends past quiet hills where old stone walls divide the fields and a narrow road climbs toward "
    "a village of slate roofs under a pale morning sky while distant bells mark the hour"
).split()


@dataclass(kw_only=True, frozen=True)
class SynthConfig:
    tokens: int  # length of each encoded sample (exact under the byte tokenizer, else at most)
    images: int  # images per sample (the most, with min_images)
    # Each sample draws its image count from min_images..images (None: exactly `images`);
    # the filler text makes up the rest of the tokens. Mixed counts let a small model
    # learn to read one image before it learns to find one among many.
    min_images: int | None = None
    task: str = "marked"
    tile: int = 448
    tokens_per_tile: int = 256
    seed: int = 0
    # Images drawn from a pool of this many per (colour, marker) and shared by the samples
    # (None: every image its own). Each sample still draws its colours and marker; a set
    # then writes, and a reader fetches, at most 16 x image_pool files, however many
    # pictures its samples show.
    image_pool: int | None = None
    # A short system turn in place of the chat template's default message, which under the
    # byte tokenizer costs ~200 tokens (UTF-8 Chinese) the task never reads.
    system: str = "Answer questions about the images."

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {TASKS}")
        if self.images < 1:
            raise ValueError(f"images must be >= 1, got {self.images}")
        if self.min_images is not None and not 1 <= self.min_images <= self.images:
            raise ValueError(f"min_images must be within 1..images={self.images}, got {self.min_images}")
        if self.image_pool is not None and self.image_pool < 1:
            raise ValueError(f"image_pool must be >= 1, got {self.image_pool}")


def draw_image(colour: str, marked: bool, tile: int, rng: random.Random):
    import torch
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    # Noise per pixel: a 14-pixel patch averages ~200 draws, so colour reads cleanly. Noise
    # in 2- or 8-pixel blocks compresses the PNG 5-40x, but made the needle task harder for
    # the tiny model (600 steps in one process: 0.82-1.00 and 0.55-0.78 against 1.00).
    noise = torch.randint(-12, 13, (tile, tile, 3), generator=gen, dtype=torch.int16)
    noise = noise.add_(torch.tensor(PALETTE[colour], dtype=torch.int16)).clamp_(0, 255)
    img = Image.frombytes("RGB", (tile, tile), noise.to(torch.uint8).numpy().tobytes())
    if marked:
        s = tile // 4
        ImageDraw.Draw(img).rectangle([tile // 2 - s // 2, tile // 2 - s // 2, tile // 2 + s // 2, tile // 2 + s // 2],
                                      fill=(0, 0, 0))
    return img


def _filler(n: int, rng: random.Random) -> str:
    """Exactly n ASCII characters (= n tokens under the byte tokenizer) of plain words."""
    out, size = [], 0
    while size < n:
        w = rng.choice(_WORDS) + " "
        out.append(w)
        size += len(w)
    return "".join(out)[:n]


def _question(task: str, colours: list[str], marked: list[bool], k: int) -> tuple[str, str]:
    if task == "marked":
        return "Which image carries a black square? Answer with its number.", f"Image {marked.index(True) + 1}"
    if task == "count":
        return "How many images carry a black square? Answer with a number.", str(sum(marked))
    if task == "needle":
        return "What colour is the image with the black square? Answer with one word.", colours[marked.index(True)]
    return f"What is the background colour of image {k + 1}? Answer with one word.", colours[k]


def make_sample(cfg: SynthConfig, index: int, tokenizer: Tokenizer) -> tuple[dict, list]:
    """One record (with `answer` and `tokens`) and its PIL images, deterministic in (seed, index)."""
    rng = random.Random(cfg.seed * 1_000_003 + index)
    n = cfg.images if cfg.min_images is None else rng.randint(cfg.min_images, cfg.images)
    colours = [rng.choice(list(PALETTE)) for _ in range(n)]
    if cfg.task in ("marked", "needle"):
        marked = [False] * n
        marked[rng.randrange(n)] = True
    elif cfg.task == "count":
        marked = [rng.random() < 0.4 for _ in range(n)]
    else:
        marked = [False] * n
    k = rng.randrange(n)
    question, answer = _question(cfg.task, colours, marked, k)

    def conversation(fillers: list[str]) -> list[tuple[str, str]]:
        # Starts and ends with words: the chat template strips each turn, and the filler
        # must count in full.
        label = (lambda i: "") if cfg.task == "needle" else (lambda i: f"\nImage {i + 1}: ")
        parts = ["Read on.\n"] + [f"{fillers[i]}{label(i)}<image>\n" for i in range(n)]
        parts.append(fillers[n] + "\n" + question)
        return [("system", cfg.system), ("user", "".join(parts)), ("assistant", answer)]

    def render(total: int) -> tuple[list[tuple[str, str]], int]:
        # The filler spread over the n+1 gaps (the same draws for every total tried).
        sizes = [total // (n + 1) + (1 if i < total % (n + 1) else 0) for i in range(n + 1)]
        r = random.Random(cfg.seed * 7_919 + index)
        convs = conversation([_filler(k, r) for k in sizes])
        ids, _ = render_tokens(convs, [1] * n, tokenizer=tokenizer, tokens_per_tile=cfg.tokens_per_tile)
        return convs, len(ids)

    _, base = render(0)
    if base > cfg.tokens:
        raise DataError(
            f"synthetic sample {index}: {n} images and the question need {base} tokens, "
            f"more than the requested {cfg.tokens}"
        )
    if isinstance(tokenizer, ByteTokenizer):
        convs, length = render(cfg.tokens - base)  # one byte, one token: exact
    else:
        # Subword tokens: the most filler characters whose sample still fits, by bisection
        # (tokens grow with characters, a merge aside), so the sample ends within a token
        # or two of the requested length.
        lo, hi = 0, max(1, cfg.tokens - base)  # at least 1: doubling 0 would never end
        while render(hi)[1] <= cfg.tokens:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if render(mid)[1] <= cfg.tokens else (lo, mid)
        convs, length = render(lo)
    assert length <= cfg.tokens, (length, cfg.tokens)  # construction invariant, not input checking
    if cfg.image_pool is None:
        names = [f"images/{cfg.task}-{cfg.tokens}-{index}-{i}.png" for i in range(n)]
        images = [draw_image(c, m, cfg.tile, rng) for c, m in zip(colours, marked)]
    else:
        picks = [rng.randrange(cfg.image_pool) for _ in range(n)]
        names = [_pool_name(c, m, j) for c, m, j in zip(colours, marked, picks)]
        images = [_pool_image(cfg, c, m, j) for c, m, j in zip(colours, marked, picks)]
    record = {
        "id": f"{cfg.task}-{cfg.tokens}-{index}",
        "image": names,
        "conversations": [{"from": "system", "value": cfg.system}, {"from": "human", "value": convs[1][1]},
                          {"from": "gpt", "value": answer}],
        "answer": answer,
        "tokens": length,
        "task": cfg.task,
        "marked": marked,
        "colours": colours,
    }
    return record, images


def _pool_name(colour: str, marked: bool, j: int) -> str:
    return f"images/pool-{colour}-{'marked' if marked else 'plain'}-{j}.png"


def _pool_image(cfg: SynthConfig, colour: str, marked: bool, j: int):
    # Its own draws, from the set's seed: the same picture wherever a sample picks it.
    return draw_image(colour, marked, cfg.tile, random.Random(f"{cfg.seed}-{colour}-{marked}-{j}"))


def write_dataset(url: str, cfg: SynthConfig, samples: int, tokenizer: Tokenizer | None = None) -> str:
    """Writes `samples` records to URL/data.jsonl and their images under URL/images/."""
    import fsspec
    import torch

    tokenizer = tokenizer or ByteTokenizer()
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.join(root, "images"), exist_ok=True)
    lines, pending, written = [], {}, set()
    # One thread: on a tensor of one tile, torch's thread pool costs more than it saves
    # (25 ms an image instead of 1.5 on a busy 2-core machine; 50,000 images make the
    # experiment's evaluation set).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(samples):
            record, images = make_sample(cfg, i, tokenizer)
            for name, img in zip(record["image"], images):
                if name in written:  # a pool image another sample has written
                    continue
                written.add(name)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                pending[posixpath.join(root, name)] = buf.getvalue()
            lines.append(json.dumps(record))
            if len(pending) >= 256 or i == samples - 1:
                fs.pipe(pending, **concurrency(fs))  # concurrent uploads on S3, not a request after another
                pending = {}
    finally:
        torch.set_num_threads(threads)
    jsonl = posixpath.join(root, "data.jsonl")
    fs.pipe_file(jsonl, ("\n".join(lines) + "\n").encode())
    return url.rstrip("/") + "/data.jsonl"
