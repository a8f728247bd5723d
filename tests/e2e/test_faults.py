"""Faults injected into real runs (Ray head, S3 behind a cuttable proxy, MLflow server),
each compared with an uninterrupted run of the same job.

Every job is the CPU V2PE demo, shortened: 6 steps, checkpoints every 2 (two kept),
float32 on one thread per worker, so a resumed run recomputes exactly the same losses.
"""

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import load_config
from orchestrator.tracking import mlflow_client
from tests.e2e.conftest import (
    BASE,
    BUCKET,
    STEPS,
    cli,
    fault_dir,
    history,
    mlflow_run,
    one_line_failure,
    run_log,
    s3fs_direct,
    train,
    unique,
)


def fired(fs, name, *markers):
    """Whether job `name` fired these faults (their marker files exist)."""
    return all((fault_dir(fs, name) / m).exists() for m in markers)


def resumed(fs, name) -> list[int]:
    """The steps the run went back to, in order (MLflow's record: every resume logs one)."""
    return [int(v) for _, v in history(fs, name, "resumed_from_step")[0]]


def wait_for_steps(fs, name, n, timeout_s=300):
    """Waits until job `name` has logged `n` steps to MLflow."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(history(fs, name)[0]) >= n:
                return
        except (IndexError, AttributeError):  # no run yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"job {name} never logged {n} steps")


def assert_same_run(fs, name, want):
    got, run = history(fs, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "a step is missing or was logged twice"
    # Same seed, batches a function of (seed, step), float32 on one thread: the resumed
    # run recomputes the same numbers; 1e-6 only absorbs float printing and transport.
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert run.info.status == "FINISHED"


def test_worker_sigkilled_mid_step_resumes_exactly(services, reference, record):
    fs, name = services, unique("kill")
    train(fs, name, faults="kill@3:1")
    assert fired(fs, name, "kill-3-1")  # the marker is written just before the kill
    assert resumed(fs, name) == [2]
    assert_same_run(fs, name, reference[1])
    record("worker SIGKILL mid-step", injected=1, survived=1, steps_lost=3 - 2, data_lost=0)


def test_soak_of_kill_and_resume_cycles(services, reference, record):
    fs, name = services, unique("soak")
    faults = "kill@1:0,kill@3:1,kill@5:0"
    train(fs, name, "--set", "training.max_failures=5", faults=faults)
    assert fired(fs, name, "kill-1-0", "kill-3-1", "kill-5-0")
    # The kill in step 1 comes before the first checkpoint: that restart begins afresh;
    # the kills in steps 3 and 5 go back to the checkpoints of steps 2 and 4.
    assert resumed(fs, name) == [2, 4]
    assert_same_run(fs, name, reference[1])
    record("kill/resume soak (3 cycles)", injected=3, survived=3, steps_lost=(1 - 0) + (3 - 2) + (5 - 4), data_lost=0)


def test_s3_outage_during_upload_is_retried(services, reference, record):
    fs, name = services, unique("s3blip")
    train(fs, name, "--set", "storage.retries=10", faults="s3down@4:0=3")
    assert fired(fs, name, "s3down-4-0")
    retries, _ = history(fs, name, "storage_retries")
    # The step-4 upload runs in the background during steps 5 and 6 and waits the outage
    # out; its retries are logged with the next step's metrics, or at the end of the run.
    assert retries and retries[0][0] >= 5 and retries[-1][1] > 0, retries
    assert resumed(fs, name) == []  # no restart was needed
    assert_same_run(fs, name, reference[1])
    store = CheckpointStore(s3fs_direct(fs), f"lve2e/runs/{name}", f"s3://lve2e/runs/{name}")
    store.verify("step-0000004")  # the checkpoint written during the outage is complete and intact
    record("S3 down 3 s during a checkpoint upload", injected=1, survived=1, steps_lost=0, data_lost=0)


def test_s3_outage_beyond_the_retries_fails_clearly_and_keeps_the_previous_checkpoint(services, record):
    fs = services
    name = unique("s3fail")
    # storage.retries=2 rides out ~0.3 s; the outage lasts 6 s. training.max_failures=0:
    # the run stops (with restarts left, Ray would restart the workers and resume from
    # step 2 once S3 is back, unless its own controller met the outage first).
    out = train(fs, name, "--set", "storage.retries=2", "--set", "training.max_failures=0",
                faults="s3down@4:0=6", check=False)
    assert fired(fs, name, "s3down-4-0")
    last = one_line_failure(out, f"error: training {name} failed: ")  # the CLI's verdict: the cause, last
    # Whichever process met the outage first (a worker's upload, or Ray's controller
    # writing its own record) the message names the storage it could not reach.
    assert (f"checkpoint step-0000004 could not be written to s3://lve2e/runs/{name}/step-0000004" in last
            or "S3 endpoint unreachable after storage.retries=2 attempts" in last), last
    assert f"lve2e/runs/{name}" in last
    # The MLflow run is not left RUNNING, and says why it failed (the CLI's line).
    _, run = mlflow_run(fs, name)
    assert run.info.status == "FAILED" and run.data.tags["longview.failure"] == last.split(" failed: ", 1)[1]
    assert run.data.tags["mlflow.note.content"].startswith("Training failed: ")
    time.sleep(6)  # let the outage end before looking at storage
    store = CheckpointStore(s3fs_direct(fs), f"lve2e/runs/{name}", f"s3://lve2e/runs/{name}")
    store.verify("step-0000002")  # the previous checkpoint is intact: a resubmission resumes from it
    train(fs, name)
    back_to = resumed(fs, name)[0]
    assert back_to in (2, 4)  # step 4 only if every rank's upload had completed
    # After the successful resume the run's description is the run as it now is.
    _, run = mlflow_run(fs, name)
    note = run.data.tags["mlflow.note.content"]
    assert run.info.status == "FINISHED" and "Finished at step" in note and "failed" not in note, note
    record("S3 down 6 s (past storage.retries) during an upload", injected=1, survived=0, steps_lost=4 - back_to,
           data_lost=0, note="the run stops with an error naming the storage; resubmitted, it resumes")


def test_a_bad_image_met_by_a_worker_is_one_line_naming_the_sample(services):
    """A PNG whose header reads but whose pixels are cut off passes the driver's index (it
    reads headers only) and fails where a worker decodes it: the run ends with one line
    naming the sample and the file; Ray's tracebacks are in the run's log."""
    import io
    import json

    from PIL import Image

    fs = services
    name = unique("badimg")
    root = f"{BUCKET}/data/{name}"
    s3 = s3fs_direct(fs)
    lines = []
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), (40 * i, 90, 200)).save(buf, format="PNG")
        png = buf.getvalue()
        s3.pipe_file(f"{root}/image/{i}.png", png[: len(png) // 2] if i == 2 else png)  # sample 2: truncated
        lines.append(json.dumps({"id": f"s{i}", "image": [f"{i}.png"], "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is image {i}?"}, {"from": "gpt", "value": str(i)}]}))
    s3.pipe_file(f"{root}/annotation/train.jsonl", ("\n".join(lines) + "\n").encode())
    out = train(fs, name, "--set", f"data.train=s3://{root}/annotation/train.jsonl",
                "--set", f"data.image_root=s3://{root}/image", "--set", "training.steps=2", check=False)
    last = one_line_failure(out, f"error: training {name} failed: DataError: sample ")
    assert "2.png" in last and "cannot be read" in last, last
    logged = run_log(fs, name)
    assert "Traceback" in logged and "DataError" in logged and "(RayTrainWorker pid=" in logged
    _, run = history(fs, name)
    assert run.info.status == "FAILED" and "DataError" in run.data.tags["longview.failure"]


def test_divergence_stops_the_run_before_any_checkpoint_holds_it(services, record):
    fs = services
    name = unique("nan")
    # lr 1e6: step 1's update is huge but finite, step 2's loss and gradient are not.
    # max_failures=3: a restart would meet the same step again, so none is made.
    out = train(fs, name, "--set", "training.lr=1e6", "--set", "training.checkpoint_every=1",
                "--set", "training.max_failures=3", check=False)
    last = one_line_failure(out, f"error: training {name} failed: DivergenceError: step ")
    assert "the update was not applied" in last and "training.on_nonfinite: stop" in last
    bad = int(last.split("DivergenceError: step ")[1].split(":")[0])
    # Ray's tracebacks are in the run's log (storage, and the MLflow run's artifact), not on the terminal.
    logged = run_log(fs, name)
    assert "Traceback" in logged and "DivergenceError" in logged and "(RayTrainWorker pid=" in logged
    got, run = history(fs, name)
    assert run.info.status == "FAILED" and "DivergenceError" in run.data.tags["longview.failure"]
    client = mlflow_client(fs["started"]["mlflow"].url)
    assert any(a.path.startswith("logs/train-") for a in client.list_artifacts(run.info.run_id, "logs"))
    # MLflow shows the step that went wrong; every step before it was finite.
    assert [s for s, _ in got] == list(range(1, bad + 1))
    assert all(math.isfinite(v) for _, v in got[:-1]) and not math.isfinite(got[-1][1])
    assert resumed(fs, name) == [] and "restarting from its last checkpoint" not in out.stderr  # failed once
    # Checkpoints stop before the bad step (none was written from it), and they are whole.
    store = CheckpointStore(s3fs_direct(fs), f"lve2e/runs/{name}", f"s3://lve2e/runs/{name}")
    names = store.names()
    assert names and all(int(n.rsplit("-", 1)[1]) < bad for n in names)
    for n in names:
        store.verify(n)
    record("loss diverges (training.lr=1e6)", injected=1, survived=0, steps_lost=0, data_lost=0,
           note=f"stops at step {bad} with one line; its update never applied, no checkpoint holds it")


def test_a_resume_applies_safe_changes_and_refuses_the_rest_before_anything_starts(services, record):
    from workloads.engine import lr_lambda

    fs, name = services, unique("change")
    train(fs, name, "--set", "training.steps=4")
    # A change the checkpoint cannot hold: refused in one line naming key and values;
    # no worker starts, MLflow and the checkpoints are as they were.
    out = train(fs, name, "--set", "training.steps=6", "--set", "model.overrides={vision_image_size: 56}",
                "--set", "training.seed=5", check=False)
    last = one_line_failure(out, f"error: training {name} failed: ResumeRefused: run ")
    assert "model.overrides: {'vision_image_size': 112} -> {'vision_image_size': 56}" in last
    assert "training.seed: 0 -> 5 (can change only in a new run)" in last
    assert "preparing data" not in out.stderr
    # A model size the tokenizer does not fit: the resume rules speak first, not the tokenizer check.
    out = train(fs, name, "--set", "model.size=internvl2-2b", check=False)
    last = one_line_failure(out, f"error: training {name} failed: ResumeRefused: run ")
    assert "model.size: 'tiny' -> 'internvl2-2b'" in last and "Tokenizer" not in last, last
    got, run = history(fs, name)
    assert [s for s, _ in got] == [1, 2, 3, 4] and not any(k.startswith("longview.resume.") for k in run.data.tags)
    # Safe changes apply from the resumed step: the schedule runs on the new lr and length.
    train(fs, name, "--set", "training.steps=6", "--set", "training.lr=0.03")
    got, run = history(fs, name)
    assert [s for s, _ in got] == list(range(1, 7)) and run.info.status == "FINISHED"
    lrs = dict(history(fs, name, "lr")[0])
    new = lr_lambda(load_config("configs/v2pe-demo.yaml", overrides={"training.steps": 6}).training)
    # The lr logged for a step is the schedule's after it (as in a fresh run): 1e-9 only
    # absorbs float printing.
    assert lrs[5] == pytest.approx(0.03 * new(5), rel=1e-9) and lrs[6] == pytest.approx(0.03 * new(6), rel=1e-9)
    diff = run.data.tags["longview.resume.step-0000004"]
    assert "training.lr: 0.003 -> 0.03" in diff and "training.steps: 4 -> 6" in diff
    record("resume with changed config (lr/steps; model shape, seed)", injected=2, survived=2, steps_lost=0,
           data_lost=0, note="lr and steps applied from the resumed step and tagged; shape and seed refused "
                             "by name before any worker starts")


def test_a_run_is_its_storage_not_its_name(services, monkeypatch):
    """The MLflow run is bound to the run's storage (run.json beside its checkpoints): a
    restart finds it there; a fresh start of the same name in other storage is a new run."""
    from orchestrator.identity import bind_run

    fs = services
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fs["creds"]["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fs["creds"]["AWS_SECRET_ACCESS_KEY"])
    # The storage layer points fsspec's plain calls at the endpoint through this variable:
    # set here, so it is gone again after the test (later tests start their own endpoints).
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", fs["direct_s3"])
    name = unique("bound")

    def bind(prefix):
        cfg = load_config("configs/v2pe-demo.yaml", overrides={
            "name": name, "storage.uri": f"s3://lve2e/{prefix}", "storage.endpoint_url": fs["direct_s3"],
            "tracking.uri": fs["started"]["mlflow"].url})
        return bind_run(cfg, {})

    first = bind("runs")
    assert bind("runs") == first  # a restart: the run its storage names
    other = bind("elsewhere")
    assert other != first and bind("elsewhere") == other


def test_corrupted_checkpoint_falls_back_to_the_previous_one(services, reference, record):
    fs = services
    name = unique("corrupt")
    train(fs, name)
    s3 = s3fs_direct(fs)
    key = f"lve2e/runs/{name}/step-0000006/state/__0_0.distcp"
    blob = bytearray(s3.cat_file(key))
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    s3.pipe_file(key, bytes(blob))
    train(fs, name, "--set", f"training.steps={STEPS + 2}")
    assert resumed(fs, name) == [4]
    got, run = history(fs, name)
    why = run.data.tags["longview.unusable_checkpoint.step4"]
    assert why.startswith("step-0000006: ") and "state/__0_0.distcp bytes" in why and "fail their checksum" in why
    assert [s for s, _ in got] == list(range(1, STEPS + 3))  # 5 and 6 recomputed, not logged twice
    assert [v for _, v in got[:STEPS]] == pytest.approx([v for _, v in reference[1]], rel=1e-6)
    record("corrupted object in the latest checkpoint", injected=1, survived=1, steps_lost=6 - 4, data_lost=0)


def test_mlflow_restart_mid_run_loses_no_metric(services, reference, record):
    from orchestrator.services import start_mlflow, stop_pid

    fs = services
    name = unique("mlflow")
    env = dict(fs["env"])
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                             "--set", f"name={name}", *BASE, "--set", "training.steps=30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mlflow = fs["started"]["mlflow"]
    try:
        wait_for_steps(fs, name, 2)  # the run is logging
        stop_pid(mlflow.pid)
        # Training goes on meanwhile, and ends before the server is back: the metrics it
        # kept must still reach the run (the end of a run waits for the server).
        head = []
        for line in proc.stdout:
            head.append(line)
            if "step 30/30" in line:
                break
        port = int(mlflow.url.rsplit(":", 1)[1])
        restarted = start_mlflow(fs["home"], fs["started"]["s3"], "lve2e", port=port)
        fs["svc"]._write({**fs["svc"].read(), "mlflow": restarted})  # `down` stops the new one
        out, _ = proc.communicate(timeout=600)
        out = "".join(head) + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    got, run = history(fs, name)
    assert [s for s, _ in got] == list(range(1, 31))
    assert run.info.status == "FINISHED"
    record("MLflow server stopped mid-run, back after training ended", injected=1, survived=1, steps_lost=0,
           data_lost=0)


def test_sigterm_stops_the_run_cleanly_at_its_last_checkpoint(services, record):
    fs = services
    name = unique("term")
    # Checkpoints every step: a save is in flight (or just done) whenever the signal comes.
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                             "--set", f"name={name}", *BASE, "--set", "training.steps=40",
                             "--set", "training.checkpoint_every=1"],
                            env=dict(fs["env"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(fs, name, 3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, as a shell reports a process the signal ended
    mine = [ln for ln in err.splitlines() if ln.startswith("stopped: ")]
    assert len(mine) == 1 and f"training {name} stopped (SIGTERM); it resumes from s3://lve2e/runs/{name}/step-" \
        in mine[0], err[-3000:]
    assert "Traceback" not in err
    step = int(mine[0].split("(step ")[1].split(")")[0])
    # Every checkpoint left is complete (a save the stop cut short is gone), the newest is
    # the one the line names, and the run is KILLED in MLflow.
    store = CheckpointStore(s3fs_direct(fs), f"lve2e/runs/{name}", f"s3://lve2e/runs/{name}")
    names = store.names()
    assert names and names[0] == store.name(step)
    for n in names:
        store.verify(n)
    got, run = history(fs, name)
    assert run.info.status == "KILLED" and len(got) < 40
    record("SIGTERM of `longview train` mid-run", injected=1, survived=1, steps_lost=len(got) - step, data_lost=0,
           note=f"one line naming the resume point (step {step} of {len(got)} done); no partial checkpoint left")


def test_mlflow_down_for_a_whole_run_loses_nothing(services, reference, record):
    """Down before the run starts, back only after it ended: refused unless the run is
    asked to start without it (tracking.on_unreachable=keep); then training starts, and
    everything MLflow did not take (metrics, tags, status, the loss plot) waits in the
    run's storage until `longview runs` sends it."""
    from orchestrator.services import start_mlflow, stop_pid

    fs, name = services, unique("nomlflow")
    mlflow = fs["svc"].read()["mlflow"]
    stop_pid(mlflow.pid)
    try:
        # Not asked to run without it: refused in one line before anything starts.
        refused = train(fs, name, "--set", "tracking.wait_s=2", check=False, timeout=300)
        assert one_line_failure(refused, f"error: training {name} failed: MLflow at {mlflow.url} does not answer")
        assert "tracking.on_unreachable=keep" in refused.stderr
        assert not s3fs_direct(fs).exists(f"lve2e/runs/{name}")  # nothing started
        out = train(fs, name, "--set", "tracking.wait_s=2", "--set", "tracking.on_unreachable=keep")
    finally:
        restarted = start_mlflow(fs["home"], fs["started"]["s3"], "lve2e", port=int(mlflow.url.rsplit(":", 1)[1]))
        fs["svc"]._write({**fs["svc"].read(), "mlflow": restarted})  # `down` stops the new one
    assert f"MLflow at {mlflow.url} does not answer" in out.stderr and "training starts without it" in out.stderr
    assert f"kept in s3://lve2e/runs/{name}/mlflow-outbox" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(IndexError):  # nothing reached MLflow yet
        history(fs, name)
    # `longview runs` of any run sends them: what this machine's runs kept is noted locally.
    runs = cli(fs["env"], "runs", "configs/v2pe-demo.yaml", "--set", f"name={unique('other')}", *BASE)
    assert f"MLflow records run {name} had kept" in runs.stdout and f"| {name} | FINISHED | 6 |" in runs.stdout, \
        runs.stdout
    got, run = history(fs, name)
    # The same run as the reference, every step once.
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in reference[1]], rel=1e-6)
    assert run.info.status == "FINISHED" and run.data.tags["longview.final_checkpoint"].endswith("step-0000006")
    client, _ = mlflow_run(fs, name)
    assert "loss.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    s3 = s3fs_direct(fs)
    assert not s3.exists(f"lve2e/runs/{name}/mlflow-outbox") or s3.ls(f"lve2e/runs/{name}/mlflow-outbox") == []
    record("MLflow down for a whole run, back after it ended", injected=1, survived=1, steps_lost=0, data_lost=0,
           note="training starts without it; what MLflow did not take is kept in the run's storage and sent by "
                "`longview runs` (of any run)")


