"""`longview up` never disturbs what runs: a service that answers is kept, a dead one is
started again on its old address, with what it held. Against the real processes: the
S3 endpoint killed with SIGKILL, MLflow's recorded process killed while its child still
serves."""

import os
import signal

import pytest

from orchestrator.services import LocalServices, _s3_client


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
        except OSError:
            pass
    return out


def test_up_keeps_what_answers_and_restarts_only_what_died(tmp_path):
    svc = LocalServices(tmp_path)
    first = svc.up(bucket="lv-one", ray=False)
    try:
        s3 = _s3_client(first["s3"].url)
        s3.put_object(Bucket="lv-one", Key="runs/a/step-0000002/manifest.json", Body=b'{"step": 2}')
        big = os.urandom(9 << 20)  # above boto3's multipart threshold: a multipart upload
        s3.upload_fileobj(__import__("io").BytesIO(big), "lv-one", "runs/a/state.distcp")
        # A second `up` (another terminal, `make demo`) while all answer: nothing restarts.
        again = svc.up(bucket="lv-two", ray=False)
        assert {k: v.pid for k, v in again.items()} == {k: v.pid for k, v in first.items()}
        assert all(v.extra["reused"] for v in again.values())
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"lv-one", "lv-two"}  # the new bucket is made

        # The endpoint is killed: what it acknowledged is on disk, and `up` brings it back
        # on the same address, MLflow left as it is.
        os.kill(first["s3"].pid, signal.SIGKILL)
        os.waitpid(first["s3"].pid, 0)
        assert not svc.answers(first["s3"])
        assert (svc.objects_dir / "lv-one" / "runs/a/state.distcp").read_bytes() == big
        third = svc.up(bucket="lv-one", ray=False)
        assert third["s3"].pid != first["s3"].pid and "reused" not in third["s3"].extra
        assert third["s3"].url == first["s3"].url and third["mlflow"].pid == first["mlflow"].pid
        s3 = _s3_client(third["s3"].url)
        assert s3.get_object(Bucket="lv-one", Key="runs/a/state.distcp")["Body"].read() == big
        assert s3.get_object(Bucket="lv-one", Key="runs/a/step-0000002/manifest.json")["Body"].read() == b'{"step": 2}'

        # MLflow's recorded process dies while a child of it still serves: it does not
        # count as running; `up` stops the child with its group and starts MLflow again.
        mlflow_pid = first["mlflow"].pid
        orphans = _children(mlflow_pid)
        os.kill(mlflow_pid, signal.SIGKILL)
        os.waitpid(mlflow_pid, 0)
        assert not svc.answers(first["mlflow"])
        fourth = svc.up(bucket="lv-one", ray=False)
        assert fourth["mlflow"].pid != mlflow_pid and fourth["mlflow"].url == first["mlflow"].url
        assert fourth["s3"].pid == third["s3"].pid and svc.answers(fourth["mlflow"])
        assert not [p for p in orphans if _alive(p)], orphans
    finally:
        stopped = svc.down()
    assert stopped == ["mlflow", "s3"]
    assert not [p for p in (fourth["s3"].pid, fourth["mlflow"].pid) if _alive(p)]
    with pytest.raises(FileNotFoundError):
        open(svc.state_file)
    # `down` saves nothing (there is nothing only in memory): the objects stay as files.
    assert (svc.objects_dir / "lv-one" / "runs/a/step-0000002/manifest.json").read_bytes() == b'{"step": 2}'


def test_a_ray_head_whose_dashboard_never_answers_is_started_again(monkeypatch, tmp_path):
    """The retry itself, without a real head: the first try's dashboard does not answer, the
    second's does; a head that exits is not retried (its log says why, once)."""
    from orchestrator import services

    tries = []

    def once(state_dir, num_cpus, host, autoscaling_yaml, ports):
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
