"""V2PE data: InternVL chat JSONL, dynamic tiling, packing and context-parallel sharding.

Input format (InternVL / V2PE fine-tuning data), one JSON object per line:

    {"id": "...", "image": ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nWhich ...?"},
                       {"from": "gpt", "value": "Image 2"}]}

Image paths are relative to the JSONL file's folder, or to `image_root` (local or s3://,
through fsspec). A dataset is contained: its image references resolve inside that root
(or a root `allowed_roots` names), only regular files are read, lines, files and decoded
pixels are bounded (`DataConfig.max_*`), and every per-sample failure is a DataError that
names the file and line (text from the data printed escaped, `printable`). Chats are
rendered in the authors' `internlm2-chat` template (`render_tokens`); each `<image>`
placeholder becomes `<img>` + tokens_per_tile x tiles context tokens + `</img>`. Loss is
taken on the answers only. Nothing is truncated: a sample longer than the configured
maximum is an error that names it. This module encodes samples and reads files whole
(evaluation, tests); training streams them (`stream.py`). The parts: `files.py`
(containment, bounded concurrent reads, bounded JSONL lines), `images.py` (decoding,
tiling), `chat.py` (the template), `packing.py` (rows, positions, zigzag shards),
`data_errors.py`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parallelism.zigzag import IGNORE_INDEX

from ..data_errors import DataError, LoadReport, printable
from ..files import MAX_IMAGE_BYTES, MAX_LINE_BYTES, FileCache, fetch_files, read_jsonl, resolve_image
from ..images import MAX_IMAGE_PIXELS, open_image
from .chat import IMAGE_PLACEHOLDER, parse_turns, render_prompt, render_tokens
from .images import tile_image
from .tokenizer import Tokenizer


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    max_tokens: int = 8192  # longest sample accepted (and the packing budget)
    max_tiles: int = 6  # InternVL2 dynamic tiling: tiles per image, thumbnail excluded
    tile: int = 448
    tokens_per_tile: int = 256
    thumbnail: bool = True
    # V2PE position mode: "v2pe_rnd" for training (δ drawn per image), "v2pe_fix" with
    # a stride (δ = stride/256) for evaluation, "default" for plain RoPE positions.
    position_mode: str = "v2pe_rnd"
    position_stride: int | None = None
    on_bad_sample: str = "fail"  # "fail": the first bad sample stops loading; "skip": counted and left out
    # The folder relative image paths start from (the `root` of the authors' dataset
    # meta files); None: the JSONL's own folder.
    image_root: str | None = None
    # Other places image references may lead to (absolute paths, URLs); by default only
    # inside the dataset's root.
    allowed_roots: tuple[str, ...] = ()
    # Bounds a real dataset never meets; beyond them a sample is a DataError, not a
    # worker that runs out of memory.
    max_line_bytes: int = MAX_LINE_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def image_base(self, jsonl: str) -> str:
        return self.image_root or posixpath.dirname(jsonl)
    # Modes and strides are checked where positions are computed (positions.v2pe_positions).


@dataclass
class EncodedSample:
    sample_id: str
    input_ids: torch.Tensor  # (S,) long
    targets: torch.Tensor  # (S,) long: the next token where it is supervised, else IGNORE_INDEX
    pixels: torch.Tensor  # (N_tiles, 3, tile, tile)

    def __len__(self) -> int:
        return self.input_ids.numel()


def prepare_record(record, sample: str, base_dir: str = "", allowed: Sequence[str] = ()
                   ) -> tuple[list[tuple[str, str]], list[str]]:
    """A JSONL record checked: its (role, text) turns and its image paths (resolved
    against `base_dir`, and inside it or `allowed`), one per `<image>` placeholder."""
    if not isinstance(record, dict):
        raise DataError(f"sample {sample}: a record must be a JSON object, got {type(record).__name__}", "record")
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"sample {sample}: 'image' must be a path or a list of paths", "record")
    convs = parse_turns(record.get("conversations", []), sample)
    n_placeholders = sum(v.count(IMAGE_PLACEHOLDER) for _, v in convs)
    if n_placeholders != len(images):
        raise DataError(f"sample {sample}: {len(images)} image(s) but {n_placeholders} '<image>' placeholder(s)",
                        "placeholders")
    paths = [resolve_image(name, base_dir, sample=sample, allowed=allowed) for name in images]
    return convs, paths


def encode_tokens(convs, tiles_per_image: Sequence[int], *, tokenizer: Tokenizer, cfg: DataConfig,
                  sample: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets) of a chat: rendered, checked against max_tokens, targets shifted."""
    ids, supervised = render_tokens(convs, tiles_per_image, tokenizer=tokenizer, tokens_per_tile=cfg.tokens_per_tile,
                                    sample=sample)
    _check_length(len(ids), cfg, sample)
    input_ids = torch.tensor(ids, dtype=torch.long)
    sup = torch.tensor(supervised, dtype=torch.bool)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    # target[t] is token t+1 when token t+1 is supervised: shifted here, before any sharding.
    targets[:-1] = torch.where(sup[1:], input_ids[1:], torch.full_like(input_ids[1:], IGNORE_INDEX))
    return input_ids, targets


