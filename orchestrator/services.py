"""Local services on 127.0.0.1 for tests and the demo: S3 endpoint, MLflow, Ray head.

Each service is a child process in its own process group, on free ports, with its
state (PID, URL, log file) in a JSON state file, and is stopped by PID (never
`ray stop`, which would kill every Ray process on the machine).

- S3: moto's standalone server, an S3-protocol endpoint (any credentials accepted). It
  keeps objects in memory: `down` writes every bucket to $LONGVIEW_HOME/s3/<bucket>/
  and `up` loads them back, so checkpoints and data outlive a restart of the services
  (not a crash of the endpoint itself: what it held since the last `down` is gone).
- MLflow: `mlflow server` on a sqlite store, artifacts proxied to s3://BUCKET/mlflow,
  so workers need no S3 credentials to log artifacts.
- Ray: `ray start --head --block` with its own ports and temp dir.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parallelism.local_world import free_port, free_ports

log = logging.getLogger(__name__)

# moto accepts any key; these only exist so that boto/s3fs sign requests to it.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "longview-local", "AWS_SECRET_ACCESS_KEY": "longview-local-secret",
                     "AWS_DEFAULT_REGION": "us-east-1"}


class ServiceError(RuntimeError):
    pass


class NotAnswering(ServiceError):
    """A service still running that never answered within its wait (not one that exited)."""


def home() -> Path:
    """Where `longview up` keeps the local services' state: $LONGVIEW_HOME, default ~/.longview."""
    return Path(os.environ.get("LONGVIEW_HOME", Path.home() / ".longview"))


def _bin(name: str) -> str:
    """An executable of the running Python environment (the venv's, not the PATH's)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def ray_env() -> dict:
    """Environment for Ray CLI/clients: token auth when this machine has a token (Ray >=
    2.59 turns token auth on when ~/.ray/auth_token exists)."""
    env = {}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str
    extra: dict = field(default_factory=dict)


def _http_answers(url: str, *, timeout_s: float) -> bool:
    """Whether a server answers at `url` with anything below a 5xx. A 401 counts: Ray's
    dashboard asks for its token (token auth, on when ~/.ray/auth_token exists) and is up."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:  # noqa: BLE001 - not answering (yet)
        return False


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log).read_text()[-2000:] if Path(log).exists() else ""
            raise ServiceError(f"{url}: the process exited with {proc.returncode} before answering\n{tail}")
        if _http_answers(url, timeout_s=2):
            return
        time.sleep(0.3)
    stop_pid(proc.pid)  # a service that never answered is not left behind
    raise NotAnswering(f"{url} did not answer within {timeout_s:.0f}s (log: {log})")


def _spawn(cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log, "ab") as f:
        # Own session = own process group: stopping it stops everything it started.
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                stdin=subprocess.DEVNULL)


def stop_processes_under(marker: str) -> list[int]:
    """SIGKILLs every process whose command line contains `marker` (a temp dir we own).

    Ray's simulated nodes are started by its autoscaler outside the head's process
    group; they are found by the temp dir they were given.
    """
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
            except ProcessLookupError:
                pass
    return killed


def stop_pid(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM to the service's process group, SIGKILL to what is left of the group after
    timeout_s. Waits for the whole group, not only its leader: MLflow's job consumers,
    for one, outlive a reaped server process when only it is waited for."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    killed = False
    while True:
        try:  # reap the leader if it is our child (a zombie still counts as a group member)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if killed:  # only unreapable zombies are left (not our children): nothing holds a port
                return
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            killed, deadline = True, time.monotonic() + 5
        time.sleep(0.2)


def start_s3(state_dir: Path, buckets: list[str], host: str = "127.0.0.1") -> Service:
    port = free_port()
    log = str(state_dir / "s3.log")
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], log)
    url = f"http://{host}:{port}"
    _wait_http(url + "/moto-api/", 60, proc, log)
    try:
        create_buckets(url, buckets)
    except ServiceError:
        stop_pid(proc.pid)  # the endpoint must not outlive this
        raise
    return Service("s3", proc.pid, url, log, {"buckets": buckets})


def create_buckets(url: str, buckets: list[str]) -> None:
    """Creates the buckets on the local S3 endpoint (one already there is kept)."""
    client = _s3_client(url)
    for b in buckets:
        try:
            client.create_bucket(Bucket=b)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as e:  # noqa: BLE001 - botocore's errors
            raise ServiceError(f"bucket {b!r} could not be created on the local S3 endpoint: {e}") from None


def _s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _objects(client, bucket: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        yield from page.get("Contents", [])


def save_buckets(url: str, folder: Path) -> int:
    """Writes every bucket of the endpoint at `url` to `folder/<bucket>/<key>` (objects
    already there with the same size and ETag are not fetched again; files of deleted
    objects are removed). Returns the number of objects written."""
    client = _s3_client(url)
    written = 0
    for b in client.list_buckets()["Buckets"]:
        bucket = b["Name"]
        root = (folder / bucket).resolve()
        index_file = folder / f"{bucket}.index.json"
        index = json.loads(index_file.read_text()) if index_file.exists() else {}
        now = {}
        for obj in _objects(client, bucket):
            key, tag = obj["Key"], [obj["Size"], obj["ETag"]]
            path = (root / key).resolve()
            if not path.is_relative_to(root) or key.endswith("/"):
                log.warning("s3://%s/%s not saved: its key is not a file path", bucket, key)
                continue
            now[key] = tag
            if index.get(key) == tag and path.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(path))
            written += 1
        for key in set(index) - set(now):
            (root / key).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        index_file.write_text(json.dumps(now))
    return written


