"""A job meets the cluster it is sent to: refused when no node can ever hold a worker,
told what it waits for while the cluster is busy, ended in one line after
resources.placement_timeout_s, and stopped at once by SIGTERM while it waits.

"Busy" is made real: a helper process holds the shared Ray head's two CPUs with an
actor (`tests/e2e/hold_cpus.py`), as another job would, and is stopped by PID.
"""

import contextlib
import re
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import BASE, cli, mlflow_run, one_line_failure, unique

HOLD_READY_S = 120  # the helper connects to Ray and places its actor (seconds, on a loaded machine)
STOP_WITHIN_S = 60  # a SIGTERM'd run that waits for its workers has exited by then
WAIT_LINE_WITHIN_S = 300  # the run prepares its data and reaches the placement wait by then


@contextlib.contextmanager
def cpus_held(fs):
    """The shared head's two CPUs held by another Ray job while the body runs."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.hold_cpus", fs["started"]["ray"].extra["address"], "2",
                             "900"], env=fs["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + HOLD_READY_S
        seen = []
        for line in proc.stdout:  # ends when the helper exits
            seen.append(line)
            if line.strip() == "holding" or time.monotonic() > deadline:
                break
        assert seen and seen[-1].strip() == "holding", "".join(seen)[-2000:]
        yield
    finally:
        from orchestrator.services import stop_pid

        stop_pid(proc.pid)


def test_a_job_no_node_can_hold_is_refused_before_anything_starts(services):
    name = unique("nogpu")
    proc = cli(services["env"], "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE,
               "--set", "resources.gpus_per_worker=1", check=False, timeout=300)
    last = one_line_failure(proc, f"error: training {name} refused: the cluster at ")
    assert "no node can hold one worker" in last and "GPU (a worker needs 1, node " in last, last
    # Two workers of 2 CPUs on a head of 2 CPUs: one fits, the job asks for two.
    proc = cli(services["env"], "eval", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE,
               "--set", "resources.cpus_per_worker=2", "--checkpoint", "s3://nowhere/model", check=False, timeout=300)
    last = one_line_failure(proc, f"error: evaluation of {name} refused: the cluster at ")
    assert "at most 1 workers of job" in last and "resources.workers=2" in last, last
    try:  # nothing started: no MLflow run
        mlflow_run(services, name)
        raise AssertionError(f"{name} has an MLflow run")
    except (IndexError, AttributeError):  # no run, or no experiment yet
        pass


def test_a_job_waiting_for_a_busy_cluster_says_so_and_gives_up_after_its_timeout(services):
    name = unique("busy")
    with cpus_held(services):
        proc = cli(services["env"], "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE,
                   "--set", "resources.placement_timeout_s=20", check=False, timeout=600)
    last = one_line_failure(proc, f"error: training {name} failed: PlacementTimeout: ")
    assert "2 workers of {CPU: 1} not placed within resources.placement_timeout_s=20 s" in last, last
    # The seconds waited depend on when the watch first saw the placement group: not asserted.
    assert re.search(rf"training {name}: waiting \d+ s for 2 workers of \{{CPU: 1\}} \(the cluster is busy; "
                     r"free now: nothing\)", proc.stdout), proc.stdout[-3000:]
    _, run = mlflow_run(services, name)
    assert run.info.status == "FAILED" and "PlacementTimeout" not in run.data.tags["longview.failure"]
    assert "not placed within resources.placement_timeout_s=20" in run.data.tags["longview.failure"]


def test_sigterm_stops_a_job_waiting_for_its_workers_at_once(services):
    name = unique("busysig")
    with cpus_held(services):
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                                 "--set", f"name={name}", *BASE], env=services["env"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out, deadline = [], time.monotonic() + WAIT_LINE_WITHIN_S
        for line in proc.stdout:
            out.append(line)
            if ": waiting " in line or time.monotonic() > deadline:
                break
        assert out and ": waiting " in out[-1], "".join(out)[-3000:]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=STOP_WITHIN_S)
    text = "".join(out) + rest
    assert proc.returncode == 143, text[-3000:]
    assert text.strip().splitlines()[-1] == (f"stopped: training {name} stopped (SIGTERM); it had no complete "
                                             "checkpoint yet: a new start begins at step 0"), text[-3000:]
    assert "Traceback" not in text
    _, run = mlflow_run(services, name)
    assert run.info.status == "KILLED"
