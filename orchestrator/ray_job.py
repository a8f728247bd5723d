"""Everything longview asks of Ray: connecting, the workers' environment, the run's
storage as Ray sees it, and the one builder of `TorchTrainer` that training and
evaluation share (so their resources, storage and backends cannot drift apart)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from .faults import ENV_KEYS as FAULT_ENV_KEYS
from .log import LEVEL_ENV
from .placement import UNPLACED, check_placement
from .ray_output import ROUTER, run_log_path
from .services import home
from .storage import backend_for, resolved, run_uri, storage_fs
from .tracking import not_fatal

log = logging.getLogger(__name__)

# Never sent with a job: a runtime environment is stored by the cluster and shown by
# its dashboard and job API. Nodes get credentials from their own environment or the
# standard AWS configuration (instance profile, mounted secret).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a submitted job's entrypoint
# Passed on to the workers as they are: the workload plug-ins to import, the log level.
FORWARDED_ENV = ("LONGVIEW_WORKLOADS", LEVEL_ENV, "MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_MODE", *FAULT_ENV_KEYS)


def worker_env(cfg) -> dict[str, str]:
    """Environment the workers need from *this* one: the S3 endpoint and region, not
    the credentials (SECRET_ENV)."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("AWS_") and k not in SECRET_ENV) or k in FORWARDED_ENV}
    env.update(backend_for(resolved(cfg.storage.uri)).worker_env(cfg.storage))
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.resources.cpus_per_worker))))
    return env


def submitted_job_id() -> str | None:
    """The Ray job id when this process is a submitted job's entrypoint."""
    raw = os.environ.get(SUBMITTED_JOB_ENV)
    return json.loads(raw).get("metadata", {}).get("job_submission_id") if raw else None


