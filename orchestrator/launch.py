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
    from .tracking import Tracker, job_run

    log.info("preparing data ...")
    prepare_data(cfg)
    run_id = job_run(cfg, {"longview.checkpoint_uri": run_uri(cfg), "longview.workload": cfg.workload,
                           **(tags or {})})
    connect_ray(cfg, ray_address)
    trainer = build_trainer(cfg, train_loop,
                            {"job": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri},
                            run_name=cfg.name, max_failures=cfg.training.max_failures, elastic=True)
    tracker = Tracker(cfg.tracking.uri, run_id)
    try:
        result = trainer.fit()  # raises once FailureConfig's retries are used up
    except BaseException:
        tracker.call("set_terminated", "FAILED")
        raise
    store = checkpoint_store(cfg)
    last = store.latest_complete()
    final = store.location(last) if last else ""
    # The run's end goes on the record even if the server is restarting just now.
    tracker.call("set_tag", "longview.final_checkpoint", final, wait_s=END_WAIT_S)
    tracker.call("set_terminated", "FINISHED", wait_s=END_WAIT_S)
    return result, run_id, final
