"""What a resume may change: the rules of the config sections, the driver's check, and
the schedule taking a changed learning rate."""

import os

import pytest
import torch

from orchestrator import resume
from orchestrator.config import load_config, to_dict
from workloads.engine import TrainingConfig, build_engine, lr_lambda

DEMO = "configs/v2pe-demo.yaml"


def _check(old_sets=None, engine="none", world_size=2, **new_sets):
    def dotted(sets):
        return {k.replace("__", "."): v for k, v in sets.items()}

    old = to_dict(load_config(DEMO, overrides=dotted(old_sets or {})))
    cfg = load_config(DEMO, overrides=dotted(new_sets))
    return resume.check(old, cfg, checkpoint="s3://b/runs/x/step-0000004", world_size=world_size, engine=engine)


def test_safe_changes_are_applied_and_listed():
    got = _check(training__lr=0.03, training__steps=9, evaluation__samples_per_length=3,
                 tracking__uri="http://127.0.0.1:5999")
    assert {(c.key, c.old, c.new) for c in got} == {
        ("training.lr", 0.003, 0.03), ("training.steps", 400, 9), ("evaluation.samples_per_length", 50, 3),
        ("tracking.uri", None, "http://127.0.0.1:5999")}
    assert all(c.rule == resume.APPLY for c in got)
    assert "training.lr: 0.003 -> 0.03" in resume.describe(got)
    assert _check() == []


@pytest.mark.parametrize("sets, key, why", [
    ({"model__overrides": {"vision_image_size": 56}}, "model.overrides", "incompatible with the checkpoint"),
    ({"model__size": "internvl2-2b", "model__overrides": {}}, "model.size", "incompatible"),
    ({"data__synthetic__samples": 12}, "data.synthetic.samples", "incompatible"),  # nested: its section's rule
    ({"data__tokenizer": "byte"}, "data.tokenizer", "incompatible"),
    ({"tracking__experiment": "other"}, "tracking.experiment", "can change only in a new run"),
    ({"training__seed": 7}, "training.seed", "can change only in a new run"),
    ({"resources__workers": 4}, "resources.workers", "data-parallel degree 1 -> 2"),
    ({"parallelism__cp": 1}, "parallelism.cp", "data-parallel degree 1 -> 2"),
])
def test_changes_a_run_cannot_take_are_refused_by_name(sets, key, why):
    with pytest.raises(resume.ResumeRefused) as e:
        _check(**sets)
    msg = str(e.value)
    assert f"{key}: " in msg and why in msg and "s3://b/runs/x/step-0000004" in msg, msg
    assert "start a new run under another name" in msg


def test_every_refused_key_is_named_at_once():
    with pytest.raises(resume.ResumeRefused) as e:
        _check(training__lr=0.03, model__overrides={"vision_image_size": 56}, training__seed=3)
    msg = str(e.value)
    assert "model.overrides" in msg and "training.seed: 0 -> 3" in msg and "training.lr" not in msg


def test_a_fixed_global_batch_lets_the_layout_change():
    old = {"training__global_batch": 4}
    got = _check(old, training__global_batch=4, resources__workers=4, parallelism__cp=1)
    assert {c.key for c in got} == {"resources.workers", "parallelism.cp"}


def test_deepspeed_shards_name_the_worker_count_they_need():
    with pytest.raises(resume.ResumeRefused) as e:
        _check({"training__global_batch": 4}, engine="deepspeed", training__global_batch=4, resources__workers=4,
               parallelism__cp=2)
    assert "ZeRO shards resume only on as many workers as wrote them (2)" in str(e.value)
    assert "incomplete" not in str(e.value)


def test_a_restored_schedule_takes_the_new_learning_rate_and_length():
    """LambdaLR's saved state carries the lr it was built with; a resume with another
    training.lr / steps must run on the new curve from the restored step."""
    model = torch.nn.Linear(4, 2)
    first = TrainingConfig(lr=1e-2, steps=10, warmup_steps=0, sharding="none")
    engine = build_engine(model, first)
    for _ in range(3):
        engine.backward(model(torch.ones(2, 4)).sum())
        engine.step()
    tensors, sched = engine.state_tensors(), engine.scheduler.state_dict()
    second = TrainingConfig(lr=1e-1, steps=20, warmup_steps=0, sharding="none")
    resumed = build_engine(torch.nn.Linear(4, 2), second)
    resumed.load_state_tensors({k: v.clone() for k, v in tensors.items()}, sched)
    assert resumed.scheduler.last_epoch == 3
    assert resumed.lr == pytest.approx(1e-1 * lr_lambda(second)(3))  # not 1e-2's curve, not step 0's
    resumed.backward(resumed.module(torch.ones(2, 4)).sum())
    resumed.step()
    assert resumed.lr == pytest.approx(1e-1 * lr_lambda(second)(4))