def encode_sample(
    record: dict,
    *,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    base_dir: str = "",
    sample: str | None = None,
    files: FileCache | None = None,
) -> EncodedSample:
    """One JSONL record -> token ids, shifted targets and image tiles (the images read
    through `files` when given, so samples that share images read each once)."""
    sample, convs, tiles = _read_record(record, cfg=cfg, base_dir=base_dir, sample=sample, files=files)
    input_ids, targets = encode_tokens(convs, [t.shape[0] for t in tiles], tokenizer=tokenizer, cfg=cfg, sample=sample)
    return EncodedSample(sample_id=sample, input_ids=input_ids, targets=targets, pixels=_pixels(tiles, cfg))


def encode_prompt(
    record: dict,
    *,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    base_dir: str = "",
    sample: str | None = None,
    files: FileCache | None = None,
) -> EncodedSample:
    """A record whose conversation ends with the user's turn -> the prompt an answer is
    generated for (ids end with `<|im_start|>assistant\\n`; no targets)."""
    sample, convs, tiles = _read_record(record, cfg=cfg, base_dir=base_dir, sample=sample, files=files)
    ids = render_prompt(convs, [t.shape[0] for t in tiles], tokenizer=tokenizer, tokens_per_tile=cfg.tokens_per_tile,
                        sample=sample)
    _check_length(len(ids), cfg, sample)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return EncodedSample(sample_id=sample, input_ids=input_ids, targets=torch.full_like(input_ids, IGNORE_INDEX),
                         pixels=_pixels(tiles, cfg))


def _read_record(record, *, cfg: DataConfig, base_dir: str, sample: str | None, files: FileCache | None):
    """(sample name, checked turns, each image's tiles) of a record."""
    sample = sample or sample_name(record)
    convs, paths = prepare_record(record, sample, base_dir, cfg.allowed_roots)
    return sample, convs, _read_tiles(paths, sample=sample, cfg=cfg, files=files)


def _check_length(n: int, cfg: DataConfig, sample: str) -> None:
    if n > cfg.max_tokens:
        raise DataError(f"sample {sample}: {n} tokens exceed max_tokens={cfg.max_tokens} (nothing is truncated)",
                        "too_long")


def _read_tiles(paths: Sequence[str], *, sample: str, cfg: DataConfig, files: FileCache | None) -> list[torch.Tensor]:
    """Each image's tiles, the files read through `files` when given (samples sharing
    images read each once), else in one concurrent batch."""
    if files is not None:
        read = files.fetch(paths, max_bytes=cfg.max_image_bytes)
    else:
        read = fetch_files(paths, max_bytes=cfg.max_image_bytes) if len(paths) > 1 else {}
    # open_image decodes the whole file, so a corrupt one fails there, naming it
    return [tile_image(open_image(p, sample=sample, data=read.get(p), max_bytes=cfg.max_image_bytes,
                                  max_pixels=cfg.max_image_pixels),
                       tile=cfg.tile, max_tiles=cfg.max_tiles, thumbnail=cfg.thumbnail) for p in paths]


def _pixels(tiles: list[torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    return torch.cat(tiles) if tiles else torch.zeros(0, 3, cfg.tile, cfg.tile)


def sample_name(record, where: str = "") -> str:
    """How messages name a sample: its id (printable) and where it is."""
    rid = printable(record.get("id", "?"), 100) if isinstance(record, dict) else "?"
    return f"{rid} ({where})" if where else rid


def load_samples(path: str, *, tokenizer: Tokenizer, cfg: DataConfig,
                 report: LoadReport | None = None) -> list[EncodedSample]:
    """Every sample of a JSONL file, encoded. With cfg.on_bad_sample='skip' a bad sample
    (unreadable image, placeholder count, empty conversation, over max_tokens, not JSON)
    is counted in `report` by reason and left out; nothing is ever truncated."""
    base = cfg.image_base(path)
    report = report if report is not None else LoadReport(path)
    skip = cfg.on_bad_sample == "skip"
    out = []
    for n, rec in read_jsonl(path, report if skip else None, max_line_bytes=cfg.max_line_bytes):
        try:
            out.append(encode_sample(rec, tokenizer=tokenizer, cfg=cfg, base_dir=base,
                                     sample=sample_name(rec, f"{path}:{n}")))
        except DataError as e:
            if not skip:
                raise
            report.skip(e)
    report.loaded = len(out)
    if not out:
        raise DataError(f"{path}: no usable sample ({report.summary()})"
                        + (f"; first problem: {report.examples[0]}" if report.examples else ""), "empty")
    return out
