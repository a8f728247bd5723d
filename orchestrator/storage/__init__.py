"""Run storage: where a run's checkpoints, exports, data and records live.

A storage backend is one class with the methods of `StorageBackend`, in a file of its
own, and one line in `BACKENDS`: S3 (`s3.py`, any S3-protocol endpoint, with retries)
and a local folder (`local.py`). Everything else (config checks, the checks before a
start, the workers' environment, Ray's storage, every read and write) asks the backend
that handles the URI.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Protocol

from .local import LocalBackend
from .s3 import BYTES_READ, RETRIES, RetryingS3FileSystem, S3Backend


class StorageBackend(Protocol):
    name: str

    def handles(self, uri: str) -> bool:
        """Whether this backend serves `uri`."""

    def check_uri(self, uri: str) -> str | None:
        """Why `uri` is malformed for this backend (None: it is well formed); no I/O."""

    def filesystem(self, uri: str, *, endpoint_url: str | None = None, retries: int = 10) -> tuple[Any, str]:
        """(fsspec filesystem, path on it) for `uri`."""

    def worker_env(self, storage) -> dict[str, str]:
        """Environment variables the Ray workers need to reach this storage (no secrets)."""

    def for_ray(self, uri: str, storage) -> tuple[str, Any]:
        """(storage_path, storage_filesystem or None) for Ray Train's RunConfig."""

    def check_reachable(self, uri: str, storage) -> None:
        """Seconds-cheap check before a start: raises InputError saying what to do."""


BACKENDS: list[StorageBackend] = [S3Backend(), LocalBackend()]
DEFAULT_FOLDER = "longview-runs"  # where runs go when storage.uri is empty (relative to the working directory)


def backend_for(uri: str) -> StorageBackend:
    """The backend serving `uri` (empty: the local default folder); ValueError if none does."""
    uri = resolved(uri)
    for b in BACKENDS:
        if b.handles(uri):
            return b
    raise ValueError(f"{uri!r} is neither an s3://bucket/prefix URI nor an absolute folder "
                     "(other schemes and relative paths are not supported)")


def resolved(uri: str) -> str:
    """storage.uri as used: the default local folder when empty."""
    return uri or os.path.abspath(DEFAULT_FOLDER)


def filesystem(url: str, *, endpoint_url: str | None = None, retries: int = 10):
    """(filesystem, path) for a URL: through the storage backend that handles it, else
    (a model given with --checkpoint as a relative path, file://, another scheme) through
    fsspec as given. Only storage.uri itself must name a backend (config)."""
    try:
        backend = backend_for(url)
    except ValueError:
        import fsspec

        return fsspec.core.url_to_fs(url)
    return backend.filesystem(url, endpoint_url=endpoint_url, retries=retries)


def storage_fs(url: str, cfg):
    """(filesystem, path) for a storage URL with the job's S3 endpoint and retries."""
    return filesystem(url, endpoint_url=cfg.storage.endpoint_url, retries=cfg.storage.retries)


def run_uri(cfg, *parts: str) -> str:
    """Where the job's files live: <storage.uri>/<name>/<parts...> (a local folder when
    storage.uri is empty)."""
    base = resolved(cfg.storage.uri.rstrip("/"))
    return posixpath.join(base, cfg.name, *parts)


EXPORT_META = "longview.json"  # beside an export: the run and training step it came from


def write_export_meta(url: str, cfg, run: str, step: int) -> None:
    fs, root = storage_fs(url, cfg)
    fs.pipe_file(f"{root.rstrip('/')}/{EXPORT_META}", json.dumps({"run": run, "step": step}).encode())


def read_export_meta(url: str, cfg) -> dict | None:
    """The export's `longview.json` ({"run", "step"}), or None (a model from elsewhere has none)."""
    fs, root = storage_fs(url, cfg)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{EXPORT_META}"))
    except FileNotFoundError:
        return None


__all__ = ["BACKENDS", "BYTES_READ", "RETRIES", "RetryingS3FileSystem", "StorageBackend", "backend_for",
           "filesystem", "read_export_meta", "resolved", "run_uri", "storage_fs",
           "write_export_meta"]
