"""`longview experiment CONFIG`: the workload's comparison, trained and evaluated.

The workload's `Evaluation.comparison` names the arms: runs that differ from the job in
CONFIG only in a few config keys (V2PE: its position mode against plain positions, the
length-generalisation claim). Each arm is trained (`longview train`) and evaluated
(`longview eval`) one after the other, with the same data, steps and seed, as a run
named `<name>-<label>`; the evaluation data is written once and shared. The workload's
`Evaluation.compare` turns the results into a joint table and figure, written to
`--out` and logged to MLflow: each arm's evaluation run carries its own curves (so
MLflow's chart view compares them), and one run of kind `experiment` holds the joint
figure and table with each arm's curves as `<label>/<curve>`.
"""

from __future__ import annotations

import logging
import os
import time

from .config import JobConfig, from_dict, to_dict
from .evaluate import run_evaluation
from .launch import run_training
from .storage import run_uri
from .tracking import experiment_id, mlflow_client, not_fatal, png_image, run_tags, run_url

log = logging.getLogger(__name__)


def arm_config(cfg: JobConfig, label: str, overrides: dict) -> JobConfig:
    """The job as arm `label`: only the name and the arm's overrides differ."""
    return from_dict(to_dict(cfg), overrides={"name": f"{cfg.name}-{label}", **overrides})


def run_experiment(cfg: JobConfig, *, ray_address: str | None = None, out_dir: str | None = None) -> str:
    """Trains and evaluates every arm; returns the joint report (Markdown). A job the
    workload cannot compare raises its FieldError (a ValueError) before anything runs."""
    if cfg.spec.evaluation is None:
        raise ValueError(f"workload: {cfg.workload!r} has no evaluation to compare runs with")
    evaluation = cfg.spec.evaluation()
    comparison = evaluation.comparison(cfg)
    started = time.time()
    results, timings = {}, {}
    for label, overrides in comparison.arms.items():
        arm = arm_config(cfg, label, overrides)
        t0 = time.time()
        log.info("[%s] training %s: %d steps", label, arm.name, arm.training.steps)
        run_training(arm, ray_address=ray_address, tags={"longview.experiment": cfg.name, "longview.arm": label})
        t1 = time.time()
        log.info("[%s] evaluating %s", label, arm.name)
        results[label] = run_evaluation(arm, ray_address=ray_address, data_root=run_uri(cfg),
                                        shown_as=f"{label} eval · {cfg.name}")
        timings[label] = (t1 - t0, time.time() - t1)
    table, figure = evaluation.compare(cfg, results)
    report = f"{table}\n\n{_timing_lines(timings, time.time() - started)}\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if figure:
            with open(os.path.join(out_dir, f"{comparison.name}.png"), "wb") as f:
                f.write(figure)
        with open(os.path.join(out_dir, f"{comparison.name}.md"), "w") as f:
            f.write(report)
        log.info("figure and table written to %s", out_dir)
    _log_experiment(cfg, comparison, results, figure, report, time.time() - started)
    return report


def _timing_lines(timings: dict[str, tuple[float, float]], total: float) -> str:
    parts = [f"{m}: training {t:.0f} s, evaluation {e:.0f} s" for m, (t, e) in timings.items()]
    return f"Wall time {total / 60:.1f} min ({'; '.join(parts)})."


def _log_experiment(cfg: JobConfig, comparison, results: dict, figure: bytes | None, report: str,
                    seconds: float) -> None:
    """One MLflow run of kind `experiment` with the joint figure and table, and each
    arm's curves as metrics `<label>/<curve>` at step = the curve's x."""
    if not cfg.tracking.uri:
        return
    from mlflow.entities import Metric, Param

    with not_fatal("the experiment's figure and table"):
        client = mlflow_client(cfg.tracking.uri)
        exp = experiment_id(client, cfg.experiment)
        run = client.create_run(exp, run_name=f"comparison · {cfg.name}", start_time=int((time.time() - seconds) * 1000),
                                tags={**run_tags(cfg, kind="experiment"), "longview.experiment": cfg.name,
                                      "mlflow.note.content": comparison.description})
        rid = run.info.run_id
        params = {"arms": ",".join(results), "steps": cfg.training.steps, "seed": cfg.training.seed,
                  **comparison.params}
        ts = int(time.time() * 1000)
        metrics = [Metric(f"{label}/{k}", float(v), ts, int(x)) for label, res in results.items()
                   for k, curve in res["curves"].items() for x, v in curve.items()]
        client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            client.log_batch(rid, metrics=metrics[i : i + 1000])
        client.log_text(rid, report, f"{comparison.name}.md")
        if figure:
            client.log_image(rid, png_image(figure), f"{comparison.name}.png")
        client.set_terminated(rid, "FINISHED")
        log.info("MLflow run of the comparison (joint figure and table): %s", run_url(cfg.tracking.uri, rid))
