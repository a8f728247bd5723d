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
maximum is an error that names it. This module reads samples whole (evaluation, tests);
training streams them (`stream.py`).
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from parallelism.collectives import split_evenly
from parallelism.hybrid_attention import hybrid_shard
from parallelism.zigzag import IGNORE_INDEX

from .positions import v2pe_position_ids
from .tokenizer import IM_END, IM_START, Tokenizer

IMAGE_PLACEHOLDER = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad input data; the message names the sample, `reason` classifies it for the counts."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadReport:
    """What loading a data file kept and skipped (data.on_bad_sample: skip), by reason."""

    path: str
    loaded: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # the first few messages, for the log

    def skip(self, e: DataError) -> None:
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(str(e))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.path}: {self.loaded} samples loaded, {self.total_skipped} skipped ({why})"


# --- containment: what a dataset may make the reader touch ----------------------------------


def printable(text, limit: int = 200) -> str:
    """Text from the data as it may be printed: control characters (ANSI escapes, line
    breaks) escaped, at most `limit` characters."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "..."
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
                   for c in s)


def _split(url: str) -> tuple[str, str]:
    """("s3://", "bucket/key") or ("", "/local/path"); file:// is a local path."""
    scheme, sep, rest = url.rpartition("://")
    if scheme in ("", "file"):
        return "", rest if sep else url
    return f"{scheme}://", rest


def _inside(path: str, root: str) -> bool:
    """Whether `path` lies under `root`: the same scheme and a normalised prefix, with
    local symlinks followed (a link out of the folder is outside it)."""
    (ps, pr), (rs, rr) = _split(path), _split(root)
    if ps != rs:
        return False
    if not ps:
        pr, rr = os.path.realpath(pr or "."), os.path.realpath(rr or ".")
    else:
        pr, rr = posixpath.normpath(pr), posixpath.normpath(rr)
    return pr == rr or pr.startswith(rr.rstrip("/") + "/")


def resolve_image(name: str, base: str, *, sample: str, allowed: Sequence[str] = ()) -> str:
    """A record's image reference resolved against the dataset's root `base`. One that
    leads out of it (an absolute path or URL elsewhere, `..`, a symlink pointing out) is
    a DataError unless it lies inside one of `allowed` (data.allowed_roots): a dataset
    must not make the workers read arbitrary files or fetch arbitrary URLs."""
    if "://" in name or name.startswith("/"):
        path = name
    else:
        scheme, rest = _split(base)
        path = f"{scheme}{posixpath.normpath(posixpath.join(rest, name))}" if rest else posixpath.normpath(name)
    if not any(_inside(path, root) for root in (base, *allowed)):
        raise DataError(f"sample {sample}: image {printable(name)} is outside the dataset's root {base or '.'} "
                        "(data.allowed_roots lists other places images may come from)", "outside_root")
    return path


class Refused(OSError):
    """A file the reader will not read (not a regular file, or over its size limit)."""


def _is_local(fs) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def _regular(path: str) -> os.stat_result:
    """The local file's stat; Refused unless it is a regular file (a FIFO would block a
    read, /dev/zero never end it)."""
    st = os.stat(path)  # follows links: their target is what would be read
    if not stat.S_ISREG(st.st_mode):
        raise Refused("is not a regular file")
    return st