def test_stalled_rank_fails_the_run_naming_the_group(services, record):
    fs = services
    name = unique("stall")
    t0 = time.monotonic()
    out = train(fs, name, "--set", "parallelism.timeout_s=10", "--set", "training.max_failures=0",
                faults="stall@2:1", check=False, timeout=400)
    took = time.monotonic() - t0
    assert fired(fs, name, "stall-2-1")
    last = one_line_failure(out, f"error: training {name} failed: ")
    assert "timed out" in last and "context-parallel group cp[dp=0] (ranks 0, 1)" in last, last
    # The designed outcome is a clean failure, not survival: a stuck peer cannot be resumed
    # around without a restart, which max_failures=0 forbids here.
    record("one rank stalls inside a collective", injected=1, survived=0, steps_lost=0, data_lost=0,
           note=f"the run ends with a timeout naming the group (timeout 10 s; the whole command took {took:.0f} s)")


def test_longview_stop_ends_a_submitted_job_cleanly(services, record):
    fs = services
    name = unique("stop")
    out = cli(fs["env"], "submit", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE,
              "--set", "training.steps=40", "--set", "training.checkpoint_every=1").stdout
    job_id = out.split("submitted job ", 1)[1].split()[0]
    wait_for_steps(fs, name, 3)
    cli(fs["env"], "stop", job_id)
    deadline, status = time.monotonic() + 180, ""
    while time.monotonic() < deadline and not any(s in status for s in ("STOPPED", "FAILED", "SUCCEEDED")):
        time.sleep(2)
        status = cli(fs["env"], "status", job_id).stdout
    assert "STOPPED" in status, status
    logs = cli(fs["env"], "logs", job_id).stdout
    mine = [ln for ln in logs.splitlines() if ln.startswith("stopped: ")]
    assert len(mine) == 1 and f"training {name} stopped (SIGTERM); it resumes from s3://lve2e/runs/{name}/step-" \
        in mine[0], logs[-3000:]
    step = int(mine[0].split("(step ")[1].split(")")[0])
    store = CheckpointStore(s3fs_direct(fs), f"lve2e/runs/{name}", f"s3://lve2e/runs/{name}")
    assert store.names()[0] == store.name(step)
    for n in store.names():
        store.verify(n)
    got, run = history(fs, name)
    assert run.info.status == "KILLED"
    record("`longview stop` of a submitted job mid-run", injected=1, survived=1, steps_lost=len(got) - step,
           data_lost=0, note="the job ends STOPPED with one line naming the resume point; no partial checkpoint")


def test_driver_disconnect_leaves_the_job_running(services, record):
    fs = services
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
    assert "finished: last checkpoint s3://lve2e/runs/" in logs
    record("submitting client killed (driver disconnect)", injected=1, survived=1, steps_lost=0, data_lost=0)
