"""The driver side of a training job: data, the MLflow run, the Ray Train fit.

`run_training` asks the workload to prepare its data (written to the run's storage
once), finds or creates the job's MLflow run (the one source of its id, handed to the
workers), and fits a TorchTrainer (`ray_job.build_trainer`) running
`worker.train_loop`, with `FailureConfig` so a failed worker group restarts from the
last checkpoint (the workers write and rotate checkpoints themselves, `Checkpointer`).
"""

from __future__ import annotations

import logging

from .config import JobConfig, to_dict
from .ray_job import build_trainer, connect_ray
from .storage import checkpoint_store, run_uri, storage_fs
from .worker import END_WAIT_S, train_loop

log = logging.getLogger(__name__)


def prepare_data(cfg: JobConfig) -> None:
    """The workload's data preparation, with fsspec pointed at the job's S3 endpoint."""
    storage_fs(run_uri(cfg), cfg)  # sets the endpoint for the plain fsspec calls of the workload
    cfg.spec.prepare_data(cfg, run_uri(cfg))


def run_training(cfg: JobConfig, *, ray_address: str | None = None, tags: dict | None = None):
    """Fits the job on the Ray cluster at `ray_address` ("local": in-process).
    Returns (Ray's Result, the MLflow run id or None, the last complete checkpoint's URI)."""
    from .tracking import Tracker, job_run, log_dataset

    log.info("preparing data ...")
    prepare_data(cfg)
    run_id = job_run(cfg, {"longview.checkpoint_uri": run_uri(cfg), "longview.workload": cfg.workload,
                           **(tags or {})})
    if run_id and cfg.spec.data_source is not None:
        try:
            log_dataset(cfg.tracking.uri, run_id, cfg.spec.data_source(cfg, run_uri(cfg)), name=f"{cfg.name}-train")
        except Exception as e:  # noqa: BLE001 - the record of the data is not worth a failed run
            log.warning("training data not logged to MLflow (%s: %s)", type(e).__name__, e)
    connect_ray(cfg, ray_address)
    trainer = build_trainer(cfg, train_loop,
                            {"job": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri},
                            run_name=cfg.name, max_failures=cfg.training.max_failures, elastic=True)
    tracker = Tracker(cfg.tracking.uri, run_id)
    try:
        result = trainer.fit()  # raises once FailureConfig's retries are used up
    except BaseException as e:
        # The run says why it failed (its description in the UI), and is never left RUNNING.
        from .cli import failure_reason

        reason = failure_reason(e, storage_retries=cfg.storage.retries) if isinstance(e, Exception) \
            else f"{type(e).__name__}: interrupted"
        tracker.call("set_tag", "longview.failure", reason[:5000])
        tracker.call("set_tag", "mlflow.note.content", f"Training failed: {reason}"[:5000])
        tracker.call("set_terminated", "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    store = checkpoint_store(cfg)
    last = store.latest_complete()
    final = store.location(last) if last else ""
    if run_id:
        _log_model(cfg, run_id)
    # The run's end goes on the record even if the server is restarting just now.
    tracker.call("set_tag", "longview.final_checkpoint", final, wait_s=END_WAIT_S)
    tracker.call("set_terminated", "FINISHED", wait_s=END_WAIT_S)
    return result, run_id, final


def _log_model(cfg: JobConfig, run_id: str) -> None:
    """The export (when the workload wrote one) as the run's logged MLflow model."""
    from .storage import read_export_meta
    from .tracking import log_exported_model

    export = run_uri(cfg, "export")
    fs, root = storage_fs(export, cfg)
    try:
        meta = read_export_meta(export, cfg)
        if meta is None:
            return
        small = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.ls(root, detail=False)
                 if p.endswith(".json") and fs.size(p) < 1 << 20}
        log_exported_model(cfg.tracking.uri, run_id, name=cfg.name, export=export, step=int(meta["step"]), files=small)
    except Exception as e:  # noqa: BLE001
        log.warning("exported model not logged to MLflow (%s: %s); it is at %s", type(e).__name__, e, export)
