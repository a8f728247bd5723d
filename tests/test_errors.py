"""The one line a user is told (orchestrator/errors.py), and MLflow failures that are never fatal."""

import logging

from orchestrator.errors import failure_reason
from orchestrator.tracking import not_fatal


def test_failure_reason_finds_our_error_inside_rays():
    class WorkerGroupError(RuntimeError):
        pass

    nested = WorkerGroupError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...\n"
                              "parallelism.dims.CollectiveTimeout: all-gather of rows on context-parallel group "
                              "cp[dp=0] (ranks 0, 1) timed out on global rank 0\n")
    assert failure_reason(nested).startswith("CollectiveTimeout: all-gather of rows on context-parallel group")
    ray_own = RuntimeError('botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: '
                           '"http://s3/b/run/snapshot.json"')
    assert failure_reason(ray_own, storage_retries=3) == (
        'S3 endpoint unreachable after storage.retries=3 attempts: Could not connect to the endpoint URL: '
        '"http://s3/b/run/snapshot.json"')
    assert failure_reason(ValueError("plain\nlast line")) == "last line"


def test_an_mlflow_failure_is_one_warning_naming_what_was_not_logged(caplog):
    reached = []
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        with not_fatal("the exported model", "s3://b/run/export"):
            raise ConnectionError("Connection refused\nmore detail")
        with not_fatal("the training data"):
            reached.append(1)  # no failure: nothing said
    assert reached == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "the exported model not logged to MLflow (ConnectionError: Connection refused); it is at s3://b/run/export"]