def _read_local(path: str, max_bytes: int) -> bytes:
    st = _regular(path)
    if st.st_size > max_bytes:
        raise Refused(f"is {st.st_size / 2**20:.1f} MiB, more than data.max_image_bytes={max_bytes}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused(f"is more than data.max_image_bytes={max_bytes} bytes")
    return data


def read_head(path: str, n: int) -> bytes:
    """The first `n` bytes of a file (a regular one, if local)."""
    import fsspec

    fs, key = fsspec.core.url_to_fs(path)
    if _is_local(fs):
        _regular(key)
        with open(key, "rb") as f:
            return f.read(n)
    return fs.cat_file(key, start=0, end=n)


# --- images -------------------------------------------------------------------------------


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


MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: a photo of a page is ~10 M; PIL warns at 89 M


def open_image(path: str, *, sample: str, data: bytes | Exception | None = None, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS):
    """The decoded image at `path` (`data`: its bytes, or the error reading them, when
    already fetched by `fetch_files`); at most `max_bytes` read and `max_pixels` decoded."""
    from PIL import Image

    try:
        if isinstance(data, Exception):
            raise data
        if data is None:
            data = fetch_files([path], max_bytes=max_bytes)[path]
            if isinstance(data, Exception):
                raise data
    except FileNotFoundError:
        raise DataError(f"sample {sample}: image file {printable(path)} does not exist", "image") from None
    except OSError as e:  # Refused, a directory, a permission
        raise DataError(f"sample {sample}: image file {printable(path)} {unreadable(e)}", "image") from None
    try:
        img = Image.open(io.BytesIO(data))
        check_pixels(img.size, max_pixels, path=path, sample=sample)
        img.load()  # decode now: a truncated or corrupt file fails here, not halfway through tiling
        return img
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"sample {sample}: image file {printable(path)} cannot be read ({printable(e)})",
                        "image") from None


def unreadable(e: OSError) -> str:
    """Why a file could not be read, as the end of "image file X ..."."""
    return str(e) if isinstance(e, Refused) else f"cannot be read ({type(e).__name__}: {printable(e.strerror or e)})"


def check_pixels(size: tuple[int, int], max_pixels: int, *, path: str, sample: str) -> None:
    """A DataError before decoding an image of more than `max_pixels` pixels."""
    w, h = size
    if w * h > max_pixels:
        raise DataError(f"sample {sample}: image file {printable(path)} is {w}x{h} pixels, more than "
                        f"data.max_image_pixels={max_pixels}", "image_too_large")


def concurrency(fs, requests: int = 16) -> dict:
    """Keyword arguments that bound an async filesystem's batch of requests in flight
    (s3fs would otherwise open up to 128 connections at once, more than a small S3
    endpoint serves); none for a synchronous one, which takes no such argument."""
    return {"batch_size": requests} if getattr(fs, "async_impl", False) else {}


def fetch_files(paths: Sequence[str], *, max_bytes: int = MAX_IMAGE_BYTES) -> dict[str, bytes | Exception]:
    """Every file's bytes (or the error reading it), read concurrently: one batch per
    filesystem, so a row's images cost one round of requests to S3, not one (or two,
    with s3fs's size lookup) after another. At most `max_bytes` of each are read (a
    larger file is a `Refused` error); local files must be regular files."""
    import fsspec

    by_fs: dict[int, tuple] = {}
    for p in dict.fromkeys(paths):
        fs, key = fsspec.core.url_to_fs(p)
        by_fs.setdefault(id(fs), (fs, []))[1].append((p, key))
    out: dict[str, bytes | Exception] = {}
    for fs, items in by_fs.values():
        if _is_local(fs):
            for p, k in items:
                try:
                    out[p] = _read_local(k, max_bytes)
                except OSError as e:
                    out[p] = e
            continue
        keys = [k for _, k in items]
        got = fs.cat_ranges(keys, [0] * len(keys), [max_bytes + 1] * len(keys), on_error="return",
                            **concurrency(fs))
        for (p, _), value in zip(items, got):
            if value is None:
                value = FileNotFoundError(p)
            elif isinstance(value, bytes) and len(value) > max_bytes:
                value = Refused(f"is more than data.max_image_bytes={max_bytes} bytes")
            out[p] = value
    return out


