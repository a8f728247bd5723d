"""JSONL read in bounded chunks: remote files have no bounded readline, and a line longer
than its bound is dropped as it arrives, never held whole."""

from __future__ import annotations

import json
from collections.abc import Iterator

from .data_errors import DataError, LoadReport

MAX_LINE_BYTES = 16 << 20  # one JSONL record (a 1M-token sample is ~4 MiB of text)


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
