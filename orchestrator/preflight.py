"""Checks that cost seconds before a job starts or is submitted, and save minutes: the
run's storage answers and its bucket exists (longview never creates one: `longview up`
does for the local endpoint), the workload's inputs are there and load
(`WorkloadSpec.check_inputs`), and MLflow answers (a warning only: training never
waits on it). Each failure is one `InputError` line that says what to do."""

from __future__ import annotations

import logging
import os

from .config import ConfigError
from .storage import s3_endpoint

log = logging.getLogger(__name__)


class InputError(RuntimeError):
    """Something the job needs is missing or unreachable; the message says what to do."""


def check_storage(cfg) -> None:
    uri = cfg.storage.uri
    if not uri.startswith("s3://"):
        folder = uri or os.path.abspath("longview-runs")
        parent = folder
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise InputError(f"storage.uri: {folder} cannot be written ({parent} is not writable)")
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket = uri[len("s3://"):].split("/", 1)[0]
    endpoint = s3_endpoint(cfg.storage.endpoint_url)
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


def check_tracking(cfg) -> None:
    """A warning when MLflow does not answer: the run starts anyway and is sent later."""
    if not cfg.tracking.uri:
        return
    import urllib.request

    try:
        with urllib.request.urlopen(cfg.tracking.uri.rstrip("/") + "/health", timeout=5):
            pass
    except Exception as e:  # noqa: BLE001 - any failure to answer
        log.warning("MLflow at %s does not answer (%s); the run starts anyway and its records are sent when it "
                    "answers", cfg.tracking.uri, type(e).__name__)


def check_inputs(cfg) -> None:
    """The workload's own checks, as one InputError."""
    try:
        cfg.spec.check_inputs(cfg)
    except (ConfigError, ValueError, OSError) as e:  # FieldError, DataError, TokenizerError are ValueErrors
        raise InputError(f"{type(e).__name__}: {e}") from None
