"""The driver side of a training job: data, the MLflow run, the Ray Train fit.

`run_training` takes the run's lease (one writer per run, `identity.RunLease`), checks
what a resume would change against its newest checkpoint (`resume.check`: refused
before anything starts if the run cannot take it), asks the workload to prepare its
data (written to the run's storage once), finds the run's MLflow run (named in its
storage, `identity`) or creates it, and fits a TorchTrainer (`ray_job.build_trainer`)
running `worker.train_loop`. A failed worker group is started again from the last
checkpoint up to `training.max_failures` times, unless its error is one a restart
would meet again (`retriable`); the workers write and rotate checkpoints themselves
(`Checkpointer`).
"""

from __future__ import annotations

import errno
import logging
import time

from .checkpoint import checkpoint_store
from .config import JobConfig, to_dict
from .errors import InputError, StorageUnreachable, failure_reason, first_line
from .identity import RunLease, bind_run, deliver_outbox, outbox, remember_pending, run_tags_of
from .placement import PlacementTimeout, PlacementWatch
from .ray_job import HeadWatch, RunStopped, build_trainer, connect_checked, connect_ray, run_output, stop_signal
from .resume import check, describe
from .storage import backend_for, read_export_meta, resolved, run_uri, storage_fs
from .storage.s3 import OUTAGE, retry_window_s
from .tracking import Tracker, log_dataset, log_exported_model, not_fatal, run_description
from .worker import train_loop

log = logging.getLogger(__name__)


def prepare_data(cfg: JobConfig) -> None:
    """The workload's data preparation, with fsspec pointed at the job's S3 endpoint."""
    storage_fs(run_uri(cfg), cfg)  # sets the endpoint for the plain fsspec calls of the workload
    cfg.spec.prepare_data(cfg, run_uri(cfg))


