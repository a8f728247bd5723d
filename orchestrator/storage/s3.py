"""S3 storage (AWS or any S3-protocol endpoint), with retries that ride out an
unreachable endpoint.

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
import re
import time

import s3fs
import s3fs.core

from ..errors import InputError

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
