"""End to end on real components: a Ray head, an S3-protocol endpoint (moto) and an
MLflow server (sqlite), all on 127.0.0.1, started here and stopped by PID.

The jobs run through the `longview` CLI in subprocesses, as a user runs them.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from orchestrator.checkpoint import CheckpointError, verify
from orchestrator.services import LocalServices

STEPS = 6
COMMON = ["--set", "storage.uri=s3://lvtest/runs", "--set", f"training.steps={STEPS}",
          "--set", "training.checkpoint_every=2", "--set", "data.synthetic.samples=4"]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    home = tmp_path_factory.mktemp("lvhome")
    svc = LocalServices(home)
    started = svc.up(ray_cpus=2, bucket="lvtest")
    env = dict(os.environ, LONGVIEW_HOME=str(home), **svc.env())
    yield started, env
    svc.down()
    for s in started.values():  # every PID is gone
        with pytest.raises(ProcessLookupError):
            os.kill(s.pid, 0)


def cli(env, *args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"longview {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def s3(env):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL_S3"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"])


def mlflow_run(env, name):
    return mlflow_run_in(env, "longview-v2pe", name)


@pytest.fixture(scope="module")
def uninterrupted(services):
    _, env = services
    name = f"a-{uuid.uuid4().hex[:8]}"
    out = cli(env, "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *COMMON).stdout
    client, run = mlflow_run(env, name)
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    return name, out, losses


def test_job_writes_checkpoints_to_s3_and_metrics_to_mlflow(services, uninterrupted):
    _, env = services
    name, out, losses = uninterrupted
    fs = s3(env)
    ckpts = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"lvtest/runs/{name}") if "step-" in p)
    assert ckpts == ["step-0000004", "step-0000006"]  # keep_checkpoints: 2
    last = f"lvtest/runs/{name}/step-0000006"
    names = {p.rsplit("/", 1)[1] for p in fs.ls(last)}
    assert {"manifest-rank0.json", "manifest-rank1.json", "model.pt", "optimizer.pt", "state.json",
            "rng-rank0.pt", "rng-rank1.pt"} <= names
    state = json.loads(fs.cat_file(f"{last}/state.json"))
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    assert fs.exists(f"lvtest/runs/{name}/export/model.safetensors")
    assert fs.exists(f"lvtest/runs/{name}/export/config.json")
    assert f"s3://lvtest/runs/{name}/step-0000006" in out

    client, run = mlflow_run(env, name)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses[-1][1] < losses[0][1]  # it learns
    assert run.data.params["parallelism.cp"] == "2" and run.data.params["model.size"] == "tiny"
    for key in ("tokens_per_s", "samples_per_s", "lr", "grad_norm", "peak_memory_mib"):
        assert len(client.get_metric_history(run.info.run_id, key)) == STEPS, key
    assert run.data.tags["longview.checkpoint_uri"] == f"s3://lvtest/runs/{name}"
    assert run.info.status == "FINISHED"
    # The planner's prediction beside the first step's measured peak (live CPU tensors).
    predicted = client.get_metric_history(run.info.run_id, "memory_predicted_mib")
    measured = client.get_metric_history(run.info.run_id, "memory_measured_mib")
    assert [m.step for m in predicted] == [m.step for m in measured] == [1]
    assert measured[0].value > 0 and predicted[0].value == pytest.approx(
        float(run.data.tags["longview.memory_predicted_gib.total"]) * 1024, rel=1e-3)
    assert "memory per GPU: predicted" in out
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for d in ("config", "plots") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/job.yaml", "plots/loss.png"} <= artifacts, artifacts
    # Artifacts went through the server's proxy into the S3 bucket.
    assert any(p.endswith("loss.png") for p in fs.find("lvtest/mlflow"))
    # Losses in the checkpoint's record and in MLflow agree.
    assert [l for _, l in state["losses"]] == pytest.approx([v for _, v in losses], rel=1e-6)


def test_failed_worker_resumes_with_identical_losses(services, uninterrupted, tmp_path):
    _, env = services
    _, _, want = uninterrupted
    name = f"b-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "raise-3-0"
    fenv = dict(env, LONGVIEW_FAULTS="raise@3", LONGVIEW_FAULT_DIR=str(tmp_path))
    proc = cli(fenv, "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *COMMON)
    assert marker.exists(), "the fault was not injected"
    assert "injected fault at step 3" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr and "at step 2" in proc.stdout + proc.stderr
    client, run = mlflow_run(env, name)
    got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # no step logged twice, none missing
    # CPU, float32, one thread per worker, batches a function of (seed, step): the resumed
    # run recomputes the same numbers; 1e-6 only absorbs printing/transport of floats.
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_job_submission_runs_the_same_job(services):
    started, env = services
    name = f"c-{uuid.uuid4().hex[:8]}"
    proc = cli(env, "submit", "configs/v2pe-demo.yaml", "--set", f"name={name}", "--wait", *COMMON[:2],
               "--set", "training.steps=2", "--set", "training.checkpoint_every=2", "--set", "data.synthetic.samples=2",
               "--set", "parallelism.cp_a2a=2")  # hybrid context parallelism: all-to-all over both ranks
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    assert "SUCCEEDED" in proc.stdout
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(started["ray"].url)
    assert str(client.get_job_status(job_id)) in ("SUCCEEDED", "JobStatus.SUCCEEDED")
    logs = client.get_job_logs(job_id)
    assert "finished: last checkpoint s3://lvtest/runs/" in logs
    assert "dp 1 x cp 2 (all-to-all 2 x ring 1)" in logs
    assert "SUCCEEDED" in cli(env, "status", job_id).stdout
    _, run = mlflow_run(env, name)
    assert run.data.tags.get("longview.ray_job_id") == job_id


def test_bad_config_fails_before_anything_starts(services):
    _, env = services
    proc = cli(env, "train", "configs/v2pe-demo.yaml", "--set", "parallelism.cp=3", check=False, timeout=60)
    assert proc.returncode != 0
    assert "config error: parallelism.cp: 3 does not divide resources.workers=2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_manifest_catches_missing_and_corrupted_files(tmp_path):
    from orchestrator.checkpoint import _write_manifest

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    _write_manifest(tmp_path, 0, ["a.bin"])
    verify(tmp_path, 1)
    with pytest.raises(CheckpointError, match="manifest of rank 1 is missing"):
        verify(tmp_path, 2)
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match="a.bin fails its checksum"):
        verify(tmp_path, 1)


def test_resubmitting_a_finished_job_resumes_from_its_last_checkpoint(services, uninterrupted):
    _, env = services
    name, _, before = uninterrupted
    proc = cli(env, "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *COMMON,
               "--set", f"training.steps={STEPS + 2}")
    assert f"at step {STEPS}" in proc.stdout + proc.stderr  # resumed, not restarted
    client, run = mlflow_run(env, name)  # still one run for the job
    got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in got] == list(range(1, STEPS + 3))
    assert got[:STEPS] == before  # the first six steps were not logged again


def test_tracking_outage_keeps_metrics_until_the_server_is_back(services, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.services import start_mlflow, stop_pid
    from orchestrator.tracking import Tracker, find_or_create_run

    started, env = services
    server = start_mlflow(tmp_path, started["s3"], "lvtest")
    port = int(server.url.rsplit(":", 1)[1])
    run_id, _ = find_or_create_run(server.url, "outage", "outage-run", {})
    tracker = Tracker(server.url, run_id)
    tracker.log_metrics({"loss": 3.0}, step=1)
    stop_pid(server.pid)
    tracker.log_metrics({"loss": 2.0}, step=2)  # server down: kept, not raised
    assert [m.step for m in tracker.pending] == [2]
    server = start_mlflow(tmp_path, started["s3"], "lvtest", port=port)  # same store, same port
    try:
        tracker.log_metrics({"loss": 1.0}, step=3)
        assert tracker.pending == []
        hist = MlflowClient(server.url).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in hist) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    finally:
        stop_pid(server.pid)


def test_piip_job_places_branches_and_resumes_exactly(services, tmp_path):
    """PIIP over three Ray workers, one branch each: per-branch checkpoints and step times,
    and a fault at step 3 resumes with the uninterrupted run's losses."""
    _, env = services
    sets = ["--set", "storage.uri=s3://lvtest/runs", "--set", "training.steps=4", "--set", "training.checkpoint_every=2"]
    a = f"pa-{uuid.uuid4().hex[:8]}"
    cli(env, "train", "configs/piip-demo.yaml", "--set", f"name={a}", *sets)
    client, run = mlflow_run_in(env, "longview-piip", a)
    want = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in want] == [1, 2, 3, 4]
    for b in range(3):
        assert len(client.get_metric_history(run.info.run_id, f"branch{b}_step_s")) == 4
    names = {p.rsplit("/", 1)[1] for p in s3(env).ls(f"lvtest/runs/{a}/step-0000004")}
    assert {f"model-branch{b}.pt" for b in range(3)} | {"manifest-rank2.json", "state.json"} <= names

    b_name = f"pb-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "raise-3-0"
    proc = cli(dict(env, LONGVIEW_FAULTS="raise@3", LONGVIEW_FAULT_DIR=str(tmp_path)), "train",
               "configs/piip-demo.yaml", "--set", f"name={b_name}", *sets)
    assert marker.exists() and "at step 2" in proc.stdout + proc.stderr
    client, run = mlflow_run_in(env, "longview-piip", b_name)
    got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # deterministic CPU float32


def mlflow_run_in(env, experiment, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`longview.run_name` = '{name}'")
    assert len(runs) == 1, f"one MLflow run per job, got {len(runs)}"
    return client, runs[0]
