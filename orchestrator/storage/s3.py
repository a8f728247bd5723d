"""S3 storage (AWS or any S3-protocol endpoint), with one retry policy for an unreachable
endpoint.

The policy (`RetryingS3FileSystem`, the only S3 client class of a job: registered as
fsspec's "s3", so the workloads' plain `fsspec.open("s3://...")` data reads use it too):

- a request that cannot reach the endpoint (connection refused, reset or timed out) is
  retried with s3fs's backoff, 0.1 s x 1.7^i capped at 15 s, up to `storage.retries`
  attempts; botocore's own retries are off (they would multiply the attempts);
- an outage has a deadline per process, `retry_window_s(storage.retries)` (about 29 s
  for 10): once the endpoint has failed every request for that long, every further
  request fails at once instead of starting its own round of retries. So a run whose
  endpoint is gone ends within the window, whatever number of reads, uploads and Ray
  Train records were waiting on it, and the driver does not restart the workers into an
  endpoint that still does not answer (`launch`).

It is a class of its own, with `retries` among its constructor arguments, because Ray
sends the storage filesystem to its train controller and workers by pickling, which
rebuilds it from those arguments in processes that run none of our code otherwise.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import fsspec
import s3fs
import s3fs.core

from ..errors import InputError

log = logging.getLogger(__name__)
RETRIES = [0]  # requests of this process retried after a connection error (for the metrics)
BYTES_READ = [0]  # bytes this process read from S3 through cat_file/cat_ranges (checkpoint restores)
BACKOFF_S, BACKOFF_BASE, BACKOFF_CAP_S = 0.1, 1.7, 15.0  # s3fs's schedule
CONNECT_TIMEOUT_S = 5  # an endpoint whose address drops packets costs this per attempt, not botocore's 60 s


def retry_window_s(retries: int) -> float:
    """The time `retries` attempts take with the backoff: the deadline of an outage."""
    return sum(min(BACKOFF_S * BACKOFF_BASE**i, BACKOFF_CAP_S) for i in range(retries))


class _Outage:
    """This process's view of the endpoint: since when every request failed to reach it.
    Failures further apart than the window are separate outages."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None
        self.last = 0.0
        self.window_s = retry_window_s(10)

    def failed(self, e: BaseException) -> bool:
        """Whether to retry after `e`, a connection failure."""
        now = time.monotonic()
        with self.lock:
            if self.since is None or now - self.last > self.window_s:
                self.since = now
                log.warning("S3 request failed (%s: %s); retrying with backoff for up to %.0f s", type(e).__name__,
                            e, self.window_s)
            self.last = now
            if now - self.since > self.window_s:
                return False  # the endpoint has been gone for the whole window: fail now
            RETRIES[0] += 1
            return True

    def confirmed_down(self) -> None:
        """The endpoint was found down after a whole window of failures elsewhere (the
        workers'): this process's further requests fail at once rather than wait again."""
        with self.lock:
            self.last = time.monotonic()
            self.since = self.last - self.window_s - 1

    def answered(self) -> None:
        if self.since is not None:
            with self.lock:
                if self.since is not None:
                    log.info("S3 answers again after %.0f s", time.monotonic() - self.since)
                self.since = None


OUTAGE = _Outage()


def _retry_connection_errors(e: BaseException) -> bool:
    from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError

    if not isinstance(e, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ConnectionError)):
        return False
    return OUTAGE.failed(e)


class RetryingS3FileSystem(s3fs.S3FileSystem):
    default_retries = 10  # for instances fsspec makes (`use_for_plain_fsspec`): the job's storage.retries

    def __init__(self, *args, retries: int | None = None, **kwargs):
        # One layer of retries, s3fs's, with the policy above; botocore's own would
        # multiply it.
        kwargs.setdefault("config_kwargs", {"retries": {"max_attempts": 1, "mode": "standard"},
                                            "connect_timeout": CONNECT_TIMEOUT_S})
        super().__init__(*args, **kwargs)
        self.retries = int(self.default_retries if retries is None else retries)
        OUTAGE.window_s = retry_window_s(self.retries)
        # s3fs asks one process-wide hook whether an unknown error is worth a retry.
        s3fs.core.CUSTOM_ERROR_HANDLER = _retry_connection_errors

    async def _call_s3(self, method, *akwarglist, **kwargs):
        out = await super()._call_s3(method, *akwarglist, **kwargs)
        OUTAGE.answered()
        return out

    async def _cat_file(self, path, version_id=None, start=None, end=None, **kwargs):
        # cat_ranges goes through here too, one call per range.
        data = await super()._cat_file(path, version_id=version_id, start=start, end=end, **kwargs)
        OUTAGE.answered()
        BYTES_READ[0] += len(data)
        return data


