"""MLflow tracking from rank 0, kept across restarts, never fatal.

- One MLflow run per job: the driver finds the run tagged with the job's name in the
  workload's experiment (a resubmitted job continues it) or creates it, and passes its
  id to the workers.
- No step is logged twice: on (re)start the tracker asks for the last logged step and
  drops metrics at or below it; an exact resume reproduces those values anyway.
- A tracking outage never stops training: failed calls are kept in a buffer, a
  warning is printed once, and the buffer is flushed when the server answers again.
  A run whose server does not answer at its start is created when it first answers
  (`Tracker(bind=...)`); what the server has not taken by the run's end (metrics, tags,
  the status, the loss plot) is kept in the run's storage (`Outbox`) and sent by the
  next start or `longview runs`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

from workloads.figures import png_bytes, pyplot
from workloads.scrub import scrub_credentials as clean

from .config import flatten, to_dict
from .errors import first_line
from .storage import run_uri

log = logging.getLogger(__name__)
RUN_NAME_TAG = "longview.run_name"


@contextlib.contextmanager
def not_fatal(what: str, where: str = ""):
    """MLflow is a record, never a reason for a run to fail: a failure inside (an outage,
    a refused request, the server's own error) is one warning that `what` was not logged
    to MLflow (and `where` the thing itself is). For the driver's one-off records; the
    `Tracker` keeps what an outage held back and sends it later instead."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - see above: said in one line, never fatal
        log.warning("%s not logged to MLflow (%s: %s)%s", what, type(e).__name__, first_line(e),
                    f"; it is at {where}" if where else "")


def mlflow_client(uri: str):
    """Every MLflow client longview makes: MLflow retries a dead server for minutes by
    default, and neither training nor the CLI must wait on it. One quick retry; callers
    keep what failed (Tracker.pending) or warn."""
    import os


    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    return _scrubbing_client_class()(tracking_uri=uri)


@functools.cache  # one class, made on the first client
def _scrubbing_client_class():
    """MlflowClient whose every tag and param value goes through `scrub_credentials` (a
    model URL given with a presigned signature, a reason quoting a URL with a token):
    what a run's page shows is scrubbed in one place, whoever sets it."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    class ScrubbingClient(MlflowClient):
        def set_tag(self, run_id, key, value, *args, **kwargs):
            return super().set_tag(run_id, key, clean(str(value)), *args, **kwargs)

        def log_param(self, run_id, key, value, *args, **kwargs):
            return super().log_param(run_id, key, clean(str(value)), *args, **kwargs)

        def log_batch(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
            params = [Param(p.key, clean(str(p.value))) for p in params or ()]
            tags = [RunTag(t.key, clean(str(t.value))) for t in tags or ()]
            return super().log_batch(run_id, metrics, params, tags, *args, **kwargs)

        def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
            tags = {k: clean(str(v)) for k, v in (tags or {}).items()}
            return super().create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)

    return ScrubbingClient


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and shows a
# training experiment as a GenAI one (traces first).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3's UI remembers a GenAI / model-training switch per browser (GenAI unless
# changed); links longview prints carry the model-training view in their query.
UI_MODEL_TRAINING = "?workflowType=machine_learning"


def experiment_id(client, experiment: str) -> str:
    """The experiment's id, created (or its tags completed) as a model-training experiment."""
    exp = client.get_experiment_by_name(experiment)
    tags = {**EXPERIMENT_TAGS,
            "mlflow.note.content": f"{experiment}: longview training jobs, their evaluations and experiments."}
    if exp is None:
        return client.create_experiment(experiment, tags=tags)
    for k, v in tags.items():
        if k not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def find_run(client, experiment: str, run_name: str) -> tuple[str, str | None]:
    """(experiment id, id of the job `run_name`'s run or None)."""
    exp_id = experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return exp_id, (found[0].info.run_id if found else None)


def find_or_create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, created) for the job `run_name` in `experiment`."""
    client = mlflow_client(uri)
    exp_id, found = find_run(client, experiment, run_name)
    if found:
        return found, False
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id, True


def code_version() -> str:
    """The git commit of the code running (a submitted job's copy has no .git: the
    submitter passes its commit in LONGVIEW_CODE_VERSION)."""
    import os
    import subprocess
    from pathlib import Path

    if os.environ.get("LONGVIEW_CODE_VERSION"):
        return os.environ["LONGVIEW_CODE_VERSION"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return "unknown"


def run_tags(cfg, *, kind: str) -> dict[str, str]:
    """MLflow's own tags for where a run comes from (its Source and Version columns) and
    longview's kind of run."""
    import sys

    commit = code_version()
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": f"longview {kind} ({cfg.workload})",
            "longview.kind": kind, "longview.workload": cfg.workload}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        tags["longview.code_version"] = commit
    tags["longview.python"] = sys.version.split()[0]
    return tags


