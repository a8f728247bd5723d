"""`longview up` twice: healthy services are reused (a second `make demo` finds them),
and a set where one died is restarted whole. S3 only: the logic is the same for all
three, and moto starts in a second or two."""

import os

import pytest

from orchestrator.services import LocalServices


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_up_reuses_what_answers_and_restarts_what_died(tmp_path):
    svc = LocalServices(tmp_path)
    first = svc.up(bucket="lv-one", ray=False, mlflow=False)
    try:
        again = svc.up(bucket="lv-two", ray=False, mlflow=False)
        assert again["s3"].pid == first["s3"].pid and again["s3"].extra["reused"]
        import boto3

        from orchestrator.services import LOCAL_CREDENTIALS

        s3 = boto3.client("s3", endpoint_url=again["s3"].url, region_name="us-east-1",
                          aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"lv-one", "lv-two"}  # the new bucket is made
        os.killpg(first["s3"].pid, 9)  # the endpoint dies behind the state file's back
        os.waitpid(first["s3"].pid, 0)
        assert not svc.answers(first["s3"])
        third = svc.up(bucket="lv-one", ray=False, mlflow=False)
        assert third["s3"].pid != first["s3"].pid and "reused" not in third["s3"].extra
        assert svc.answers(third["s3"]) and svc.read()["s3"].pid == third["s3"].pid
    finally:
        stopped = svc.down()
    assert stopped == ["s3"] and not _alive(svc_pid := third["s3"].pid), svc_pid
    with pytest.raises(FileNotFoundError):
        open(svc.state_file)