def load_buckets(url: str, folder: Path) -> int:
    """Puts back what `save_buckets` wrote to `folder` (buckets created as needed).
    Returns the number of objects loaded."""
    if not folder.is_dir():
        return 0
    client = _s3_client(url)
    loaded = 0
    for index_file in sorted(folder.glob("*.index.json")):
        bucket = index_file.name.removesuffix(".index.json")
        create_buckets(url, [bucket])
        root = folder / bucket
        for key in json.loads(index_file.read_text()):
            if (root / key).is_file():
                client.upload_file(str(root / key), bucket, key)
                loaded += 1
        # ETags of multipart uploads differ from the originals': index what is there now.
        index_file.write_text(json.dumps({o["Key"]: [o["Size"], o["ETag"]] for o in _objects(client, bucket)}))
    return loaded


def start_mlflow(state_dir: Path, s3: Service, bucket: str, host: str = "127.0.0.1", port: int | None = None) -> Service:
    port = port or free_port()
    log = str(state_dir / "mlflow.log")
    db = state_dir / "mlflow.db"
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
           f"s3://{bucket}/mlflow", "--host", host, "--port", str(port), "--workers", "1"]
    # A local tracking server needs none of MLflow's job consumers (GenAI scorers run by
    # a Huey pool: seven processes, ~1.7 GiB at rest).
    env = dict(LOCAL_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3.url, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = _spawn(cmd, log, env)
    url = f"http://{host}:{port}"
    _wait_http(url + "/health", 120, proc, log)
    return Service("mlflow", proc.pid, url, log)


# A head whose dashboard does not answer is stopped and started again on fresh ports, this
# many times in all: CI once saw a head come up without its dashboard (the head kept
# running, /api/version never answered), which no wait would have fixed.
RAY_HEAD_TRIES = 2
RAY_DASHBOARD_TIMEOUT_S = 120


def start_ray(state_dir: Path, num_cpus: int, host: str = "127.0.0.1", autoscaling_yaml: str | None = None) -> Service:
    """A Ray head. With `autoscaling_yaml` (a fake_multinode cluster YAML) it runs Ray's
    autoscaler against simulated nodes on this machine (RAY_FAKE_CLUSTER=1)."""
    for attempt in range(1, RAY_HEAD_TRIES):
        try:
            return _start_ray_once(state_dir, num_cpus, host, autoscaling_yaml)
        except NotAnswering as e:  # a head that exited is not retried: its log says why
            logging.getLogger(__name__).warning("Ray head, try %d of %d: %s; starting it again on fresh ports",
                                                attempt, RAY_HEAD_TRIES, e)
    return _start_ray_once(state_dir, num_cpus, host, autoscaling_yaml)


def _start_ray_once(state_dir: Path, num_cpus: int, host: str, autoscaling_yaml: str | None) -> Service:
    # Distinct: one Ray service on another's port leaves the head running without its dashboard.
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    log = str(state_dir / "ray.log")
    # Ray's unix socket paths must stay short: a temp dir under /tmp, named by port.
    tmp = f"/tmp/lv-ray-{gcs}"
    # Every port of its own: Ray's fixed defaults (the dashboard agent's 52365, ...) would
    # collide with any other Ray head on the machine, leaving this one without a job agent.
    agent = ["--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics)]
    cmd = [_bin("ray"), "start", "--head", "--block", "--node-ip-address", host, "--port", str(gcs), *agent,
           "--dashboard-host", host, "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--temp-dir", tmp, "--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats"]
    # The local cluster's nodes hold the local S3 endpoint's credentials in their own
    # environment, as real nodes hold an instance profile or a mounted secret: jobs never
    # carry them (see launch.worker_env).
    env = dict(ray_env(), **LOCAL_CREDENTIALS)
    if autoscaling_yaml:
        import yaml

        cluster = yaml.safe_load(Path(autoscaling_yaml).read_text())
        cluster["provider"]["gcs_address"] = f"{host}:{gcs}"  # the simulated nodes join this head
        resolved = state_dir / "autoscaling.yaml"
        resolved.write_text(yaml.safe_dump(cluster))
        cmd += ["--autoscaling-config", str(resolved)]
        env["RAY_FAKE_CLUSTER"] = "1"
    proc = _spawn(cmd, log, env)
    url = f"http://{host}:{dash}"
    try:
        _wait_http(url + "/api/version", RAY_DASHBOARD_TIMEOUT_S, proc, log)
    except NotAnswering as e:
        # The dashboard's own log says why it is not answering; the head's log rarely does.
        dash_log = Path(tmp) / "session_latest" / "logs" / "dashboard.log"
        tail = dash_log.read_text(errors="replace")[-1500:] if dash_log.exists() else "(no dashboard.log)"
        raise NotAnswering(f"{e}\n{dash_log}:\n{tail}") from None
    return Service("ray", proc.pid, url, log, {"address": f"{host}:{gcs}", "temp_dir": tmp})


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_bind_host(host: str, expose: bool) -> str | None:
    """Refuses a non-loopback address without `expose`; with it, returns the warning to
    show (and prints it)."""
    if host in LOOPBACK:
        return None
    if not expose:
        raise ServiceError(f"binding the local services to {host} would expose them to the network without "
                           "authentication; pass --expose to do it anyway")
    warning = (f"WARNING: S3 endpoint, MLflow and Ray listen on {host} without authentication: anyone who "
               "can reach this machine can read and write the bucket, the runs and submit jobs")
    logging.getLogger(__name__).warning("%s", warning)
    return warning


class LocalServices:
    """`longview up` / `down`: the three services and their state file."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.state_file = self.state_dir / "services.json"

    def read(self) -> dict[str, Service]:
        if not self.state_file.exists():
            return {}
        return {k: Service(**v) for k, v in json.loads(self.state_file.read_text()).items()}

    def _write(self, services: dict[str, Service]) -> None:
        self.state_file.write_text(json.dumps({k: asdict(v) for k, v in services.items()}, indent=1))

    def up(self, *, ray_cpus: int = 2, bucket: str = "longview", ray: bool = True, mlflow: bool = True,
           host: str = "127.0.0.1", expose: bool = False) -> dict:
        """Starts the services on `host`: loopback unless `expose` says otherwise (they
        have no authentication: anyone who reaches them can read the bucket and runs)."""
        check_bind_host(host, expose)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        running = self.read()
        wanted = {"s3"} | ({"mlflow"} if mlflow else set()) | ({"ray"} if ray else set())
        if running and set(running) == wanted and all(self.answers(s) for s in running.values()):
            create_buckets(running["s3"].url, [bucket])
            for name in running:
                running[name].extra["reused"] = True
            log.info("reusing the services recorded in %s", self.state_file)
            return running
        if running:  # some died, or other services were asked for: start all of them anew
            log.info("restarting the services recorded in %s (not all of them answer)", self.state_file)
            self.down()
        started: dict[str, Service] = {}
        try:
            started["s3"] = start_s3(self.state_dir, [bucket], host=host)
            self._write(started)
            loaded = load_buckets(started["s3"].url, self.objects_dir)
            if loaded:
                log.info("S3: %d objects loaded from %s", loaded, self.objects_dir)
            if mlflow:
                started["mlflow"] = start_mlflow(self.state_dir, started["s3"], bucket, host=host)
                self._write(started)
            if ray:
                started["ray"] = start_ray(self.state_dir, ray_cpus, host=host)
                self._write(started)
        except BaseException:
            self.down()
            raise
        return started

    @staticmethod
    def answers(svc: Service) -> bool:
        """Is the service's process alive and does its endpoint answer?"""
        try:
            os.killpg(svc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        path = {"s3": "/moto-api/", "mlflow": "/health", "ray": "/api/version"}.get(svc.name, "/")
        return _http_answers(svc.url + path, timeout_s=3)

    @property
    def objects_dir(self) -> Path:
        """Where the S3 endpoint's objects are kept while it is down."""
        return self.state_dir / "s3"

    def down(self, *, keep_objects: bool = True) -> list[str]:
        """Stops the services by PID. The S3 endpoint's objects are written to
        `objects_dir` first (`keep_objects`); if that fails, the endpoint stays up, so
        nothing is lost, and ServiceError says why."""
        running = self.read()
        s3 = running.get("s3")
        if keep_objects and s3 is not None and self.answers(s3):
            try:
                n = save_buckets(s3.url, self.objects_dir)
            except Exception as e:  # noqa: BLE001 - botocore's and the disk's errors
                for name in ("ray", "mlflow"):
                    if name in running:
                        stop_pid(running.pop(name).pid)
                self._write(running)
                raise ServiceError(f"the S3 endpoint's objects could not be saved to {self.objects_dir} "
                                   f"({type(e).__name__}: {e}); it is left running at {s3.url} (pid {s3.pid}) so "
                                   "nothing is lost: free the disk and run `longview down` again") from None
            log.info("S3: %d objects saved to %s", n, self.objects_dir)
        stopped = []
        for name, svc in reversed(list(running.items())):
            stop_pid(svc.pid)
            stopped.append(name)
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def env(self) -> dict[str, str]:
        """Environment for clients of the running services (S3 endpoint, credentials)."""
        s = self.read()
        env = dict(LOCAL_CREDENTIALS)
        if "s3" in s:
            env["AWS_ENDPOINT_URL_S3"] = s["s3"].url
            env["MLFLOW_S3_ENDPOINT_URL"] = s["s3"].url
        if "mlflow" in s:
            env["MLFLOW_TRACKING_URI"] = s["mlflow"].url
        env.update(ray_env())
        return env