def run_description(cfg, now: str = "") -> str:
    """The training run's description (its MLflow note) as the run now is: the job as
    configured, then `now` (running, resumed from where, finished where)."""
    job = (f"{cfg.workload} training job {cfg.name}: {cfg.training.steps} steps on {cfg.resources.workers} workers "
           f"({cfg.spec.layout(cfg)}). Checkpoints: {run_uri(cfg)}")
    return f"{job}. {now}" if now else job


def job_run(cfg, tags: dict[str, str], *, bound: str | None = None, by_name: bool = False) -> str | None:
    """The job's MLflow run id (None without tracking): `bound` (the run its storage
    names, `orchestrator.identity`) when the server has it; with `by_name`, the run
    tagged with the job's name (a run from before storage named its run); else a new
    run, with the job's config as params and as the artifact config/job.yaml. The
    driver passes the id to the workers and to evaluation."""
    if not cfg.tracking.uri:
        return None

    tags = {**run_tags(cfg, kind="training"), "mlflow.note.content": run_description(cfg), **tags}
    from mlflow.exceptions import MlflowException

    client = mlflow_client(cfg.tracking.uri)
    if bound:
        try:
            if client.get_run(bound).info.lifecycle_stage == "active":
                return bound
            log.warning("MLflow run %s of %s was deleted; a new run is created", bound, cfg.name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow at %s has no run %s (the run's storage names it); a new run is created",
                        cfg.tracking.uri, bound)
    if by_name:
        run_id, created = find_or_create_run(cfg.tracking.uri, cfg.experiment, cfg.name, tags)
    else:
        exp_id, earlier = find_run(client, cfg.experiment, cfg.name)
        if earlier:
            log.info("MLflow has an earlier run named %s (%s, other storage); this run is a new one", cfg.name,
                     earlier)
        # An experiment's arms lead with their label: MLflow's runs table cuts long names,
        # and `<experiment>-<label>` would read the same in every row.
        shown = f"{tags['longview.arm']} · {tags['longview.experiment']}" if "longview.arm" in tags else cfg.name
        run_id, created = client.create_run(exp_id, run_name=shown,
                                            tags={RUN_NAME_TAG: cfg.name, **tags}).info.run_id, True
    if created:
        import yaml
        from mlflow.entities import Param

        tr = Tracker(cfg.tracking.uri, run_id)
        params = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in cfg.spec.unused_keys}
        tr.call("log_batch", [], [Param(k, str(v)[:500]) for k, v in params.items()])
        tr.log_artifact_bytes(yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(), "config/job.yaml")
    return run_id