class FileCache:
    """Files read before, kept in memory up to a byte budget (least recently used out
    first), so files that samples share — a synthetic set drawn from a pool of images,
    a picture repeated across documents, the next epoch's rows — come from S3 once per
    process. Errors are not kept: a file that failed is asked for again. Thread-safe
    (the stream's prefetch reads rows in a pool)."""

    def __init__(self, budget_bytes: int = 256 << 20):
        import collections
        import threading

        self.budget = budget_bytes
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def fetch(self, paths: Sequence[str], *, max_bytes: int = MAX_IMAGE_BYTES) -> dict[str, bytes | Exception]:
        out: dict[str, bytes | Exception] = {}
        with self._lock:
            for p in paths:
                if p in self._files:
                    self._files.move_to_end(p)
                    out[p] = self._files[p]
        missing = [p for p in dict.fromkeys(paths) if p not in out]
        got = fetch_files(missing, max_bytes=max_bytes) if missing else {}
        with self._lock:
            for p, value in got.items():
                out[p] = value
                if isinstance(value, bytes) and p not in self._files and len(value) <= self.budget:
                    self._files[p] = value
                    self._bytes += len(value)
            while self._bytes > self.budget:
                _, old = self._files.popitem(last=False)
                self._bytes -= len(old)
        return out


# --- samples ------------------------------------------------------------------------------


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
    max_line_bytes: int = 16 << 20  # one JSONL record (a 1M-token sample is ~4 MiB of text)
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


# The default system message of the authors' `internlm2-chat` template (InternVL2's chat
# models were fine-tuned with it); a leading "system" turn in the data replaces it.
SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                  "是一个有用无害的人工智能助手。")


def _roles(conversations, sample: str) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"sample {sample}: 'conversations' must be a non-empty list of turns", "conversation")
    out = []
    for i, turn in enumerate(conversations):
        who, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if who not in ("human", "gpt", "system") or not isinstance(value, str):
            raise DataError(f"sample {sample}: conversations[{i}] needs 'from' in human/gpt/system and a string "
                            "'value'", "conversation")
        out.append(({"human": "user", "gpt": "assistant", "system": "system"}[who], value))
    return out


def _chat_turns(convs: Sequence[tuple[str, str]], sample: str) -> tuple[str, list[tuple[str, str]]]:
    """(system message, alternating user/assistant turns) as the authors' preprocessing takes them."""
    turns = list(convs)
    system = SYSTEM_MESSAGE
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1].strip(), turns[1:]
    if turns and turns[0][0] != "user":
        turns = turns[1:]  # the authors drop a first turn that is not the user's
    for i, (role, text) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise DataError(f"sample {sample}: turn {i} is from {role!r} where the chat needs {want!r} (turns "
                            "alternate user/assistant after an optional system turn)", "conversation")
        if not text.strip():
            raise DataError(f"sample {sample}: turn {i} ({role}) is empty", "conversation")
    if not turns or turns[-1][0] != "assistant":
        raise DataError(f"sample {sample}: the chat must end with an answer ('gpt' turn) to learn from",
                        "conversation")
    return system, [(role, text.strip()) for role, text in turns]


