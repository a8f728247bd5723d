"""A run's identity lives in its storage, beside its checkpoints:

    <storage.uri>/<name>/run.json     the MLflow run this storage's run logs to
    <storage.uri>/<name>/lease.json   who writes the run now (the driver that holds it)
    <storage.uri>/<name>/mlflow-outbox/   what MLflow did not take before the run's end

A run is its storage folder, not its name: a fresh start under an old name in another
storage is a new MLflow run; a restart, a resubmission or a resume finds its run in
`run.json` whatever MLflow's search would say. Only one driver writes a run at a time:
`RunLease` is taken before anything starts and renewed while the run lives; a second
`longview train` of the same run fails at once naming the holder. A holder that died
without letting go (SIGKILL, a lost machine) is passed over when its lease has not been
renewed for `LEASE_TTL_S`, or at once when it was a process of this machine that is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from .config import from_dict, to_dict
from .ray_job import submitted_job_id
from .services import home
from .storage import run_uri, storage_fs
from .tracking import Outbox, job_run

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"
LEASE = "lease.json"
OUTBOX = "mlflow-outbox"
LEASE_TTL_S = 60.0  # a lease not renewed for this long belongs to nobody
RENEW_S = 10.0
SETTLE_S = 1.0  # between writing a lease and reading it back: a rival's write lands in it


class RunBusy(RuntimeError):
    """Another driver is writing this run now."""


def read_run_record(cfg) -> dict | None:
    """The run's `run.json` ({"mlflow_run_id", "experiment", "tracking_uri"}), or None."""
    fs, root = storage_fs(run_uri(cfg, RUN_RECORD), cfg)
    try:
        return json.loads(fs.cat_file(root))
    except FileNotFoundError:
        return None


def write_run_record(cfg, mlflow_run_id: str) -> None:
    fs, root = storage_fs(run_uri(cfg, RUN_RECORD), cfg)
    fs.pipe_file(root, json.dumps({"mlflow_run_id": mlflow_run_id, "experiment": cfg.experiment,
                                   "tracking_uri": cfg.tracking.uri}).encode())


def bind_run(cfg, tags: dict, *, by_name: bool = False) -> str | None:
    """The MLflow run of this storage's run: the one `run.json` names, else a new one
    (with `by_name`: the run tagged with the job's name, for runs from before run.json),
    recorded in `run.json`. Raises while the server does not answer."""
    record = read_run_record(cfg)
    bound = record["mlflow_run_id"] if record else None
    run_id = job_run(cfg, tags, bound=bound, by_name=by_name and record is None)
    if run_id and run_id != bound:
        write_run_record(cfg, run_id)
    return run_id


def run_tags_of(cfg, extra: dict | None = None) -> dict:
    """The tags a training run is created with."""
    return {"longview.checkpoint_uri": run_uri(cfg), "longview.workload": cfg.workload, **(extra or {})}


def outbox(cfg):
    """The run's `Outbox` (tracking)."""
    fs, root = storage_fs(run_uri(cfg, OUTBOX), cfg)
    return Outbox(fs, root, run_uri(cfg, OUTBOX))


def deliver_outbox(cfg) -> int:
    """Sends what the run kept for MLflow (binding its run first if it never had one).
    Returns the records sent; raises while the server does not answer."""
    box = outbox(cfg)
    if not cfg.tracking.uri or not box.names():
        return 0
    return box.deliver(cfg.tracking.uri, bind_run(cfg, run_tags_of(cfg)))


PENDING_FILE = "pending-mlflow.json"  # in $LONGVIEW_HOME: {run storage: job config} of runs with records kept


def remember_pending(cfg) -> None:
    """Notes on this machine that run `cfg` left records for MLflow in its storage, so
    that `longview runs` sends them whatever run it is asked about."""
    path = home() / PENDING_FILE
    pending = json.loads(path.read_text()) if path.exists() else {}
    pending[run_uri(cfg)] = to_dict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pending))


def deliver_pending(tracking_uri: str) -> dict[str, int]:
    """Sends the records every run noted by `remember_pending` kept for the MLflow server
    at `tracking_uri`; returns {run name: records sent}. A run whose records are all
    sent is no longer noted; one whose delivery fails stays for the next call."""
    path = home() / PENDING_FILE
    if not path.exists():
        return {}
    pending, sent = json.loads(path.read_text()), {}
    for uri, job in list(pending.items()):
        cfg = from_dict(job)
        if cfg.tracking.uri != tracking_uri:
            continue
        try:
            sent[cfg.name] = deliver_outbox(cfg)
        except Exception as e:  # noqa: BLE001 - the server or the storage: the next call tries again
            log.warning("records kept by run %s (%s) not sent (%s: %s)", cfg.name, uri, type(e).__name__, e)
            continue
        del pending[uri]
    path.write_text(json.dumps(pending))
    return sent


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_job": submitted_job_id() or "",
            "token": uuid.uuid4().hex}


def _describe(lease: dict) -> str:
    job = f", Ray job {lease['ray_job']}" if lease.get("ray_job") else ""
    return f"pid {lease['pid']} on {lease['host']}{job}"


def _gone(lease: dict) -> bool:
    """Whether the holder was a process of this machine that no longer runs."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


class RunLease:
    """The right to write one run: taken in `__enter__` (RunBusy if someone else holds
    it), renewed in the background, given back in `__exit__`."""

    def __init__(self, cfg):
        self.fs, self.path = storage_fs(run_uri(cfg, LEASE), cfg)
        self.name = cfg.name
        self.uri = run_uri(cfg, LEASE)
        self.me = _holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            self.fs.invalidate_cache(self.path)
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: nobody's
            return None

    def _write(self) -> None:
        self.fs.pipe_file(self.path, json.dumps({**self.me, "renewed": time.time()}).encode())

    def _refuse_if_held(self) -> None:
        held = self._read()
        if held is None or held.get("token") == self.me["token"]:
            return
        age = time.time() - float(held.get("renewed", 0))
        if age > LEASE_TTL_S or _gone(held):
            log.info("run %s: taking over the lease of %s (renewed %.0f s ago, holder gone)", self.name,
                     _describe(held), age)
            return
        raise RunBusy(f"run {self.name} is being written by {_describe(held)} (lease {self.uri}, renewed "
                      f"{age:.0f} s ago): wait for it to end or stop it; a holder that died is passed over "
                      f"{LEASE_TTL_S:.0f} s after its last renewal")

    def __enter__(self) -> RunLease:
        self._refuse_if_held()
        self._write()
        # Two drivers that both found the lease free: each reads back after the other's
        # write has landed, and only the last writer goes on.
        time.sleep(SETTLE_S)
        self._refuse_if_held()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.me["token"]:
                    log.error("run %s: the lease was taken over by %s; this driver writes on regardless until "
                              "its run ends", self.name, _describe(held))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - storage blips: the next renewal tries again
                log.warning("run %s: lease not renewed (%s: %s)", self.name, type(e).__name__, e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("token") == self.me["token"]:
                self.fs.rm(self.path)
        except Exception as e:  # noqa: BLE001 - it expires on its own
            log.warning("run %s: lease not released (%s: %s); it expires in %.0f s", self.name,
                        type(e).__name__, e, LEASE_TTL_S)
