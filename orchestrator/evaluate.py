"""`longview eval`: the workload's evaluation of a trained model, on Ray.

The driver asks the workload's `Evaluation` to prepare its data (written to storage
once), then runs one Ray Train worker group (`ray_job.build_trainer`, the same builder
as training) whose workers run `worker.eval_loop`. Rank 0 writes the result to
<run>/eval/; the driver logs it to MLflow as a nested run of the job's run: the table as
an artifact, each figure as a metric.
"""

from __future__ import annotations

import json
import logging
import os

from .config import ConfigError, JobConfig, to_dict
from .ray_job import build_trainer, connect_ray
from .storage import run_uri, storage_fs

log = logging.getLogger(__name__)
EXPORT = "export"  # the model written at the end of training


def run_evaluation(cfg: JobConfig, *, checkpoint: str | None = None, ray_address: str | None = None) -> str:
    """Evaluates the run's exported model (or `checkpoint`); returns the result's table."""
    from .tracking import job_run
    from .worker import eval_loop

    if cfg.spec.evaluation is None:
        raise ConfigError(f"workload: {cfg.workload!r} has no evaluation")
    evaluation = cfg.spec.evaluation()
    model = checkpoint or run_uri(cfg, EXPORT)
    fs, path = storage_fs(model, cfg)  # also points the workload's plain fsspec calls at the job's S3
    if not fs.exists(path):  # before anything starts: no data written, no MLflow run, no Ray job
        raise FileNotFoundError(f"no trained model at {model}: train {cfg.name} first, or pass --checkpoint")
    log.info("preparing evaluation data ...")
    prepared = evaluation.prepare(cfg, run_uri(cfg), model)
    out = run_uri(cfg, "eval")
    connect_ray(cfg, ray_address)
    log.info("evaluating %s on %d workers ...", model, cfg.resources.max_workers)
    trainer = build_trainer(cfg, eval_loop, {"job": to_dict(cfg), "model": model,
                                             "prepared": prepared, "out": out},
                            run_name=f"{cfg.name}-eval-{os.getpid()}")
    trainer.fit()
    fs, root = storage_fs(out, cfg)
    result = json.loads(fs.cat_file(f"{root}/result.json"))
    fs.pipe_file(f"{root}/result.md", result["table"].encode())
    if cfg.tracking.uri:
        _log_nested(cfg, job_run(cfg, {}), result)
    return result["table"]


def _log_nested(cfg: JobConfig, parent: str, result: dict) -> None:
    from mlflow.entities import Metric

    from .tracking import mlflow_client

    try:
        client = mlflow_client(cfg.tracking.uri)
        exp_id = client.get_run(parent).info.experiment_id
        run = client.create_run(exp_id, run_name=f"{cfg.name}-eval",
                                tags={"mlflow.parentRunId": parent, "longview.kind": "evaluation"})
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in result["metrics"].items()])
        client.log_text(run.info.run_id, result["table"], "result.md")
        client.set_terminated(run.info.run_id)
    except Exception as e:  # noqa: BLE001 - the result is in storage whatever MLflow does
        log.warning("evaluation not logged to MLflow (%s: %s); the result is at %s", type(e).__name__, e,
                    run_uri(cfg, "eval"))