def render_tokens(
    convs: Sequence[tuple[str, str]], tiles_per_image: Sequence[int], *, tokenizer: Tokenizer, tokens_per_tile: int,
    sample: str = "?",
) -> tuple[list[int], list[bool]]:
    """Token ids of a chat in the authors' `internlm2-chat` template, and which are learned.

    convs: (role, text) turns with `<image>` placeholders; tiles_per_image: the tile count
    of each image in order of appearance. The rendering is the authors' training
    preprocessing (InternVL `preprocess_internlm`):

        <s><|im_start|>system\n{system}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>...

    every text stripped, nothing after `<|im_end|>`, each `<image>` in order becoming
    `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile x that image's tiles) + `</img>`. The
    answers and their `<|im_end|>` are learned; BOS, the system turn, the user turns and
    each `<|im_start|>assistant\n` are not.

    The ids are those of one encode of the whole string: added tokens split the text
    first, so each piece between them is encoded alone here too. Only an answer and its
    `assistant\n` header share a piece; the header's length is counted the authors' way
    (encoded alone) and a sample where that would cut a token in two is refused.
    """
    system, turns = _chat_turns(convs, sample)
    im_start, im_end = tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)
    ids: list[int] = [tokenizer.bos_id, im_start, *tokenizer.encode(f"system\n{system}"), im_end]
    supervised: list[bool] = [False] * len(ids)
    img_i = 0
    for role, text in turns:
        pieces = text.split(IMAGE_PLACEHOLDER)
        body: list[int] = []
        for j, piece in enumerate(pieces):
            if j:
                n = tokens_per_tile * tiles_per_image[img_i]
                body += [tokenizer.img_start_id, *[tokenizer.img_context_id] * n, tokenizer.img_end_id]
                img_i += 1
            body += tokenizer.encode(f"{role}\n{piece}" if j == 0 else piece)
        header = len(tokenizer.encode(f"{role}\n"))
        if role == "assistant" and header + len(tokenizer.encode(pieces[0])) != len(tokenizer.encode(f"{role}\n{pieces[0]}")):
            raise DataError(f"sample {sample}: the answer's first token merges with the 'assistant\\n' header under "
                            f"tokenizer {tokenizer.name}, so the learned part has no token boundary", "tokenization")
        ids += [im_start, *body, im_end]
        learn = role == "assistant"
        supervised += [False] * (1 + header) + [learn] * (len(body) - header) + [learn]
    return ids, supervised


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
    convs = _roles(record.get("conversations", []), sample)
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
    if len(ids) > cfg.max_tokens:
        raise DataError(f"sample {sample}: {len(ids)} tokens exceed max_tokens={cfg.max_tokens} (nothing is "
                        "truncated)", "too_long")
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
    sample = sample or sample_name(record)
    convs, paths = prepare_record(record, sample, base_dir, cfg.allowed_roots)
    if files is not None:
        read = files.fetch(paths, max_bytes=cfg.max_image_bytes)
    else:  # a sample's images in one concurrent batch
        read = fetch_files(paths, max_bytes=cfg.max_image_bytes) if len(paths) > 1 else {}
    # open_image decodes the whole file, so a corrupt one fails there, naming it
    tiles = [tile_image(open_image(p, sample=sample, data=read.get(p), max_bytes=cfg.max_image_bytes,
                                   max_pixels=cfg.max_image_pixels),
                        tile=cfg.tile, max_tiles=cfg.max_tiles, thumbnail=cfg.thumbnail) for p in paths]
    input_ids, targets = encode_tokens(convs, [t.shape[0] for t in tiles], tokenizer=tokenizer, cfg=cfg, sample=sample)
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, cfg.tile, cfg.tile)
    return EncodedSample(sample_id=sample, input_ids=input_ids, targets=targets, pixels=pixels)


def sample_name(record, where: str = "") -> str:
    """How messages name a sample: its id (printable) and where it is."""
    rid = printable(record.get("id", "?"), 100) if isinstance(record, dict) else "?"
    return f"{rid} ({where})" if where else rid


def iter_lines(f, max_bytes: int, chunk: int = 1 << 20) -> Iterator[tuple[int, int, bytes | None]]:
    """(byte offset, line number, line with its newline) of a binary file read in chunks
    (fsspec's remote files have no bounded readline). A line longer than `max_bytes`
    comes as None: its bytes are dropped as they arrive, never held whole."""
    buf = bytearray()
    buf_start = line_start = 0  # file offsets of buf[0] and of the current line
    line_no, too_long = 0, False
    while True:
        data = f.read(chunk)
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            line_no += 1
            yield line_start, line_no, None if too_long or nl + 1 > max_bytes else bytes(buf[:nl + 1])
            del buf[:nl + 1]
            buf_start += nl + 1
            line_start, too_long = buf_start, False
        if not data:
            if buf or too_long:  # a last line without a newline
                yield line_start, line_no + 1, None if too_long or len(buf) > max_bytes else bytes(buf)
            return
        if len(buf) > max_bytes:  # no newline yet and already too long: keep nothing of it
            too_long = True
            buf_start += len(buf)
            buf.clear()


