"""The services every end-to-end test shares, the reference run, and the fault record.

One Ray head, one S3-protocol endpoint (rclone) with a TCP proxy in front of it (the
training storage goes through the proxy, so a test can take S3 "down"), one MLflow
server; all on 127.0.0.1, started once for the whole package and stopped by PID after
its last test. Credentials are random per session, so the security test can look for
them. Jobs run through the `longview` CLI in subprocesses, as a user runs them.

Every fault test adds a row to the report (fault, injected, survived, steps lost, data
lost); with LONGVIEW_FAULT_REPORT set, the rows are written there as JSON at the end
(`make faults` prints them as a table).
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid

import pytest

from orchestrator import services as services_mod
from orchestrator.services import LocalServices, free_port, stop_pid

REPORT: list[dict] = []
BUCKET = "lve2e"


# Package scope: the services stop when the last end-to-end test is done, not at the end
# of the whole session (an idle Ray head slows everything after it on a small machine).
@pytest.fixture(scope="package")
def services(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    creds = {"AWS_ACCESS_KEY_ID": "LVKEY" + secrets.token_hex(8).upper(),
             "AWS_SECRET_ACCESS_KEY": "lvsecret" + secrets.token_hex(16)}
    old = dict(services_mod.LOCAL_CREDENTIALS)
    services_mod.LOCAL_CREDENTIALS.update(creds)  # what the local services hand to their clients
    svc = LocalServices(home)
    started = svc.up(ray_cpus=2, bucket=BUCKET)
    # Ray clients in this process and its helpers (the job API, a driver that lists the
    # nodes) authenticate as the CLI does where this machine has a Ray token.
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ.update(services_mod.ray_env())
    control = str(home / "s3-down")
    port = free_port()
    upstream = started["s3"].url.split("//", 1)[1]
    log = open(home / "proxy.log", "w")
    proxy = subprocess.Popen([sys.executable, "-m", "tests.e2e.tcp_proxy", str(port), upstream, control],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = dict(os.environ, LONGVIEW_HOME=str(home), **svc.env())
    env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{port}"  # training storage through the proxy
    yield {"started": started, "env": env, "home": home, "control": control, "creds": creds,
           "direct_s3": started["s3"].url, "svc": svc}
    stop_pid(proxy.pid)
    svc.down()
    services_mod.LOCAL_CREDENTIALS.clear()
    services_mod.LOCAL_CREDENTIALS.update(old)
    if saved_auth is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved_auth
    for s in started.values():  # every PID is gone
        with pytest.raises(ProcessLookupError):
            os.kill(s.pid, 0)


@pytest.fixture
def record():
    """record(fault, injected=, survived=, steps_lost=, data_lost=) adds a report row."""
    def add(fault: str, **figures):
        REPORT.append({"fault": fault, **figures})
    return add


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("LONGVIEW_FAULT_REPORT")
    if out and REPORT:
        with open(out, "w") as f:
            json.dump(REPORT, f, indent=1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- running jobs -----------------------------------------------------------------------

STEPS = 6
# Two samples per packed row (the demo packs four): two rows, so a resume or a fault
# shows in the data order, at half the demo's cost per step.
BASE = ["--set", f"storage.uri=s3://{BUCKET}/runs", "--set", f"training.steps={STEPS}",
        "--set", "training.checkpoint_every=2", "--set", "data.synthetic.samples=4", "--set", "data.max_tokens=1024"]


def cli(env, *args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"longview {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def one_line_failure(proc, prefix: str) -> str:
    """A failed command as a user reads it: its last line on stderr is the one-line reason
    (starting with `prefix`), and no traceback or Ray worker output reached the terminal
    (that is in the run's log). Returns the reason line."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), text[-3000:]
    assert "Traceback" not in text and "(RayTrainWorker" not in text and "(TrainController" not in text, text[-3000:]
    assert sum(ln.startswith(("error: ", "stopped: ")) for ln in proc.stderr.splitlines()) == 1, text[-3000:]
    return last


def run_log(fs, name: str, what: str = "train") -> str:
    """The run's log of Ray's output (`longview train` / `eval`), as copied to its storage."""
    s3 = s3fs_direct(fs)
    logs = sorted(s3.glob(f"{BUCKET}/runs/{name}/logs/{what}-*.log"))
    assert logs, f"no {what} log in s3://{BUCKET}/runs/{name}/logs/"
    return s3.cat_file(logs[-1]).decode()


def train(fs, name, *extra, faults="", env_extra=None, config="configs/v2pe-demo.yaml", **kw):
    """`longview train` of a config (the shortened CPU demo by default), with faults
    injected if asked."""
    env = dict(fs["env"], **(env_extra or {}))
    if faults:  # markers of fired faults in a folder of this job's own: names repeat across tests
        markers = fault_dir(fs, name)
        markers.mkdir(exist_ok=True)
        env.update(LONGVIEW_FAULTS=faults, LONGVIEW_FAULT_DIR=str(markers), LONGVIEW_S3_CONTROL=fs["control"])
    base = BASE if config == "configs/v2pe-demo.yaml" else BASE[:2]
    return cli(env, "train", config, "--set", f"name={name}", *base, *extra, **kw)


def s3fs_direct(fs):
    """The S3 endpoint itself, not through the proxy (for inspecting and corrupting)."""
    import s3fs

    c = fs["creds"]
    return s3fs.S3FileSystem(endpoint_url=fs["direct_s3"], key=c["AWS_ACCESS_KEY_ID"],
                             secret=c["AWS_SECRET_ACCESS_KEY"])


def fault_dir(fs, name):
    return fs["home"] / f"faults-{name}"


def mlflow_run(fs, name, experiment="longview-v2pe"):
    """(MlflowClient, the one MLflow run of job `name`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(fs["started"]["mlflow"].url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`longview.run_name` = '{name}'")
    if not runs:
        raise IndexError(f"job {name} has no MLflow run (yet)")
    assert len(runs) == 1, f"one MLflow run per job, got {len(runs)}"
    return client, runs[0]


def history(fs, name, key="loss", experiment="longview-v2pe"):
    """(sorted (step, value) of a metric, the MLflow run) of job `name`."""
    client, run = mlflow_run(fs, name, experiment)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)), run


@pytest.fixture(scope="package")
def reference(services):
    """The uninterrupted V2PE demo run every other run is compared with: (name, losses,
    output). The job tests check what it wrote; the fault tests compare with it."""
    name = unique("ref")
    proc = train(services, name)
    losses, _ = history(services, name)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return name, losses, proc.stdout + proc.stderr
