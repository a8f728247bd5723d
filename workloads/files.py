"""Reading a dataset's files, contained and bounded: what a dataset may make the reader touch.

Image references resolve inside the dataset's root (or a root `data.allowed_roots`
names); only regular local files are read; every read is bounded in bytes. Files are
fetched concurrently, one batch per filesystem, and kept in a byte-bounded cache. JSONL
is read in bounded chunks (remote files have no bounded readline): a line longer than
its bound is dropped as it arrives, never held whole.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence

from .data_errors import DataError, LoadReport, printable

MAX_IMAGE_BYTES = 64 << 20
MAX_LINE_BYTES = 16 << 20  # one JSONL record (a 1M-token sample is ~4 MiB of text)


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


# --- JSONL ----------------------------------------------------------------------------------


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
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
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
