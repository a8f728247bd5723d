"""`longview eval`: the workload's evaluation of a trained model, on Ray.

The driver asks the workload's `Evaluation` to prepare its data (written to storage
once), then runs one Ray Train worker group (`ray_job.build_trainer`, the same builder
as training) whose workers run `worker.eval_loop`. Rank 0 writes the result to
<run>/eval/; the driver records it in an MLflow run of its own (`EvalRun`), a child of
the job's run: params of what was evaluated, the table and figure as artifacts, the
curves as metrics whose step is the curve's x (V2PE: context length), a real duration,
and FAILED with the reason when the evaluation does not finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from .config import ConfigError, JobConfig, to_dict
from .errors import failure_reason
from .identity import read_run_record
from .placement import PlacementTimeout, PlacementWatch
from .ray_job import HeadWatch, build_trainer, connect_checked, connect_ray, run_output
from .storage import read_export_meta, run_uri, storage_fs
from .tracking import find_run, mlflow_client, not_fatal, png_image, run_tags
from .worker import eval_loop

log = logging.getLogger(__name__)
EXPORT = "export"  # the model written at the end of training


def run_evaluation(cfg: JobConfig, *, checkpoint: str | None = None, ray_address: str | None = None,
                   data_root: str | None = None, shown_as: str | None = None) -> dict:
    """Evaluates the run's exported model (or `checkpoint`); returns the result
    ({"table", "records", "metrics", "curves", "files", "mlflow_run_id"}). data_root:
    where the evaluation data is written once (default: the run's folder; an experiment
    shares one between its runs); shown_as: the MLflow run's name (default `<name>-eval`)."""
    if cfg.spec.evaluation is None:
        raise ConfigError(f"workload: {cfg.workload!r} has no evaluation")
    evaluation = cfg.spec.evaluation()
    # A cluster that can never hold the workers: refused before anything starts.
    connect_checked(cfg, ray_address, f"evaluation of {cfg.name}")
    model = checkpoint or run_uri(cfg, EXPORT)
    fs, path = storage_fs(model, cfg)  # also points the workload's plain fsspec calls at the job's S3
    if not fs.exists(path):  # before anything starts: no data written, no MLflow run, no Ray job
        raise FileNotFoundError(f"no trained model at {model}: train {cfg.name} first, or pass --checkpoint")
    mlflow_run = EvalRun(cfg, model, evaluation.params(cfg), shown_as=shown_as or f"{cfg.name}-eval")
    try:
        log.info("preparing evaluation data ...")
        prepared = evaluation.prepare(cfg, data_root or run_uri(cfg), model)
        out = run_uri(cfg, "eval")
        with run_output(cfg, "eval", mlflow_run.log_bytes):
            connect_ray(cfg, ray_address)
            log.info("evaluating %s on %d workers ...", model, cfg.resources.max_workers)
            trainer = build_trainer(cfg, eval_loop, {"job": to_dict(cfg), "model": model,
                                                     "prepared": prepared, "out": out},
                                    run_name=f"{cfg.name}-eval-{os.getpid()}")
            with PlacementWatch(cfg, f"evaluation of {cfg.name}", timeout_s=cfg.resources.placement_timeout_s) as watch, \
                    HeadWatch.on_lost(mlflow_run.failed_because):
                try:
                    trainer.fit()
                except (KeyboardInterrupt, SystemExit):
                    if watch.timed_out:  # stopped by the watch: a failure, not the user's stop
                        raise PlacementTimeout(watch.timed_out) from None
                    raise
        fs, root = storage_fs(out, cfg)
        result = json.loads(fs.cat_file(f"{root}/result.json"))
        fs.pipe_file(f"{root}/result.md", result["table"].encode())
        figure = evaluation.figure(cfg, result["records"])
        if figure:  # beside the table in storage too, not only on the MLflow run
            fs.pipe_file(f"{root}/{evaluation.figure_name(cfg)}", figure)
        # Every file the evaluation wrote (table, figure, responses), for the command to name.
        result["files"] = sorted(f"{out}/{p[len(root.rstrip('/')) + 1:]}" for p in fs.find(root))
    except BaseException as e:
        mlflow_run.failed(e)
        raise
    mlflow_run.finished(result, figure, evaluation.figure_name(cfg))
    result["mlflow_run_id"] = mlflow_run.run_id
    return result


