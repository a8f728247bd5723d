"""Training data that streams: a JSONL indexed once, images decoded when a rank needs them.

`build_index` reads the JSONL once (on the driver, before any worker starts): for every
usable sample its byte offset, its token count and the tile count of each image. Token
counts come from the text and the images' header sizes (PIL reads the header without
decoding pixels), so the index of 100,000 samples with hundreds of images each costs
the text and a few KiB per image, not the pixels. It is stored with the run
(safetensors + a JSON report: nothing executable) and keyed by the data file's identity
and everything that changes a count (tokenizer, tiling), so a resumed or resubmitted run
reads it instead of building it again.

`StreamingDataset` gives a rank its packed, context-parallel-sharded batch for a
micro-step: it packs rows from the index's token counts (the same rows as the eager
reader: `pack_rows` in file order), reads only the row's lines (one ranged read each),
renders their tokens, and decodes only the images whose tiles fall in this rank's share
of the vision encoder (`split_evenly` over the group, as `shard_batch` splits them). A
background thread builds the next micro-step's batch while the current one trains.
A worker's memory depends on the row, not on the dataset (the index is 16 bytes per
sample and 8 per image).

A corrupt image whose header reads but whose pixels do not is found when it is decoded:
the run stops naming the sample (with data.on_bad_sample: skip as well, since the other
ranks of the group have already used the sample's text).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import fsspec
import torch

from parallelism.collectives import split_evenly
from parallelism.zigzag import IGNORE_INDEX

from ..data_errors import DataError, LoadReport, printable
from ..files import FileCache, fetch_files, iter_lines, parse_line, read_head
from ..images import check_pixels, open_image, unreadable
from .data import DataConfig, EncodedSample, encode_tokens, prepare_record, sample_name
from .images import tile_image, tiles_for
from .packing import V2PEBatch, make_batch, pack_rows, shard_batch
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
INDEX_VERSION = 2


HEADER_BYTES = 1 << 16  # PNG and JPEG headers (with their EXIF/ICC blocks, almost always) fit


def _header_size(path: str, sample: str, cfg: DataConfig | None = None) -> tuple[int, int]:
    """(width, height) from the image's header: the pixels are not decoded, and on S3 it
    is one ranged GET of the first 64 KiB (the whole file, within data.max_image_bytes,
    if the header runs past it). An image over data.max_image_pixels is a DataError here,
    before any worker decodes it."""
    from PIL import Image

    cfg = cfg or DataConfig()
    try:
        head = read_head(path, HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"sample {sample}: image file {printable(path)} does not exist", "image") from None
    except OSError as e:
        raise DataError(f"sample {sample}: image file {printable(path)} {unreadable(e)}", "image") from None

    def size(data: bytes) -> tuple[int, int]:
        with Image.open(io.BytesIO(data)) as img:
            return img.size

    try:
        found = size(head)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for an unreadable header
        found, error = None, e
    if found is None and len(head) == HEADER_BYTES:  # the header may run past the first block: the whole file
        whole = fetch_files([path], max_bytes=cfg.max_image_bytes)[path]
        try:
            if isinstance(whole, Exception):
                raise whole
            found = size(whole)
        except Exception as e:  # noqa: BLE001 - as above; reported below as a DataError
            error = e
    if found is None:
        raise DataError(f"sample {sample}: image file {printable(path)} cannot be read ({printable(error)})", "image")
    check_pixels(found, cfg.max_image_pixels, path=path, sample=sample)
    return found


@dataclass
class SampleIndex:
    """Where each usable sample is and how long it is; image tile counts flattened."""

    path: str
    offsets: torch.Tensor  # (N,) int64 byte offset of the sample's line
    ends: torch.Tensor  # (N,) int64 byte offset just past the line: a sample is one ranged read
    tokens: torch.Tensor  # (N,) int64 tokens of the rendered sample
    image_tiles: torch.Tensor  # (total images,) int64 tiles of each image, samples in order
    image_start: torch.Tensor  # (N+1,) int64: sample i's images are image_tiles[image_start[i]:image_start[i+1]]
    report: LoadReport

    def __len__(self) -> int:
        return self.offsets.numel()

    def tiles_of(self, i: int) -> list[int]:
        return self.image_tiles[self.image_start[i]: self.image_start[i + 1]].tolist()

    def to_bytes(self) -> tuple[bytes, bytes]:
        from safetensors.torch import save

        tensors = {"offsets": self.offsets, "ends": self.ends, "tokens": self.tokens, "image_tiles": self.image_tiles,
                   "image_start": self.image_start}
        r = self.report
        meta = {"version": INDEX_VERSION, "path": self.path, "loaded": r.loaded, "skipped": r.skipped,
                "examples": r.examples}
        return save(tensors), json.dumps(meta).encode()

    @classmethod
    def from_bytes(cls, tensors: bytes, meta: bytes) -> SampleIndex:
        from safetensors.torch import load

        t, m = load(tensors), json.loads(meta)
        report = LoadReport(m["path"], loaded=m["loaded"], skipped=m["skipped"], examples=m["examples"])
        return cls(m["path"], t["offsets"], t["ends"], t["tokens"], t["image_tiles"], t["image_start"], report)


def build_index(path: str, *, tokenizer: Tokenizer, cfg: DataConfig, threads: int = 16) -> SampleIndex:
    """Reads the JSONL once; bad samples stop it (data.on_bad_sample: fail) or are counted
    and left out (skip), as the eager reader does. Image headers are read `threads` at a
    time (on S3 each is a round trip)."""
    base = cfg.image_base(path)
    report = LoadReport(path)
    skip = cfg.on_bad_sample == "skip"
    offsets, ends, tokens, image_tiles, image_start = [], [], [], [], [0]

    def header(item):
        p, sample = item
        try:
            return _header_size(p, sample, cfg)
        except DataError as e:
            return e

    def index_chunk(chunk, pool):
        """chunk: (offset, line number, raw line) in file order."""
        parsed = []
        for start, line_no, raw, end in chunk:
            span = (start, end)
            try:
                rec = parse_line(raw, where=f"{path} line {line_no}", max_bytes=cfg.max_line_bytes)
                sample = sample_name(rec, f"{path}:{line_no}")
                parsed.append((span, sample, *prepare_record(rec, sample, base, cfg.allowed_roots)))
            except DataError as e:
                parsed.append(e)
        wanted = [(p, item[1]) for item in parsed if not isinstance(item, DataError) for p in item[3]]
        sizes = iter(pool.map(header, wanted))
        for item in parsed:
            try:
                if isinstance(item, DataError):
                    raise item
                span, sample, convs, paths = item
                got = [next(sizes) for _ in paths]
                bad = next((g for g in got if isinstance(g, DataError)), None)
                if bad is not None:
                    raise bad
                tiles = [tiles_for(w, h, cfg.max_tiles, cfg.tile, cfg.thumbnail) for w, h in got]
                n = encode_tokens(convs, tiles, tokenizer=tokenizer, cfg=cfg, sample=sample)[0].numel()
            except DataError as e:
                if not skip:
                    raise
                report.skip(e)
                continue
            offsets.append(span[0])
            ends.append(span[1])
            tokens.append(n)
            image_tiles.extend(tiles)
            image_start.append(len(image_tiles))

    with fsspec.open(path, "rb") as f, ThreadPoolExecutor(threads, thread_name_prefix="v2pe-index") as pool:
        chunk = []
        for start, line_no, raw in iter_lines(f, cfg.max_line_bytes):
            if raw is None or raw.strip():  # None: too long, reported by parse_line
                chunk.append((start, line_no, raw, start + (len(raw) if raw is not None else 0)))
            if len(chunk) == 256:
                index_chunk(chunk, pool)
                chunk = []
        index_chunk(chunk, pool)
    report.loaded = len(offsets)
    if not offsets:
        raise DataError(f"{path}: no usable sample ({report.summary()})"
                        + (f"; first problem: {report.examples[0]}" if report.examples else ""), "empty")
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return SampleIndex(path, as_long(offsets), as_long(ends), as_long(tokens), as_long(image_tiles),
                       as_long(image_start), report)


def index_url(path: str, run_root: str, tokenizer: Tokenizer, cfg: DataConfig) -> str:
    """Where the index of `path` lives in the run: keyed by the file's identity (size and
    ETag or modification time) and every setting that changes a count."""
    fs, key = fsspec.core.url_to_fs(path)
    info = fs.info(key)
    ident = {"path": path, "size": info.get("size"), "etag": info.get("ETag") or info.get("etag"),
             "mtime": str(info.get("mtime") or info.get("LastModified") or ""), "tokenizer": tokenizer.name,
             "vocab": tokenizer.vocab_size, "max_tokens": cfg.max_tokens, "max_tiles": cfg.max_tiles, "tile": cfg.tile,
             "tokens_per_tile": cfg.tokens_per_tile, "thumbnail": cfg.thumbnail, "skip": cfg.on_bad_sample,
             "image_root": cfg.image_root, "allowed_roots": list(cfg.allowed_roots),
             "limits": [cfg.max_line_bytes, cfg.max_image_bytes, cfg.max_image_pixels],
             "version": INDEX_VERSION}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{run_root.rstrip('/')}/data/index/{digest}"


def ensure_index(path: str, run_root: str, *, tokenizer: Tokenizer, cfg: DataConfig) -> str:
    """Builds the index of `path` unless the run has it; returns its URL."""
    url = index_url(path, run_root, tokenizer, cfg)
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(posixpath.join(root, "meta.json")):
        index = build_index(path, tokenizer=tokenizer, cfg=cfg)
        tensors, meta = index.to_bytes()
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(posixpath.join(root, "index.safetensors"), tensors)
        fs.pipe_file(posixpath.join(root, "meta.json"), meta)  # last: its presence means complete
        log.info("data: indexed %s", index.report.summary())
    return url


def load_index(url: str) -> SampleIndex:
    fs, root = fsspec.core.url_to_fs(url)
    return SampleIndex.from_bytes(fs.cat_file(posixpath.join(root, "index.safetensors")),
                                  fs.cat_file(posixpath.join(root, "meta.json")))


@dataclass(frozen=True)
class RowStats:
    """The whole row's size (before sharding), for the memory planner."""

    tokens: int
    tiles: int
    supervised: int