def parse_line(raw: bytes | None, *, where: str, max_bytes: int):
    """One JSONL line as a record; a DataError naming `where` it is ("file line N") when
    it is too long, not UTF-8, not JSON or nested too deeply to parse."""
    if raw is None:
        raise DataError(f"{where}: longer than data.max_line_bytes={max_bytes}", "too_large")
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line)", "encoding") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", "json") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read", "json") from None


def read_jsonl(path: str, report: LoadReport | None = None, *,
               max_line_bytes: int = DataConfig.max_line_bytes) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-empty line. A line that cannot be a record
    (too long, not UTF-8, not JSON) raises, or with `report` is counted there and left out."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        for _, line_no, raw in iter_lines(f, max_line_bytes):
            if raw is not None and not raw.strip():
                continue
            try:
                rec = parse_line(raw, where=f"{path} line {line_no}", max_bytes=max_line_bytes)
            except DataError as err:
                if report is None:
                    raise
                report.skip(err)
                continue
            yield line_no, rec


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


# --- packed batches -------------------------------------------------------------------------


@dataclass
class V2PEBatch:
    """One packed row of documents, on one rank (whole, or its context-parallel shard).

    Per-token tensors are (1, S); `visual_index[0, t]` is the row of the batch's visual
    tokens (tile-major, all tiles of the batch) that replaces token t, or -1.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor  # float64
    visual_index: torch.Tensor
    loss_weight: torch.Tensor  # float32, 0 where the target is ignored
    pixels: torch.Tensor  # (N_tiles, 3, H, W): all the batch's tiles, or this rank's share
    cu_seqlens: torch.Tensor  # int32 global document offsets
    num_tiles: int  # tiles of the whole batch
    sample_ids: tuple[str, ...] = ()
    # Plain positions ("default" mode): the longest document's length, which the
    # checkpoint's rope_scaling scales by; 0 for V2PE positions (no scaling).
    rope_len: int = 0

    def to(self, device: torch.device, pixel_dtype: torch.dtype) -> V2PEBatch:
        """This batch on `device`, its pixels in the model's dtype (positions stay float64)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        moved["pixels"] = self.pixels.to(device, pixel_dtype)
        return replace(self, **moved)


def pack(
    samples: Sequence[EncodedSample],
    *,
    tokenizer: Tokenizer,
    tokens_per_tile: int,
    multiple: int,
    mode: str,
    stride: int | None = None,
    generator: torch.Generator | None = None,
) -> V2PEBatch:
    """Packs samples into one row; each document is padded to a multiple of `multiple`
    (2 x context-parallel degree) and gets its own V2PE positions."""
    ids, tgts, pos, vis, docs = [], [], [], [], [0]
    next_visual = 0
    for s in samples:
        p = v2pe_position_ids(
            s.input_ids, img_start_id=tokenizer.img_start_id, img_context_id=tokenizer.img_context_id,
            img_end_id=tokenizer.img_end_id, mode=mode, stride=stride, generator=generator,
        )
        is_ctx = s.input_ids == tokenizer.img_context_id
        n_ctx = int(is_ctx.sum())
        if n_ctx != s.pixels.shape[0] * tokens_per_tile:
            raise DataError(
                f"sample {s.sample_id}: {n_ctx} image context tokens but {s.pixels.shape[0]} tiles x {tokens_per_tile}"
            )
        v = torch.full_like(s.input_ids, -1)
        v[is_ctx] = torch.arange(next_visual, next_visual + n_ctx)
        next_visual += n_ctx
        n = len(s)
        pad = (-n) % multiple
        # Padding continues the positions past the document's end; its targets are ignored
        # and, being last under a causal mask, no real token attends to it.
        last = float(p[-1]) if n else -1.0
        ids.append(torch.cat([s.input_ids, torch.full((pad,), tokenizer.pad_id)]))
        tgts.append(torch.cat([s.targets, torch.full((pad,), IGNORE_INDEX)]))
        pos.append(torch.cat([p, last + torch.arange(1, pad + 1, dtype=torch.float64)]))
        vis.append(torch.cat([v, torch.full((pad,), -1)]))
        docs.append(docs[-1] + n + pad)
    input_ids = torch.cat(ids).unsqueeze(0)
    targets = torch.cat(tgts).unsqueeze(0)
    pixels = torch.cat([s.pixels for s in samples]) if samples else torch.zeros(0, 3, 1, 1)
    return V2PEBatch(
        input_ids=input_ids,
        targets=targets,
        positions=torch.cat(pos).unsqueeze(0),
        visual_index=torch.cat(vis).unsqueeze(0),
        loss_weight=(targets != IGNORE_INDEX).float(),
        pixels=pixels,
        cu_seqlens=torch.tensor(docs, dtype=torch.int32),
        num_tiles=pixels.shape[0],
        sample_ids=tuple(s.sample_id for s in samples),
        rope_len=max((len(s) for s in samples), default=0) if mode == "default" else 0,
    )