def log_dataset(uri: str, run_id: str, source: str, *, name: str, context: str = "training") -> None:
    """The run's data as an MLflow dataset input (the Datasets column and the run's
    inputs): its name, where it is, and a digest of that location."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = source.split("://", 1)[0] if "://" in source else "local"
    ds = Dataset(name=name, digest=hashlib.sha256(source.encode()).hexdigest()[:16], source_type=scheme,
                 source=f'{{"uri": "{source}"}}')
    mlflow_client(uri).log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])


def log_exported_model(uri: str, run_id: str, *, name: str, export: str, step: int, files: dict[str, bytes]) -> str:
    """The exported model as an MLflow logged model of the run (its Models column): the
    small files (config, tokenizer metadata) as its artifacts, the weights left where
    the export wrote them (tag `longview.export`), not copied. Returns the model's id."""
    import os
    import tempfile

    from mlflow.entities import LoggedModelOutput

    client = mlflow_client(uri)
    run = client.get_run(run_id)
    done = [m.model_id for m in (run.outputs.model_outputs if run.outputs else []) if m.step == step]
    if done:  # a resubmitted finished run exports the same step again: one model for it
        return done[0]
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags={"longview.export": export}, params={"trained_steps": str(step)})
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in files.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def run_url(uri: str, run_id: str) -> str:
    """The run's page in the MLflow UI; without the experiment's id if the server does
    not answer (the page is still reachable from the run id)."""
    try:
        exp = mlflow_client(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a tracking outage must not fail a finished run
        return f"{uri}/#/runs/{run_id}{UI_MODEL_TRAINING}"
    return f"{uri}/#/experiments/{exp}/runs/{run_id}{UI_MODEL_TRAINING}"


class Outbox:
    """MLflow records a run could not send before its end, kept in its storage (one JSON
    file per record, named in order) until `deliver` sends them: metrics, client calls
    (tags, status) and artifacts."""

    MAX_PENDING = 20_000  # metric values a tracker holds in memory before it keeps them here

    def __init__(self, fs, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri

    def put(self, record: dict) -> None:
        import json
        import uuid

        self.fs.pipe_file(f"{self.root}/{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.json",
                          json.dumps(record).encode())

    def names(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            return sorted(p for p in self.fs.ls(self.root, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []

    def deliver(self, uri: str, run_id: str) -> int:
        """Sends every kept record to run `run_id`, oldest first, each removed once the
        server took it; raises (keeping the rest) while the server does not answer."""
        import base64
        import json

        from mlflow.entities import Metric

        client = mlflow_client(uri)
        sent = 0
        for path in self.names():
            rec = json.loads(self.fs.cat_file(path))
            if rec["kind"] == "metrics":
                metrics = [Metric(k, v, ts, step) for k, v, ts, step in rec["metrics"]]
                for i in range(0, len(metrics), 1000):
                    client.log_batch(run_id, metrics=metrics[i:i + 1000])
            elif rec["kind"] == "call":
                getattr(client, rec["method"])(run_id, *rec["args"])
            elif rec["kind"] == "artifact":
                Tracker(uri, run_id).log_artifact_bytes(base64.b64decode(rec["data"]), rec["path"], strict=True)
            self.fs.rm(path)
            sent += 1
        return sent


class Tracker:
    """Buffered metric logging to one MLflow run (rank 0 only).

    bind: with no run id yet (the server did not answer when the run started), called
    to find or create the run once the server answers. outbox: where what could not be
    sent is kept (`keep`), and where calls that failed go."""

    def __init__(self, uri: str | None, run_id: str | None, *, metric_key: str = "loss", bind=None,
                 outbox: Outbox | None = None):
        self.uri, self.run_id, self._bind, self.outbox = uri, run_id, bind, outbox
        self.metric_key = metric_key
        self.enabled = bool(uri and (run_id or bind))
        self.pending: list = []  # metrics not yet accepted by the server
        self._warned = False
        self._gave_up = False  # a call that waited for the server did not get it: later calls do not wait
        self._synced = False  # whether the run's last logged step has been asked for
        self.last_logged_step = -1
        if self.enabled:
            try:
                self._run()
            except Exception as e:  # noqa: BLE001 - outage at start: log everything later
                self._warn(e)

    def _run(self) -> str:
        """The run id, on first contact with the server: the run bound if it had none yet,
        and its last logged step asked for (a restarted run drops what it logged before
        it went down). Raises while the server does not answer."""
        if self.run_id is None:
            self.run_id = self._bind()
            log.info("MLflow answers: the run is %s", self.run_id)
        if not self._synced:
            hist = mlflow_client(self.uri).get_metric_history(self.run_id, self.metric_key)
            logged = max((m.step for m in hist), default=-1)
            self.pending = [m for m in self.pending if m.step > logged]
            self.last_logged_step = max(self.last_logged_step, logged)
            self._synced = True
        return self.run_id

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            log.warning("MLflow at %s unreachable (%s); metrics are kept and sent when it answers again",
                        self.uri, type(e).__name__)
            self._warned = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or step <= self.last_logged_step:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if not self.flush() and self.outbox is not None and len(self.pending) > Outbox.MAX_PENDING:
            self.keep()  # a long outage: memory is not where a run's record waits

    def keep(self) -> int:
        """Moves the metrics the server has not taken into the outbox. Returns how many."""
        n = len(self.pending)
        if n and self.outbox is not None:
            self.outbox.put({"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step]
                                                             for m in self.pending]})
            self.last_logged_step = max(m.step for m in self.pending)
            self.pending = []
        return n

    def flush(self) -> bool:
        if not self.enabled or not self.pending:
            return True
        try:
            mlflow_client(self.uri).log_batch(self._run(), metrics=self.pending[:1000])
        except Exception as e:  # noqa: BLE001 - an outage keeps the metrics pending (spilled to the outbox)
            self._warn(e)
            return False
        self.last_logged_step = max([self.last_logged_step] + [m.step for m in self.pending[:1000]])
        self.pending = self.pending[1000:]
        self._warned = False
        return self.flush()

    def log_artifact_bytes(self, data: bytes, path: str, *, wait_s: float = 0.0, strict: bool = False) -> bool:
        """Uploads bytes as an artifact (through the tracking server's artifact proxy);
        kept in the outbox if the server does not take it (strict: raises instead)."""
        if not self.enabled:
            return False
        import base64
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            with open(local, "wb") as f:
                f.write(data)
            if strict:
                mlflow_client(self.uri).log_artifact(self._run(), local, os.path.dirname(path) or None)
                return True
            if self.call("log_artifact", local, os.path.dirname(path) or None, wait_s=wait_s, keep=False):
                return True
        if self.outbox is not None:
            self.outbox.put({"kind": "artifact", "path": path, "data": base64.b64encode(data).decode()})
        return False

    def call(self, method: str, *args: Any, wait_s: float = 0.0, keep: bool = True) -> bool:
        """Any other MlflowClient call (params, tags, status), tolerant of outages: tried
        again for up to `wait_s` seconds while the server does not answer (not at all
        once such a wait went unanswered), then kept in the outbox (`keep`, JSON args)."""
        if not self.enabled:
            return False
        deadline = time.monotonic() + (0.0 if self._gave_up else wait_s)
        while True:
            try:
                getattr(mlflow_client(self.uri), method)(self._run(), *args)
                self._gave_up = False
                return True
            except Exception as e:  # noqa: BLE001 - retried until the deadline, then kept in the outbox
                self._warn(e)
                if time.monotonic() >= deadline:
                    self._gave_up = self._gave_up or wait_s > 0
                    if keep and self.outbox is not None:
                        self.outbox.put({"kind": "call", "method": method, "args": list(args)})
                    return False
                time.sleep(2)

    def drain(self, wait_s: float) -> bool:
        """Sends every kept metric, waiting up to `wait_s` seconds for the server: the end
        of a run must not drop what an outage held back. False if some are still kept."""
        deadline = time.monotonic() + wait_s
        while not self.flush():
            if time.monotonic() >= deadline:
                log.warning("%d metric values not sent to MLflow at %s within %.0f s", len(self.pending),
                            self.uri, wait_s)
                return False
            time.sleep(2)
        return True


def png_image(data: bytes):
    """A PNG's bytes as the PIL image MLflow's `log_image` takes (it renders inline)."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def loss_curve_png(losses: list, title: str) -> bytes:
    """A PNG of loss against step (steps and losses as recorded in TrainState)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in losses], [v for _, v in losses], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return png_bytes(fig)