@dataclass
class Source:
    """One indexed JSONL and the data settings it is read with."""

    index: SampleIndex
    cfg: DataConfig


# Keys of one dataset in the authors' meta file (`--meta_path` of their training script).
_META_KEYS = {"annotation", "root", "repeat_time", "max_dynamic_patch", "data_augment", "length"}


@dataclass(frozen=True)
class MetaEntry:
    name: str
    annotation: str  # the JSONL
    root: str | None  # where its relative image paths start
    repeat_time: float
    max_tiles: int | None  # the dataset's own max_dynamic_patch


def is_meta(path: str) -> bool:
    """A `.json` training file is a meta file naming datasets; `.jsonl` is one dataset."""
    return path.endswith(".json")


def read_meta(path: str) -> list[MetaEntry]:
    """The authors' dataset meta file: {name: {annotation, root, repeat_time, ...}}.
    Relative paths are taken from the meta file's folder. `data_augment` is not applied
    (longview does not augment images); `length` is informational."""
    base = posixpath.dirname(path)
    try:
        with fsspec.open(path, "rb") as f:
            meta = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})", "meta") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{path}: a meta file maps dataset names to {{annotation, root, repeat_time}}", "meta")

    def resolve(p: str) -> str:
        if "://" in p or p.startswith("/"):
            return p
        scheme, sep, rest = base.rpartition("://")  # normalised after the scheme: "./x" is no S3 key
        return f"{scheme}{sep}{posixpath.normpath(posixpath.join(rest, p))}"

    out = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise DataError(f"{where} needs 'annotation', the path of its JSONL", "meta")
        unknown = sorted(set(entry) - _META_KEYS)
        if unknown:
            raise DataError(f"{where}: {', '.join(unknown)} not understood (known: {', '.join(sorted(_META_KEYS))})",
                            "meta")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
            raise DataError(f"{where}: repeat_time must be a number > 0, got {repeat!r}", "meta")
        tiles = entry.get("max_dynamic_patch")
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
            raise DataError(f"{where}: max_dynamic_patch must be an integer >= 1, got {tiles!r}", "meta")
        root = entry.get("root")
        if root is not None and not isinstance(root, str):
            raise DataError(f"{where}: root must be a folder path, got {root!r}", "meta")
        if entry.get("data_augment"):
            log.warning("%s: data_augment is not applied (longview does not augment images)", where)
        out.append(MetaEntry(name, resolve(entry["annotation"]), resolve(root) if root else None, float(repeat), tiles))
    return out


