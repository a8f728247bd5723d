"""Opening a dataset's images, bounded: bytes read and pixels decoded, every failure a
DataError naming the sample and the file (V2PE's and PIIP's readers alike)."""

from __future__ import annotations

import io

from .data_errors import DataError, printable
from .files import MAX_IMAGE_BYTES, Refused, fetch_files

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
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file: one DataError naming it
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