def test_failures_a_restart_would_meet_again_are_not_retried():
    from orchestrator.launch import retriable
    from workloads.data_errors import DataError
    from workloads.engine import DivergenceError

    class WorkerGroupError(RuntimeError):  # Ray Train's shape: per-rank errors, each wrapping the worker's
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    class Wrapped(Exception):
        def __init__(self, base):
            self._base_exc = base

    assert retriable(WorkerGroupError({0: Wrapped(RuntimeError("injected fault")), 1: Wrapped(ConnectionError())}))
    for bad in (DataError("data.jsonl line 3: not JSON"), DivergenceError("step 2: loss nan"),
                FileNotFoundError("s3://b/x.png"), OSError(28, "No space left on device")):
        assert not retriable(WorkerGroupError({0: Wrapped(RuntimeError("peer gone")), 1: Wrapped(bad)})), bad
    try:  # a cause further down the chain counts too
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("checkpoint write failed") from e
    except RuntimeError as e:
        assert not retriable(e)


def test_a_failure_that_met_the_storage_down_is_named_as_the_outage():
    """A run that ends on a failure its storage outage caused (a checkpoint whose upload
    met the endpoint gone, next to an error that is not retried) is checked against the
    storage first, so its line names the outage (StorageUnreachable), not the symptom."""
    from orchestrator.launch import _met_storage_outage
    from workloads.data_errors import DataError

    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    cut = RuntimeError("checkpoint step-0000002 could not be written to s3://b/r/step-0000002 (rank 0 writing "
                       "manifest.json: ConnectionClosedError: Connection was closed before we received a valid "
                       "response from endpoint URL: \"http://127.0.0.1:9/b\")")
    assert _met_storage_outage(WorkerGroupError({0: cut, 1: FileNotFoundError("s3://b/r/x")}))
    assert not _met_storage_outage(WorkerGroupError({0: DataError("data.jsonl line 3: not JSON")}))
    assert not _met_storage_outage(OSError(28, "No space left on device"))


# --- one run, one identity: the lease and the run record on a real S3 endpoint ---------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from orchestrator.services import start_s3, stop_pid

    svc = start_s3(tmp_path_factory.mktemp("s3"), ["lease"])
    yield svc.url
    stop_pid(svc.pid)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The endpoint's credentials, and fsspec's endpoint variable (which the storage layer
    sets for plain fsspec calls) restored after the test."""
    from orchestrator.services import LOCAL_CREDENTIALS

    for k, v in LOCAL_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3)
    return s3


def _cfg(s3, name):
    return load_config(DEMO, overrides={"name": name, "storage.uri": "s3://lease/runs", "storage.endpoint_url": s3})


HOLD = """
import sys, time
from orchestrator.config import load_config
from orchestrator.identity import RunLease
cfg = load_config({demo!r}, overrides={{"name": {name!r}, "storage.uri": "s3://lease/runs",
                                       "storage.endpoint_url": {s3!r}}})
with RunLease(cfg):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_a_run_fails_at_once_naming_the_holder(s3_env, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    from orchestrator import identity
    from orchestrator.services import LOCAL_CREDENTIALS

    s3 = s3_env
    cfg = _cfg(s3, "leased")
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(demo=DEMO, name="leased", s3=s3)],
                              env=dict(os.environ, **LOCAL_CREDENTIALS), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(identity.RunBusy) as e:
            with identity.RunLease(cfg):
                pass
        assert time.monotonic() - t0 < 10  # at once, not after a timeout
        assert f"pid {holder.pid} on " in str(e.value) and "run leased is being written by" in str(e.value)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder died without letting go: a process of this machine that is gone is passed over.
    with identity.RunLease(cfg) as lease:
        assert lease._read()["pid"] == os.getpid()
    assert lease._read() is None  # given back
    # Two drivers that both find the lease free: exactly one goes on.
    monkeypatch.setattr(identity, "SETTLE_S", 1.0)
    import threading

    results = []

    def start():
        try:
            with identity.RunLease(cfg):
                results.append("ran")
                time.sleep(2)
        except identity.RunBusy:
            results.append("busy")

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["busy", "ran"]


def test_the_run_record_binds_storage_to_its_mlflow_run(s3_env):
    from orchestrator import identity

    cfg = _cfg(s3_env, "recorded")
    assert identity.read_run_record(cfg) is None
    identity.write_run_record(cfg, "abc123")
    assert identity.read_run_record(cfg) == {"mlflow_run_id": "abc123", "experiment": "longview-v2pe",
                                             "tracking_uri": None}


def test_a_new_run_on_a_local_folder_takes_its_lease_without_its_folder_made(tmp_path):
    """storage.uri a local folder that holds nothing of the run yet: its first write (the
    lease) makes <uri>/<name>/, as a write to an object store would."""
    from orchestrator import identity

    cfg = load_config(DEMO, overrides={"name": "fresh", "storage.uri": str(tmp_path / "runs")})
    with identity.RunLease(cfg) as lease:
        assert (tmp_path / "runs" / "fresh" / "lease.json").is_file() and lease._read()["pid"] == os.getpid()
    assert not (tmp_path / "runs" / "fresh" / "lease.json").exists()