def train_sources(path: str, cfg: DataConfig) -> list[tuple[str, DataConfig, float]]:
    """(JSONL, its data settings, repeat_time) of a training file: itself once, or each
    dataset of a meta file."""
    if not is_meta(path):
        return [(path, cfg, 1.0)]
    return [(e.annotation, replace(cfg, image_root=e.root or cfg.image_root, max_tiles=e.max_tiles or cfg.max_tiles),
             e.repeat_time) for e in read_meta(path)]


def prepare_sources(path: str, run_root: str, *, tokenizer: Tokenizer, cfg: DataConfig) -> list[tuple[str, DataConfig,
                                                                                                        float]]:
    """Indexes every JSONL of a training file once (driver side); each must exist."""
    sources = train_sources(path, cfg)
    for jsonl, c, _ in sources:
        fs, key = fsspec.core.url_to_fs(jsonl)
        if not fs.isfile(key):
            raise DataError(f"data.train: {jsonl} is not a file" + (f" (named in {path})" if jsonl != path else ""),
                            "missing_file")
        ensure_index(jsonl, run_root, tokenizer=tokenizer, cfg=c)
    return sources


def open_sources(path: str, run_root: str, *, tokenizer: Tokenizer, cfg: DataConfig,
                 seed: int) -> tuple[list[Source], torch.Tensor, LoadReport]:
    """A worker's view of a training file: its indexed sources, the (source, sample) order
    with repeat_time applied (a function of the seed), and one report of them all."""
    sources, repeats = [], []
    for jsonl, c, repeat in train_sources(path, cfg):
        sources.append(Source(load_index(ensure_index(jsonl, run_root, tokenizer=tokenizer, cfg=c)), c))
        repeats.append(repeat)
    report = LoadReport(path)
    for src in sources:
        r = src.index.report
        report.loaded += r.loaded
        for reason, n in r.skipped.items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
        report.examples += r.examples[: 5 - len(report.examples)]
    return sources, mixture_order([len(s.index) for s in sources], repeats, seed), report