# Failures a restart would meet again: the run ends on the first (by class name, as the
# workers' errors reach the driver as copies inside Ray's own errors).
NOT_RETRIED = ("ConfigError", "KernelUnavailable", "DataError", "TokenizerError", "CheckpointMismatch", "DivergenceError",
               "PretrainedError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError",
               # the code itself is wrong (an API it was not written for): the same again on restart
               "TypeError", "AttributeError", "NameError", "ImportError")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _errors(e: BaseException):
    """`e`, its causes, and the worker and controller errors inside Ray Train's."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "_base_exc", None), getattr(x, "controller_failure", None),
                 *getattr(x, "worker_failures", {}).values()]


def retriable(e: BaseException) -> bool:
    """Whether restarting the worker group could get past `e`: not for our errors that
    name a bad input, a missing file, a full disk or a diverged run."""
    for x in _errors(e):
        if any(c.__name__ in NOT_RETRIED for c in type(x).__mro__):
            return False
        if (isinstance(x, OSError) and x.errno in NO_SPACE) or "No space left on device" in str(x):
            return False
    return True


def check_resume(cfg: JobConfig, store) -> tuple[str | None, list]:
    """(the checkpoint a start resumes from or None, the config changes it applies);
    raises ResumeRefused for changes the run cannot take, before anything starts."""
    name = store.latest_complete()
    if name is None:
        return None, []
    manifest = store.manifest(name)
    if manifest.get("job") is None:  # written before checkpoints recorded their config
        log.warning("checkpoint %s does not record its config: the resume cannot check what changed",
                    store.location(name))
        return name, []
    return name, check(manifest["job"], cfg, checkpoint=store.location(name), world_size=manifest["world_size"],
                       engine=manifest["engine"])


def _record_resume(cfg: JobConfig, tracker, resumed: str | None, applied: list) -> None:
    """What a resume changed, on the run's record: MLflow params cannot change, so a tag
    per resume lists the changes and config/job.yaml is replaced by the config in effect."""
    if not resumed or not applied:
        return
    import yaml

    log.info("resuming from %s with changes: %s", resumed, describe(applied))
    tracker.call("set_tag", f"longview.resume.{resumed}", describe(applied)[:5000])
    tracker.log_artifact_bytes(yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(), "config/job.yaml")


def run_training(cfg: JobConfig, *, ray_address: str | None = None, tags: dict | None = None):
    """Fits the job on the Ray cluster at `ray_address` ("local": in-process), holding
    the run's lease (one writer per run) from the first check to the last record.
    Returns (Ray's Result, the MLflow run id or None, the last complete checkpoint's URI)."""
    # A cluster that can never hold the workers: refused before anything starts.
    connect_checked(cfg, ray_address, f"training {cfg.name}")
    with RunLease(cfg):
        return _run_training(cfg, ray_address=ray_address, tags=tags)


def _start_run(cfg: JobConfig, run_tags: dict, *, by_name: bool) -> str | None:
    """The run's MLflow run id, and what an earlier outage kept for it sent; None (with
    a warning) while the server does not answer: training starts without it, and the
    run is bound when the server first answers (`Tracker(bind=...)`)."""
    if not cfg.tracking.uri:
        return None
    try:
        run_id = bind_run(cfg, run_tags, by_name=by_name)
        sent = deliver_outbox(cfg)
        if sent:
            log.info("sent %d MLflow records an earlier outage had kept in storage", sent)
        return run_id
    except Exception as e:  # noqa: BLE001 - an outage must not keep training from starting
        log.warning("MLflow at %s does not answer (%s: %s): training starts without it; the run is created and "
                    "its metrics sent when it answers", cfg.tracking.uri, type(e).__name__, first_line(e))
        return None


def _run_training(cfg: JobConfig, *, ray_address: str | None, tags: dict | None):
    import functools

    store = checkpoint_store(cfg)
    dropped = store.drop_incomplete()
    if dropped:
        log.info("removed %s: incomplete (a save cut short by a stop or a crash)", ", ".join(dropped))
    resumed, applied = check_resume(cfg, store)
    log.info("preparing data ...")
    prepare_data(cfg)
    run_tags = run_tags_of(cfg, tags)
    by_name = bool(store.names())  # a run from before run.json: its MLflow run is found by name
    run_id = _start_run(cfg, run_tags, by_name=by_name)
    if run_id and cfg.spec.data_source is not None:
        with not_fatal("the training data"):
            log_dataset(cfg.tracking.uri, run_id, cfg.spec.data_source(cfg, run_uri(cfg)), name=f"{cfg.name}-train")
    tracker = Tracker(cfg.tracking.uri, run_id, bind=functools.partial(bind_run, cfg, run_tags, by_name=by_name),
                      outbox=outbox(cfg))
    # The description says what the run is now, not what an earlier stop or config said.
    since = (f"Running since {time.strftime('%Y-%m-%d %H:%M')}, resumed from {store.location(resumed)} (step "
             f"{store.manifest(resumed)['state']['step']})." if resumed else
             f"Running since {time.strftime('%Y-%m-%d %H:%M')}.")
    tracker.call("set_tag", "mlflow.note.content", run_description(cfg, since)[:5000])
    with run_output(cfg, "train", tracker.log_artifact_bytes):
        connect_ray(cfg, ray_address)  # connected already (`connect_checked`): Ray's output is routed now
        _record_resume(cfg, tracker, resumed, applied)
        result = _fit(cfg, store, tracker, run_id, run_tags)
    last = store.latest_complete()
    final = store.location(last) if last else ""
    if cfg.tracking.uri:
        # What the workers kept for a server that was down at their end, if it is back;
        # what is still kept is counted below.
        with not_fatal("the records the workers kept"):
            deliver_outbox(cfg)
    run_id = tracker.run_id  # bound meanwhile if the server was down at the start
    if run_id:
        _log_model(cfg, run_id)
    # The run's end goes on the record even if the server is restarting just now; if it
    # does not answer within tracking.wait_s, the end is kept with the rest.
    tracker.call("set_tag", "longview.final_checkpoint", final, wait_s=cfg.tracking.wait_s)
    done = _finished_line(store.manifest(last)["state"], final) if last else "Finished."
    tracker.call("set_tag", "mlflow.note.content", run_description(cfg, done)[:5000], wait_s=cfg.tracking.wait_s)
    tracker.call("set_terminated", "FINISHED", wait_s=cfg.tracking.wait_s)
    kept = len(tracker.outbox.names()) if cfg.tracking.uri else 0
    if kept:
        remember_pending(cfg)
        log.warning("MLflow at %s did not answer: %d records of this run (metrics, tags, its status) are kept in "
                    "%s; the next start or `longview runs` sends them", cfg.tracking.uri, kept, tracker.outbox.uri)
    return result, run_id, final


def _finished_line(state: dict, final: str) -> str:
    """The headline of a finished run, for its description (the top of its MLflow page)."""
    losses = state.get("losses") or []
    loss = f": loss {losses[-1][1]:.4g} (step 1: {losses[0][1]:.4g})" if losses else ""
    return f"Finished at step {state['step']}{loss}; last checkpoint {final}."


def _fit(cfg: JobConfig, store, tracker, run_id: str | None, run_tags: dict):
    """Ray Train's fit, started again after a retriable failure; the MLflow run ended
    KILLED (stopped) or FAILED (with the reason) when it does not finish."""
    watch = None
    try:
        for attempt in range(cfg.training.max_failures + 1):
            # Ray retries nothing itself (max_failures=0): a failure that a restart would
            # only meet again (bad data, a full disk, divergence) must end the run at once.
            trainer = build_trainer(cfg, train_loop,
                                    {"job": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri,
                                     "run_tags": run_tags},
                                    run_name=cfg.name, max_failures=0, elastic=True)
            try:
                with PlacementWatch(cfg, f"training {cfg.name}", timeout_s=cfg.resources.placement_timeout_s) as watch, \
                        HeadWatch.on_lost(lambda reason: _record_failure(tracker, reason)):
                    result = trainer.fit()
                break
            except Exception as e:
                if attempt == cfg.training.max_failures or not retriable(e):
                    if _met_storage_outage(e):  # the outage is the cause to name, whatever else failed with it
                        _storage_answers(cfg, e)
                    raise
                _storage_answers(cfg, e)
                log.warning("attempt %d of %s failed (%s); restarting from its last checkpoint (retry %d of "
                            "training.max_failures=%d)", attempt + 1, cfg.name,
                            failure_reason(e, storage_retries=cfg.storage.retries), attempt + 1,
                            cfg.training.max_failures)
    except (KeyboardInterrupt, SystemExit):
        # Stopped: Ray's own SIGINT handler has aborted the worker group (its `sys.exit`
        # is the SystemExit), so no save is in flight any more and a cut one can go.
        store.drop_incomplete()
        if watch is not None and watch.timed_out:  # stopped by the watch: a failure, not the user's stop
            _record_failure(tracker, watch.timed_out)
            raise PlacementTimeout(watch.timed_out) from None
        last = store.latest_complete()
        where = (f"it resumes from {store.location(last)} (step {store.manifest(last)['state']['step']}) when "
                 "started again" if last else "it had no complete checkpoint yet: a new start begins at step 0")
        line = f"training {cfg.name} stopped ({stop_signal()}); {where}"
        tracker.call("set_tag", "mlflow.note.content", f"Stopped: {line}"[:5000])
        tracker.call("set_terminated", "KILLED")
        raise RunStopped(line) from None
    except BaseException as e:
        # The run says why it failed (its description in the UI), and is never left RUNNING.
        _record_failure(tracker, failure_reason(e, storage_retries=cfg.storage.retries))
        _drop_cut_saves(store)
        raise
    return result


# What a request to an endpoint that does not answer raises (botocore), as it reaches the
# driver: the error's class, or its text inside ours (a checkpoint that could not be written).
STORAGE_OUTAGE_SIGNS = ("EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
                        "Could not connect to the endpoint URL")


def _met_storage_outage(e: BaseException) -> bool:
    return any(sign in f"{type(x).__name__}: {x}" for x in _errors(e) for sign in STORAGE_OUTAGE_SIGNS)


def _storage_answers(cfg: JobConfig, e: BaseException) -> None:
    """Before the workers are started again: their storage answers, else the run ends
    (StorageUnreachable) instead of restarting into an outage that outlasted their
    retries: a restart would only wait out the same window again, max_failures times."""
    uri = resolved(cfg.storage.uri)
    try:
        backend_for(uri).check_reachable(uri, cfg.storage)
    except InputError as down:
        OUTAGE.confirmed_down()  # the driver's own last records fail at once, not after another window
        raise StorageUnreachable(
            f"{down}; the workers failed after retrying it for {retry_window_s(cfg.storage.retries):.0f} s "
            f"(storage.retries={cfg.storage.retries}) and are not restarted into it: run the same command when it "
            f"answers, the run resumes from its last checkpoint (first failure: "
            f"{failure_reason(e, storage_retries=cfg.storage.retries)})") from None


def _drop_cut_saves(store) -> None:
    """After a failure: no worker writes any more, so a save the failure cut short (a
    full disk, a dead worker) goes now rather than at the next start."""
    try:
        dropped = store.drop_incomplete()
    except Exception as e:  # noqa: BLE001 - storage down: the next start drops them
        log.info("incomplete checkpoints not looked for (%s); the next start removes them", type(e).__name__)
        return
    if dropped:
        log.info("removed %s: incomplete (the save the failure cut short)", ", ".join(dropped))


def _record_failure(tracker, reason: str) -> None:
    tracker.call("set_tag", "longview.failure", reason[:5000])
    tracker.call("set_tag", "mlflow.note.content", f"Training failed: {reason}"[:5000])
    tracker.call("set_terminated", "FAILED")


def _log_model(cfg: JobConfig, run_id: str) -> None:
    """The export (when the workload wrote one) as the run's logged MLflow model."""
    export = run_uri(cfg, "export")
    fs, root = storage_fs(export, cfg)
    with not_fatal("the exported model", export):
        meta = read_export_meta(export, cfg)
        if meta is None:
            return
        small = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.ls(root, detail=False)
                 if p.endswith(".json") and fs.size(p) < 1 << 20}
        log_exported_model(cfg.tracking.uri, run_id, name=cfg.name, export=export, step=int(meta["step"]), files=small)
