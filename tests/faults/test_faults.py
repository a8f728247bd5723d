"""Faults injected into real runs (Ray head, S3 behind a cuttable proxy, MLflow server),
each compared with an uninterrupted run of the same job.

Every job is the CPU V2PE demo, shortened: 6 steps, checkpoints every 2 (two kept),
float32 on one thread per worker, so a resumed run recomputes exactly the same losses.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.checkpoint import verify
from tests.faults.conftest import BASE, STEPS, cli, history, train, unique


def s3fs_direct(fs):
    import s3fs

    c = fs["creds"]
    return s3fs.S3FileSystem(endpoint_url=fs["direct_s3"], key=c["AWS_ACCESS_KEY_ID"],
                             secret=c["AWS_SECRET_ACCESS_KEY"])


def fired(fs, *markers):
    return all(os.path.exists(os.path.join(fs["home"], m)) for m in markers)


def resumed_steps(output: str) -> list[int]:
    """The steps a run resumed from, in order (from its '[longview] resumed from' lines)."""
    return [int(line.rsplit("at step ", 1)[1].split()[0]) for line in output.splitlines()
            if "[longview] resumed from" in line]


def assert_same_run(fs, name, want):
    got, run = history(fs, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "a step is missing or was logged twice"
    # Same seed, batches a function of (seed, step), float32 on one thread: the resumed
    # run recomputes the same numbers; 1e-6 only absorbs float printing and transport.
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert run.info.status == "FINISHED"


def test_worker_sigkilled_mid_step_resumes_exactly(fault_services, reference, record):
    fs, name = fault_services, unique("kill")
    out = train(fs, name, faults="kill@3:1")
    text = out.stdout + out.stderr
    assert fired(fs, "kill-3-1") and "injected SIGKILL on rank 1 during step 3" in text
    assert resumed_steps(text) == [2]
    assert_same_run(fs, name, reference[1])
    record("worker SIGKILL mid-step", injected=1, survived=1, steps_lost=3 - 2, data_lost=0)


def test_soak_of_kill_and_resume_cycles(fault_services, reference, record):
    fs, name = fault_services, unique("soak")
    faults = "kill@1:0,kill@3:1,kill@5:0"
    out = train(fs, name, "--set", "training.max_failures=5", faults=faults)
    text = out.stdout + out.stderr
    assert fired(fs, "kill-1-0", "kill-3-1", "kill-5-0")
    assert resumed_steps(text) == [0, 2, 4]  # steps 1-2, 3-4, 5-6 each survived one kill
    assert_same_run(fs, name, reference[1])
    record("kill/resume soak (3 cycles)", injected=3, survived=3, steps_lost=(1 - 0) + (3 - 2) + (5 - 4), data_lost=0)


def test_s3_outage_during_upload_is_retried(fault_services, reference, record):
    fs, name = fault_services, unique("s3blip")
    out = train(fs, name, "--set", "storage.retries=10", faults="s3down@4:0=3")
    text = out.stdout + out.stderr
    assert fired(fs, "s3down-4-0") and "injected S3 outage of 3 s" in text
    assert "S3 request failed" in text and "retrying" in text  # the upload waited it out
    assert resumed_steps(text) == []  # no restart was needed
    assert_same_run(fs, name, reference[1])
    s3 = s3fs_direct(fs)
    local = fs["home"] / f"{name}-step4"
    s3.get(f"lvfault/runs/{name}/step-0000004", str(local), recursive=True)
    verify(local, 2)  # the checkpoint written during the outage is complete and intact
    record("S3 down 3 s during a checkpoint upload", injected=1, survived=1, steps_lost=0, data_lost=0)


def test_s3_outage_beyond_the_retries_keeps_the_previous_checkpoint(fault_services, reference, record):
    fs = fault_services
    # training.max_failures=0: the run stops with a clear error naming the checkpoint.
    name = unique("s3fail")
    out = train(fs, name, "--set", "storage.retries=2", "--set", "training.max_failures=0",
                faults="s3down@4:0=6", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"checkpoint step-0000004 of {name} could not be uploaded" in text
    assert "Traceback" not in out.stderr.split("error:")[-1]  # the CLI's last word is the message
    time.sleep(6)  # let the outage end before looking at storage
    s3 = s3fs_direct(fs)
    steps = sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"lvfault/runs/{name}") if "step-" in p)
    assert "step-0000002" in steps
    # with retries left to Ray (max_failures=2) the run goes on from the previous checkpoint
    name2 = unique("s3resume")
    out = train(fs, name2, "--set", "storage.retries=2", "--set", "training.max_failures=2",
                faults="s3down@4:1=6")
    text = out.stdout + out.stderr
    assert "could not be uploaded" in text and resumed_steps(text) == [2]
    assert_same_run(fs, name2, reference[1])
    record("S3 down 6 s (past the retries) during an upload", injected=2, survived=1, steps_lost=4 - 2, data_lost=0,
           note="max_failures=0: clear error; max_failures=2: resumed from the previous checkpoint")


def test_corrupted_checkpoint_falls_back_to_the_previous_one(fault_services, reference, record):
    fs = fault_services
    name = unique("corrupt")
    train(fs, name)
    s3 = s3fs_direct(fs)
    key = f"lvfault/runs/{name}/step-0000006/model.pt"
    blob = bytearray(s3.cat_file(key))
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    s3.pipe_file(key, bytes(blob))
    out = train(fs, name, "--set", f"training.steps={STEPS + 2}")
    text = out.stdout + out.stderr
    assert "step-0000006" in text and "model.pt fails its checksum" in text
    assert "falling back to step-0000004" in text
    assert resumed_steps(text) == [4]
    got, _ = history(fs, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 3))  # 5 and 6 recomputed, not logged twice
    assert [v for _, v in got[:STEPS]] == pytest.approx([v for _, v in reference[1]], rel=1e-6)
    record("corrupted object in the latest checkpoint", injected=1, survived=1, steps_lost=6 - 4, data_lost=0)


def test_mlflow_restart_mid_run_loses_no_metric(fault_services, reference, record):
    from orchestrator.services import start_mlflow, stop_pid

    fs = fault_services
    name = unique("mlflow")
    env = dict(fs["env"])
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                             "--set", f"name={name}", *BASE, "--set", "training.steps=30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mlflow = fs["started"]["mlflow"]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the run is logging
            try:
                if len(history(fs, name)[0]) >= 2:
                    break
            except (IndexError, AttributeError):
                pass
            time.sleep(1)
        else:
            raise AssertionError("the run never logged two steps")
        stop_pid(mlflow.pid)
        time.sleep(8)  # training goes on meanwhile
        port = int(mlflow.url.rsplit(":", 1)[1])
        restarted = start_mlflow(fs["home"], fs["started"]["s3"], "lvfault", port=port)
        fs["svc"]._write({**fs["svc"].read(), "mlflow": restarted})  # `down` stops the new one
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "unreachable" in out  # the tracker noticed, kept the metrics
    got, run = history(fs, name)
    assert [s for s, _ in got] == list(range(1, 31))
    assert run.info.status == "FINISHED"
    record("MLflow server stopped and restarted mid-run", injected=1, survived=1, steps_lost=0, data_lost=0)


def test_stalled_rank_fails_the_run_naming_the_group(fault_services, record):
    fs = fault_services
    name = unique("stall")
    t0 = time.monotonic()
    out = train(fs, name, "--set", "parallelism.timeout_s=10", "--set", "training.max_failures=0",
                faults="stall@2:1", check=False, timeout=400)
    took = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "injected stall on rank 1 at step 2" in text
    assert "timed out" in text and "context-parallel group cp[dp=0] (ranks 0, 1)" in text, text[-3000:]
    # The designed outcome is a clean failure, not survival: a stuck peer cannot be resumed
    # around without a restart, which max_failures=0 forbids here.
    record("one rank stalls inside a collective", injected=1, survived=0, steps_lost=0, data_lost=0,
           note=f"failed with a timeout naming the group after {took:.0f} s (timeout 10 s)")


def test_driver_disconnect_leaves_the_job_running(fault_services, record):
    fs = fault_services
    name = unique("detach")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "submit", "configs/v2pe-demo.yaml",
                             "--set", f"name={name}", *BASE, "--wait"], env=fs["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job_id = None
    for line in proc.stdout:
        if "submitted job " in line:
            job_id = line.split("submitted job ", 1)[1].split()[0]
            break
    assert job_id, "no job id printed"
    os.killpg(proc.pid, signal.SIGKILL)  # the client vanishes, as a closed laptop would
    proc.wait()
    deadline = time.monotonic() + 600
    status = ""
    while time.monotonic() < deadline:
        status = cli(fs["env"], "status", job_id).stdout
        if "SUCCEEDED" in status or "FAILED" in status:
            break
        time.sleep(3)
    assert "SUCCEEDED" in status, status
    logs = cli(fs["env"], "logs", job_id).stdout
    assert "finished: last checkpoint s3://lvfault/runs/" in logs
    record("submitting client killed (driver disconnect)", injected=1, survived=1, steps_lost=0, data_lost=0)