def connect_ray(cfg, address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        if os.environ.get(SUBMITTED_JOB_ENV):
            ray.init(logging_level="WARNING")  # inside a submitted job: its cluster and runtime env (set at submission)
        else:
            # The job's environment reaches every actor, the Train controller included (it
            # opens the S3 storage too), not only the training workers.
            ray.init(address=address or "local", log_to_driver=True, logging_level="WARNING",
                     runtime_env={"env_vars": worker_env(cfg)})
    ROUTER.install()


def connect_checked(cfg, address: str | None, what: str) -> None:
    """Connected to the cluster the job goes to, which is asked whether it can ever hold
    the job's workers (`placement.check_placement`: PlacementRefused, naming the resource,
    before anything starts); SIGTERM then stops the run as Ctrl-C does (`ray.init`
    installs a SIGTERM handler of its own, which only ends the process), and a lost head
    ends it in one line (`HeadWatch`). `what`: the run as the user reads it ("training X")."""
    import ray

    connect_ray(cfg, address)
    stop_on_sigterm()
    gcs = ray.get_runtime_context().gcs_address
    HeadWatch.start_for(gcs, what)
    check_placement(cfg, gcs)


# A head whose GCS port refuses connections this long is gone (a restart of the head
# process takes seconds, and a new head is another cluster: the run cannot go on).
# Ray's own driver gives up after 60 s, ending the process without a word
# (gcs_rpc_server_reconnect_timeout_s): this must come first.
HEAD_LOST_AFTER_S = 20.0
HEAD_POLL_S = 2.0


class HeadWatch:
    """Watches the Ray head's GCS port from the driver. When it stops answering, the
    callbacks registered with `on_lost` record the failure (the MLflow run FAILED, with
    the reason), the reason is printed as the run's one `error:` line, and the driver
    exits 1: Ray's core worker would otherwise end the process after its own wait with
    `Failed to connect to GCS` and exit 1, leaving the MLflow run RUNNING."""

    _current: HeadWatch | None = None
    _callbacks: list[Callable[[str], None]] = []

    def __init__(self, gcs_address: str, what: str):
        self.address, self.what = gcs_address, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ray-head-watch", daemon=True)

    @classmethod
    def start_for(cls, gcs_address: str, what: str) -> None:
        if cls._current is not None and cls._current.address == gcs_address:
            cls._current.what = what  # the experiment's next run on the same cluster
            return
        if cls._current is not None:
            cls._current._stop.set()
        cls._current = cls(gcs_address, what)
        cls._current._thread.start()

    @classmethod
    @contextlib.contextmanager
    def on_lost(cls, fn: Callable[[str], None]):
        """`fn(reason)` is called if the head is lost while the body runs."""
        cls._callbacks.append(fn)
        try:
            yield
        finally:
            cls._callbacks.remove(fn)

    def _answers(self) -> bool:
        host, port = self.address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=HEAD_POLL_S).close()
            return True
        except OSError:
            return False

    def _watch(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(HEAD_POLL_S):
            if self._answers():
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok >= HEAD_LOST_AFTER_S:
                import ray

                if ray.is_initialized():  # not a driver that let go of its cluster itself (ray.shutdown)
                    self._lost(time.monotonic() - last_ok)
                return

    def _lost(self, for_s: float) -> None:
        reason = (f"HeadLost: the Ray head at {self.address} stopped answering ({for_s:.0f} s without an answer); "
                  "the run's workers went with it. Start the cluster again (`longview up` for the local one) and run "
                  "the same command: it resumes from the last checkpoint")
        for fn in list(self._callbacks):
            try:
                fn(reason)
            except Exception as e:  # noqa: BLE001 - the line below must still be said
                log.warning("recording the lost head failed: %s: %s", type(e).__name__, e)
        ROUTER.mute()
        print(f"error: {self.what} failed: {reason}", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread waits in Ray, which has nothing more to give


def streams_everything() -> bool:
    """Whether Ray's output streams as Ray prints it: with -v, and inside a submitted job
    (its output is the Ray job log, read with `longview logs`)."""
    return bool(os.environ.get(SUBMITTED_JOB_ENV)) or logging.getLogger("longview").getEffectiveLevel() <= logging.DEBUG


@contextlib.contextmanager
def run_output(cfg, what: str, keep: Callable[[bytes, str], object]):
    """Ray's output while the body runs (`ray_output`): to a log file under
    $LONGVIEW_HOME/logs/<run>/ (its path said once), the terminal getting longview's lines
    only unless everything streams. At the end the log is copied to <run>/logs/ in the
    run's storage and handed to `keep(data, "logs/<file>")` (the MLflow run's artifact)."""
    path = run_log_path(home(), cfg.name, what)
    ROUTER.to_file(path, stream_all=streams_everything())
    log.info("Ray's output (workers, Train controller): %s%s", path,
             "" if streams_everything() else " (`longview -v` shows it here)")
    try:
        yield
    except BaseException:
        # The driver prints the failure's one-line reason next: nothing the workers still
        # send may follow it on the terminal (the file keeps it all).
        ROUTER.mute()
        raise
    finally:
        data = ROUTER.close()
        if data:
            where = run_uri(cfg, f"logs/{path.name}")
            try:
                fs, target = storage_fs(where, cfg)
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                fs.pipe_file(target, data)
            except Exception as e:  # noqa: BLE001 - the log is a record: the run's outcome stands
                log.warning("the run's log was not copied to %s (%s); it is at %s", where, type(e).__name__, path)
            with not_fatal("the run's log", str(path)):
                keep(data, f"logs/{path.name}")


def build_trainer(cfg, loop, loop_config: dict, *, run_name: str, max_failures: int = 0, elastic: bool = False):
    """A TorchTrainer running `loop(loop_config)` on `resources.workers` workers with the
    job's resources (CPUs, GPUs, custom), backend, collective timeout and storage.

    elastic: with `resources.workers: [min, max]`, Ray Train's elastic worker group: it
    starts with as many workers as the cluster holds (at least min), asks the autoscaler
    for max, and restarts the group at a new size when nodes come or go (the workers
    resume from the last checkpoint, resharded)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **r.custom}
    if use_gpu:
        resources["GPU"] = r.gpus_per_worker
    uri = resolved(cfg.storage.uri)
    storage_path, fs = backend_for(uri).for_ray(uri, cfg.storage)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.parallelism.timeout_s)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(r.min_workers, r.max_workers) if elastic and r.elastic else r.max_workers,
            elastic_resize_monitor_interval_s=r.resize_interval_s, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )


class RunStopped(Exception):
    """The run was stopped (Ctrl-C, SIGTERM, `longview stop`); the message says where it
    resumes from."""


_STOP_SIGNAL = ["SIGINT (Ctrl-C)"]


def stop_on_sigterm() -> None:
    """SIGTERM (`longview stop`, a scheduler, `kill`) stops a run as Ctrl-C does: Ray
    Train's SIGINT handler aborts the worker group while the driver waits in `fit`. While
    the workers are not placed (`placement.UNPLACED`) the stop is immediate: nothing runs
    that an abort would wind down, and the driver's exit ends Ray Train's controller."""
    def forward(signum, frame):
        _STOP_SIGNAL[0] = "SIGTERM"
        if UNPLACED.is_set():
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, forward)


def stop_signal() -> str:
    """The signal that stopped the run, as the user sent it."""
    return _STOP_SIGNAL[0]


def stopped_exit_code() -> int:
    """What a stopped run exits with, as shells report a process ended by the signal:
    128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + (signal.SIGTERM if _STOP_SIGNAL[0] == "SIGTERM" else signal.SIGINT)