class EvalRun:
    """The evaluation's MLflow run, a child of the job's run when there is one: created
    when the evaluation starts (so its duration is real), with the evaluation's params,
    the model evaluated and its training step; ended FINISHED with the result, or FAILED
    with the reason. Never fatal: the result is in storage whatever MLflow does."""

    def __init__(self, cfg: JobConfig, model: str, params: dict[str, str], *, shown_as: str):
        self.cfg, self.model, self.run_id, self.client = cfg, model, None, None
        if not cfg.tracking.uri:
            return
        with self._not_fatal():
            self.client = mlflow_client(cfg.tracking.uri)
            exp_id, parent = find_run(self.client, cfg.experiment, cfg.name)
            record = read_run_record(cfg)  # the run this storage's model was trained in, if it names one
            parent = record["mlflow_run_id"] if record else parent
            # Not tagged with RUN_NAME_TAG: that tag finds a job's own (training) run.
            tags = {**run_tags(cfg, kind="evaluation"), "longview.evaluates": cfg.name, "longview.model": model,
                    "mlflow.note.content": f"Evaluation of {model} ({cfg.workload}, run {cfg.name})."}
            if parent:
                tags["mlflow.parentRunId"] = parent
            self.run_id = self.client.create_run(exp_id, run_name=shown_as, tags=tags).info.run_id
            from mlflow.entities import Param

            params = {"model": model, "trained_steps": str(_trained_steps(model, cfg)), **params}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    @contextlib.contextmanager
    def _not_fatal(self):
        """A failure inside is one warning (`tracking.not_fatal`), and the run is left alone from then on."""
        ok = False
        with not_fatal("the evaluation", run_uri(self.cfg, "eval")):
            yield
            ok = True
        if not ok:
            self.run_id = None

    def log_bytes(self, data: bytes, path: str) -> None:
        """A file (the run's log) as an artifact of the evaluation's run."""
        if self.run_id is None:
            return
        import tempfile

        with self._not_fatal(), tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            with open(local, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, local, os.path.dirname(path) or None)

    def failed(self, e: BaseException) -> None:
        self.failed_because(failure_reason(e) if isinstance(e, Exception) else type(e).__name__,
                            "FAILED" if isinstance(e, Exception) else "KILLED")

    def failed_because(self, reason: str, status: str = "FAILED") -> None:
        if self.run_id is None:
            return
        with self._not_fatal():
            self.client.set_tag(self.run_id, "longview.failure", reason[:5000])
            self.client.set_tag(self.run_id, "mlflow.note.content", f"Evaluation failed: {reason}"[:5000])
            self.client.set_terminated(self.run_id, status)

    def finished(self, result: dict, figure: bytes | None, figure_name: str) -> None:
        if self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, 0) for k, v in result["metrics"].items()]
        metrics += [Metric(k, float(v), ts, int(x)) for k, curve in result.get("curves", {}).items()
                    for x, v in curve.items()]
        with self._not_fatal():
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            # The headline at the top of the run's page: its description ends with the table.
            note = f"Evaluation of {self.model} ({self.cfg.workload}, run {self.cfg.name}).\n\n{result['table']}"
            self.client.set_tag(self.run_id, "mlflow.note.content", note[:5000])
            self.client.log_text(self.run_id, result["table"], "result.md")
            if figure:
                self.client.log_image(self.run_id, png_image(figure), figure_name)
            self.client.set_terminated(self.run_id, "FINISHED")


def _trained_steps(model: str, cfg: JobConfig) -> int | str:
    """The training step of the exported model (its `longview.json`), else '-'."""
    meta = read_export_meta(model, cfg)
    return int(meta["step"]) if meta else "-"