def make_batch(
    samples: Sequence[EncodedSample],
    *,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    cp: int,
    generator: torch.Generator | None = None,
) -> V2PEBatch:
    """`pack` with the position mode and stride from config, padded for a CP degree."""
    return pack(samples, tokenizer=tokenizer, tokens_per_tile=cfg.tokens_per_tile, multiple=2 * cp,
                mode=cfg.position_mode, stride=cfg.position_stride, generator=generator)


def shard_batch(batch: V2PEBatch, world_size: int, rank: int, *, a2a: int = 1) -> V2PEBatch:
    """This rank's context-parallel share: every per-token tensor sharded with the same
    function, and an even share of the tiles to encode (features are gathered).

    a2a=1: the zigzag shard over `world_size` ring ranks. a2a>1 (hybrid context
    parallelism): the group is `world_size // a2a` all-to-all groups of `a2a` adjacent
    ranks; the row is zigzag-sharded over the groups and each group's shard cut into
    `a2a` contiguous pieces (`hybrid_shard`). Rows must be padded to a multiple of
    2 * world_size either way.
    """
    cu = batch.cu_seqlens
    if a2a < 1 or world_size % a2a:
        raise ValueError(f"shard_batch: the all-to-all degree {a2a} does not divide the context-parallel size "
                         f"{world_size}")
    ring_size, ring_rank, a2a_rank = world_size // a2a, rank // a2a, rank % a2a

    def sh(t):
        return hybrid_shard(t, ring_size, a2a, ring_rank, a2a_rank, dim=1, cu_seqlens=cu)

    lo, hi = split_evenly(batch.num_tiles, world_size, rank)
    return V2PEBatch(
        input_ids=sh(batch.input_ids),
        targets=sh(batch.targets),
        positions=sh(batch.positions),
        visual_index=sh(batch.visual_index),
        loss_weight=sh(batch.loss_weight),
        pixels=batch.pixels[lo:hi],
        cu_seqlens=cu,
        num_tiles=batch.num_tiles,
        sample_ids=batch.sample_ids,
        rope_len=batch.rope_len,
    )


def pack_rows(lengths: Sequence[int], budget: int, multiple: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices grouped in order into rows whose padded length stays within `budget`."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        padded = math.ceil(n / multiple) * multiple
        if padded > budget:
            raise DataError(f"sample {names[i] if names else i}: {n} tokens (padded {padded}) exceed the packing "
                            f"budget {budget}")
        if used + padded > budget and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += padded
    if cur:
        rows.append(cur)
    return rows


def pack_greedy(samples: Sequence[EncodedSample], budget: int, multiple: int) -> list[list[EncodedSample]]:
    """Groups samples in order into rows whose padded length stays within `budget`."""
    rows = pack_rows([len(s) for s in samples], budget, multiple, [s.sample_id for s in samples])
    return [[samples[i] for i in row] for row in rows]


__all__ = [
    "DataConfig", "DataError", "EncodedSample", "LoadReport", "V2PEBatch", "encode_sample", "load_samples",
    "make_batch", "pack", "pack_greedy", "pack_rows", "prepare_record", "read_jsonl", "shard_batch", "tile_image",
]
