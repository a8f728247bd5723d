"""Run storage: S3 (any S3-protocol endpoint) or a local folder, with retries that ride
out an unreachable endpoint.

`RetryingS3FileSystem` is s3fs with one change: a request that cannot reach the endpoint
at all (connection refused or reset: S3 or the network is down) is retried with s3fs's
backoff, 0.1 s x 1.7^i capped at 15 s, up to `retries` attempts (storage.retries), and
the first failure of an outage is reported. Plain s3fs gives up at the first connection
error. It is a class of its own, with `retries` among its constructor arguments, because
Ray sends the storage filesystem to its train controller and workers by pickling, which
rebuilds it from those arguments in processes that run none of our code otherwise.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time

import s3fs
import s3fs.core

log = logging.getLogger(__name__)
RETRIES = [0]  # requests of this process retried after a connection error (for the metrics)
BYTES_READ = [0]  # bytes this process read from S3 through cat_file/cat_ranges (checkpoint restores)
_last_report = [0.0]


def _retry_connection_errors(e: BaseException) -> bool:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    if not isinstance(e, (EndpointConnectionError, ConnectionClosedError, ConnectionError)):
        return False
    if time.monotonic() - _last_report[0] > 30:  # once per outage, not once per request
        log.warning("S3 request failed (%s: %s); retrying with backoff", type(e).__name__, e)
    _last_report[0] = time.monotonic()
    RETRIES[0] += 1
    return True


class RetryingS3FileSystem(s3fs.S3FileSystem):
    def __init__(self, *args, retries: int = 10, **kwargs):
        # One layer of retries, s3fs's, with the schedule above; botocore's own would
        # multiply it.
        kwargs.setdefault("config_kwargs", {"retries": {"max_attempts": 1, "mode": "standard"}})
        super().__init__(*args, **kwargs)
        self.retries = retries
        # s3fs asks one process-wide hook whether an unknown error is worth a retry.
        s3fs.core.CUSTOM_ERROR_HANDLER = _retry_connection_errors

    async def _cat_file(self, path, version_id=None, start=None, end=None, **kwargs):
        # cat_ranges goes through here too, one call per range.
        data = await super()._cat_file(path, version_id=version_id, start=start, end=end, **kwargs)
        BYTES_READ[0] += len(data)
        return data


def s3_endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")


def filesystem(url: str, *, endpoint_url: str | None = None, retries: int = 10):
    """(filesystem, path) for a storage URL: s3://bucket/key or a local path."""
    if url.startswith("s3://"):
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:  # later plain fsspec calls in this process (dataset writers) use it too
            os.environ.setdefault("FSSPEC_S3_ENDPOINT_URL", endpoint)
        return RetryingS3FileSystem(endpoint_url=endpoint, retries=retries), url[len("s3://"):]
    import fsspec

    return fsspec.core.url_to_fs(url)


def storage_fs(url: str, cfg):
    """(filesystem, path) for a storage URL with the job's S3 endpoint and retries."""
    return filesystem(url, endpoint_url=cfg.storage.endpoint_url, retries=cfg.storage.retries)


def run_uri(cfg, *parts: str) -> str:
    """Where the job's files live: <storage.uri>/<name>/<parts...> (a local folder when
    storage.uri is empty)."""
    base = cfg.storage.uri.rstrip("/") or os.path.abspath("longview-runs")
    return posixpath.join(base, cfg.name, *parts)


def checkpoint_store(cfg):
    """The job's `CheckpointStore`."""
    from .checkpoint import CheckpointStore

    fs, root = storage_fs(run_uri(cfg), cfg)
    return CheckpointStore(fs, root, run_uri(cfg))


EXPORT_META = "longview.json"  # beside an export: the run and training step it came from


def write_export_meta(url: str, cfg, run: str, step: int) -> None:
    import json

    fs, root = storage_fs(url, cfg)
    fs.pipe_file(f"{root.rstrip('/')}/{EXPORT_META}", json.dumps({"run": run, "step": step}).encode())


def read_export_meta(url: str, cfg) -> dict | None:
    """The export's `longview.json` ({"run", "step"}), or None (a model from elsewhere has none)."""
    import json

    fs, root = storage_fs(url, cfg)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{EXPORT_META}"))
    except FileNotFoundError:
        return None