def mixture_order(sizes: list[int], repeats: list[float], seed: int) -> torch.Tensor:
    """(M, 2) (source, sample) pairs: each source repeated `int(repeat)` times in file
    order, plus a seeded draw of the fractional part (as the authors' repeat_time)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s, (n, r) in enumerate(zip(sizes, repeats)):
        whole, frac = int(r), r - int(r)
        idx = [torch.arange(n)] * whole
        if frac > 0:
            idx.append(torch.randperm(n, generator=g)[: int(n * frac)].sort().values)
        if idx:
            picked = torch.cat(idx)
            parts.append(torch.stack([torch.full_like(picked, s), picked], dim=1))
    return torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.long)


class StreamingDataset:
    """A rank's batches, read from the JSONL(s) through their indexes as they are needed.

    `sources` are the indexed files; `order` the (source, sample) pairs training walks
    through (default: every sample of every source, in order)."""

    def __init__(self, sources: list[Source] | SampleIndex, *, tokenizer: Tokenizer, cfg: DataConfig | None = None,
                 cp: int, cp_rank: int, a2a: int = 1, budget: int, order: torch.Tensor | None = None,
                 prefetch: bool = True):
        if isinstance(sources, SampleIndex):  # one file read with `cfg`
            sources = [Source(sources, cfg)]
        self.sources, self.tokenizer = sources, tokenizer
        self.cp, self.cp_rank, self.a2a = cp, cp_rank, a2a
        if order is None:
            order = mixture_order([len(s.index) for s in sources], [1.0] * len(sources), 0)
        self.order = order
        lengths = [int(sources[s].index.tokens[i]) for s, i in order.tolist()]
        self.rows = pack_rows(lengths, budget, 2 * cp)  # the eager reader's rows (pack_greedy) for one file
        self._files = [fsspec.core.url_to_fs(s.index.path) for s in sources]
        self._images = FileCache()  # an image shared by samples (or seen last epoch) is read once
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="v2pe-prefetch") if prefetch else None
        self._ahead: tuple[tuple, Future] | None = None

    def _read(self, s: int, i: int) -> dict:
        # Exactly the sample's bytes: opening the file would read ahead a whole block
        # (50 MiB on s3fs) for every sample.
        fs, key = self._files[s]
        index = self.sources[s].index
        start = int(index.offsets[i])
        return parse_line(fs.cat_file(key, start=start, end=int(index.ends[i])), where=f"{index.path} at byte {start}",
                          max_bytes=self.sources[s].cfg.max_line_bytes)

    def _sample(self, s: int, i: int, rec: dict) -> tuple[EncodedSample, list[str]]:
        """The sample's tokens, placeholder pixels (tiles, 0, 0, 0) carrying its tile count
        through packing, and its image paths."""
        src = self.sources[s]
        sample = sample_name(rec, f"{src.index.path}@{int(src.index.offsets[i])}")
        convs, paths = prepare_record(rec, sample, src.cfg.image_base(src.index.path), src.cfg.allowed_roots)
        tiles = src.index.tiles_of(i)
        input_ids, targets = encode_tokens(convs, tiles, tokenizer=self.tokenizer, cfg=src.cfg, sample=sample)
        return EncodedSample(sample_id=sample, input_ids=input_ids, targets=targets,
                             pixels=torch.zeros(sum(tiles), 0, 0, 0)), paths

    def build(self, row: list[int], generator: torch.Generator | None) -> tuple[V2PEBatch, RowStats]:
        """The packed row (positions in `order`), sharded for this rank, with only this
        rank's tiles decoded."""
        pairs = [tuple(self.order[k].tolist()) for k in row]
        samples, paths = zip(*(self._sample(s, i, self._read(s, i)) for s, i in pairs))
        cfg = self.sources[pairs[0][0]].cfg  # packing and positions: the settings every source shares
        batch = make_batch(samples, tokenizer=self.tokenizer, cfg=cfg, cp=self.cp, generator=generator)
        lo, hi = split_evenly(batch.num_tiles, self.cp, self.cp_rank)
        # The images whose tiles fall in this rank's share, fetched in one concurrent batch.
        mine, first = [], 0
        for (s, i), images in zip(pairs, paths):
            for path, n in zip(images, self.sources[s].index.tiles_of(i)):
                if max(lo, first) < min(hi, first + n):
                    mine.append(path)
                first += n
        files = self._images.fetch(mine, max_bytes=max(src.cfg.max_image_bytes for src in self.sources))
        pixels, first = [], 0  # first: the batch-wide index of the current image's first tile
        for (s, i), smp, images in zip(pairs, samples, paths):
            c = self.sources[s].cfg
            for path, n in zip(images, self.sources[s].index.tiles_of(i)):
                a, b = max(lo, first), min(hi, first + n)
                if a < b:  # this rank encodes some of this image's tiles
                    image = open_image(path, sample=smp.sample_id, data=files[path], max_bytes=c.max_image_bytes,
                                       max_pixels=c.max_image_pixels)
                    tiles = tile_image(image, tile=c.tile, max_tiles=c.max_tiles, thumbnail=c.thumbnail)
                    if tiles.shape[0] != n:
                        raise DataError(f"sample {smp.sample_id}: image {path} changed after the data was indexed "
                                        f"({tiles.shape[0]} tiles, indexed {n})", "image")
                    pixels.append(tiles[a - first: b - first])
                first += n
        local = torch.cat(pixels) if pixels else torch.zeros(0, 3, cfg.tile, cfg.tile)
        stats = RowStats(batch.input_ids.shape[1], batch.num_tiles, int((batch.targets != IGNORE_INDEX).sum()))
        sharded = shard_batch(replace(batch, pixels=torch.zeros(0)), self.cp, self.cp_rank, a2a=self.a2a)
        return replace(sharded, pixels=local), stats

    def batch(self, row_index: int, generator_seed: int,
              next_key: tuple[int, int] | None = None) -> tuple[V2PEBatch, RowStats]:
        """Row `row_index` (δ draws seeded by `generator_seed`); with `next_key` the row
        after is started in the background."""
        key = (row_index, generator_seed)
        if self._ahead is not None and self._ahead[0] == key:
            out = self._ahead[1].result()
        else:
            out = self._build(key)
        self._ahead = None
        if next_key is not None and self._pool is not None:
            self._ahead = (next_key, self._pool.submit(self._build, next_key))
        return out

    def _build(self, key: tuple[int, int]) -> tuple[V2PEBatch, RowStats]:
        row_index, seed = key
        return self.build(self.rows[row_index], torch.Generator().manual_seed(seed))

    def close(self) -> None:
        """Stops the prefetch: a row not started is dropped, one being read is waited for."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
