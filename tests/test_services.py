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


def test_the_local_s3_keeps_its_objects_across_down_and_up(tmp_path):
    """moto holds objects in memory: `down` writes them under LONGVIEW_HOME and `up` puts
    them back, so a local run's checkpoints survive a restart of the services."""
    from orchestrator.services import _s3_client

    svc = LocalServices(tmp_path)
    url = svc.up(bucket="lv-keep", ray=False, mlflow=False)["s3"].url
    try:
        s3 = _s3_client(url)
        s3.put_object(Bucket="lv-keep", Key="runs/a/step-0000002/manifest.json", Body=b'{"step": 2}')
        s3.put_object(Bucket="lv-keep", Key="runs/a/gone.bin", Body=b"x" * 10)
        big = os.urandom(9 << 20)  # above boto3's multipart threshold: another kind of ETag
        s3.put_object(Bucket="lv-keep", Key="runs/a/state.distcp", Body=big)
    finally:
        svc.down()
    assert (svc.objects_dir / "lv-keep" / "runs/a/step-0000002/manifest.json").read_bytes() == b'{"step": 2}'
    url = svc.up(bucket="lv-keep", ray=False, mlflow=False)["s3"].url
    try:
        s3 = _s3_client(url)
        assert s3.get_object(Bucket="lv-keep", Key="runs/a/step-0000002/manifest.json")["Body"].read() == b'{"step": 2}'
        assert s3.get_object(Bucket="lv-keep", Key="runs/a/state.distcp")["Body"].read() == big
        s3.delete_object(Bucket="lv-keep", Key="runs/a/gone.bin")  # deleted while up: gone after the next down
    finally:
        svc.down()
    assert not (svc.objects_dir / "lv-keep" / "runs/a/gone.bin").exists()
    url = svc.up(bucket="lv-keep", ray=False, mlflow=False)["s3"].url
    try:
        keys = {o["Key"] for o in _s3_client(url).list_objects_v2(Bucket="lv-keep")["Contents"]}
        assert keys == {"runs/a/step-0000002/manifest.json", "runs/a/state.distcp"}
    finally:
        svc.down(keep_objects=False)


def test_a_ray_head_whose_dashboard_never_answers_is_started_again(monkeypatch, tmp_path):
    """The retry itself, without a real head: the first try's dashboard does not answer, the
    second's does; a head that exits is not retried (its log says why, once)."""
    from orchestrator import services

    tries = []

    def once(state_dir, num_cpus, host, autoscaling_yaml):
        tries.append(num_cpus)
        if len(tries) == 1:
            raise services.NotAnswering("http://127.0.0.1:1/api/version did not answer within 120s")
        return services.Service("ray", 1, "http://127.0.0.1:2", "log")

    monkeypatch.setattr(services, "_start_ray_once", once)
    assert services.start_ray(tmp_path, 2).url == "http://127.0.0.1:2" and tries == [2, 2]

    def exits(*_):
        tries.append("exit")
        raise services.ServiceError("http://127.0.0.1:1: the process exited with 1 before answering")

    tries.clear()
    monkeypatch.setattr(services, "_start_ray_once", exits)
    with pytest.raises(services.ServiceError, match="exited with 1"):
        services.start_ray(tmp_path, 2)
    assert tries == ["exit"]


def test_ray_head_ports_are_distinct():
    from parallelism.local_world import free_ports

    ports = free_ports(7)
    assert len(set(ports)) == 7 and all(p > 0 for p in ports)
