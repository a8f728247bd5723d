"""What every checkpoint format shares: the errors a restore raises, checksums, and the
hint that turns a failed local write into "No space left on device"."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incomplete, corrupted, or not for this job)."""


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be written; the previous one stays the latest."""


class CheckpointMismatch(CheckpointError):
    """A complete checkpoint this job cannot resume from as configured (no fallback:
    older checkpoints of the run have the same layout)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def item_key(relative_path: str, offset: int, length: int) -> str:
    return f"{relative_path}@{offset}+{length}"


LOW_SPACE = 64 << 20  # free bytes below which a failed local write is taken for a full disk


def space_hint(local: Path) -> str:
    """"; No space left on device: ..." when the local temp folder's disk is (nearly)
    full, so the failure reads as what it is (and is not retried, `launch.retriable`)."""
    try:
        free = shutil.disk_usage(local.parent).free
    except OSError:
        return ""
    if free >= LOW_SPACE:
        return ""
    return (f"; No space left on device: {free >> 20} MiB free in {local.parent} (the workers' temp folder, "
            "TMPDIR): free it or point TMPDIR at a larger disk")