def use_for_plain_fsspec(retries: int) -> None:
    """`fsspec.open("s3://...")` and `fsspec.filesystem("s3")` in this process (the
    workloads' data reads and writes) get the job's policy too."""
    fsspec.register_implementation("s3", RetryingS3FileSystem, clobber=True)
    # Not through fsspec's "s3" config (FSSPEC_S3_RETRIES): fsspec hands that to every
    # s3fs instance, plain s3fs among them, which has no such argument.
    RetryingS3FileSystem.default_retries = retries


def s3_endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")


class S3Backend:
    """s3://bucket/prefix. The endpoint comes from storage.endpoint_url, else
    AWS_ENDPOINT_URL_S3, else AWS; credentials from the environment only."""

    name = "s3"

    def handles(self, uri: str) -> bool:
        return uri.startswith("s3://")

    def check_uri(self, uri: str) -> str | None:
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", uri):
            return f"{uri!r} is not an s3://bucket/prefix URI"
        return None

    def filesystem(self, uri: str, *, endpoint_url: str | None = None, retries: int = 10):
        endpoint = s3_endpoint(endpoint_url)
        if endpoint:  # later plain fsspec calls in this process (dataset writers) use it too
            os.environ.setdefault("FSSPEC_S3_ENDPOINT_URL", endpoint)
        use_for_plain_fsspec(retries)
        return RetryingS3FileSystem(endpoint_url=endpoint, retries=retries), uri[len("s3://"):]

    def worker_env(self, storage) -> dict[str, str]:
        """The endpoint for the workers' boto, s3fs and plain fsspec calls (never the credentials)."""
        endpoint = s3_endpoint(storage.endpoint_url)
        if not endpoint:
            return {}
        return {"AWS_ENDPOINT_URL_S3": endpoint,
                "FSSPEC_S3_ENDPOINT_URL": endpoint}  # fsspec reads s3fs options from FSSPEC_S3_*

    def for_ray(self, uri: str, storage):
        """Ray takes S3 as "bucket/prefix" (no s3://) with a pyarrow-wrapped filesystem."""
        import pyarrow.fs

        fs, path = self.filesystem(uri, endpoint_url=storage.endpoint_url, retries=storage.retries)
        return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))

    def check_reachable(self, uri: str, storage) -> None:
        """The endpoint answers and the bucket exists (longview never creates one)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        bucket = uri[len("s3://"):].split("/", 1)[0]
        endpoint = s3_endpoint(storage.endpoint_url)
        where = endpoint or "AWS S3"
        # A fresh session: the default one caches the credentials it found first.
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
        try:
            client.head_bucket(Bucket=bucket)
        except NoCredentialsError:
            raise InputError(f"no S3 credentials for storage.uri={uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(or an AWS profile), or run `longview up` to use the local services") from None
        except EndpointConnectionError:
            raise InputError(f"the S3 endpoint {where} does not answer (storage.uri={uri}): is it up? `longview up` "
                             "starts the local one") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise InputError(f"storage.uri: bucket {bucket!r} does not exist at {where}: create it (`longview up "
                                 f"--bucket {bucket}` for the local endpoint); longview does not create buckets") from None
            if code in ("403", "AccessDenied"):
                raise InputError(f"storage.uri: access to bucket {bucket!r} at {where} is denied for these "
                                 "credentials") from None
            raise InputError(f"storage.uri: bucket {bucket!r} at {where} cannot be used ({code}: {e})") from None
