"""The checks before a job starts: one line each, naming what is missing and what to do,
against a real S3-protocol endpoint (rclone on 127.0.0.1)."""

import subprocess
import sys

import pytest

from orchestrator.config import load_config
from orchestrator.preflight import InputError, check_inputs, check_storage
from orchestrator.services import LOCAL_CREDENTIALS, free_port, start_s3, stop_pid

DEMO = "configs/v2pe-demo.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    svc = start_s3(tmp_path_factory.mktemp("s3"), ["there"])
    yield svc.url
    stop_pid(svc.pid)


def _cfg(**sets):
    return load_config(DEMO, overrides={"name": "pre", **sets})


def test_storage_is_checked_not_created(s3, monkeypatch):
    for k, v in LOCAL_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    check_storage(_cfg(**{"storage.uri": "s3://there/runs", "storage.endpoint_url": s3}))
    with pytest.raises(InputError, match=rf"storage.uri: bucket 'typo' does not exist at {s3}: create it "
                                         r"\(`longview up --bucket typo` for the local endpoint\); longview does not "
                                         "create buckets"):
        check_storage(_cfg(**{"storage.uri": "s3://typo/runs", "storage.endpoint_url": s3}))
    import boto3

    names = {b["Name"] for b in boto3.client("s3", endpoint_url=s3).list_buckets()["Buckets"]}
    assert names == {"there"}  # the typo did not become a bucket
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match=rf"the S3 endpoint {down} does not answer .* `longview up` starts"):
        check_storage(_cfg(**{"storage.uri": "s3://there/runs", "storage.endpoint_url": down}))


def test_missing_credentials_point_at_longview_up(s3, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InputError, match=r"no S3 credentials for storage.uri=s3://there/runs: .* run `longview up`"):
        check_storage(_cfg(**{"storage.uri": "s3://there/runs", "storage.endpoint_url": s3}))


def test_inputs_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(InputError, match=rf"DataError: data.train: {tmp_path}/none.jsonl is not a file"):
        check_inputs(_cfg(**{"data.train": f"{tmp_path}/none.jsonl"}))
    with pytest.raises(InputError, match=rf"ConfigError: model.pretrained: {tmp_path}/no-model has no config.json"):
        check_inputs(_cfg(**{"model.pretrained": str(tmp_path / "no-model"), "model.overrides": {}}))


def test_train_without_services_is_one_line(tmp_path):
    """No `longview up`, no credentials: one line that says to run it, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LONGVIEW_HOME": str(tmp_path / "lv"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", DEMO], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training v2pe-demo failed: no S3 credentials for storage.uri=s3://longview/runs: set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile), or run `longview up` to use the local "
        "services")
