"""`longview experiment CONFIG`: V2PE's length-generalisation claim, measured.

The job in CONFIG (trained with its `data.position_mode`, V2PE's `v2pe_rnd`) and a
baseline that differs only in `data.position_mode: default` (δ = 1, plain positions)
are trained one after the other on the same data with the same steps and seed, as two
runs named `<name>-<mode>`. Each is evaluated (`longview eval`) on the same samples at
the configured lengths and δs (the evaluation data is written once and shared). The
result, a figure of accuracy against context length (one line per (training mode, δ))
and the table beside it, is written to `--out` and logged to MLflow: each arm's
evaluation run carries its own curves (`accuracy_delta_1_4` at step = context length,
so MLflow's chart view compares the two runs), and one run of kind `experiment` holds
the joint figure and table.
"""

from __future__ import annotations

import logging
import os
import time

from .config import JobConfig, from_dict, to_dict
from .storage import run_uri

log = logging.getLogger(__name__)
BASELINE = "default"
FIGURE = "length-generalisation.png"
TABLE = "length-generalisation.md"


def arm_config(cfg: JobConfig, mode: str) -> JobConfig:
    """The job trained with position mode `mode`: only the name and the mode differ."""
    return from_dict(to_dict(cfg), overrides={"name": f"{cfg.name}-{mode}", "data.position_mode": mode})


def run_experiment(cfg: JobConfig, *, ray_address: str | None = None, out_dir: str | None = None) -> str:
    """Trains and evaluates both arms; returns the joint table (Markdown)."""
    from workloads.v2pe.evaluate import accuracy_figure

    from .evaluate import run_evaluation
    from .launch import run_training

    if cfg.workload != "v2pe":
        raise ValueError(f"workload: the length experiment compares V2PE position modes; got {cfg.workload!r}")
    if cfg.data.position_mode == BASELINE:
        raise ValueError(f"data.position_mode: {BASELINE!r} is the baseline; train the job with v2pe_rnd")
    if not cfg.evaluation.lengths:
        raise ValueError("evaluation.lengths: empty; the experiment evaluates at several lengths")
    started = time.time()
    results, timings = {}, {}
    for mode in (cfg.data.position_mode, BASELINE):
        arm = arm_config(cfg, mode)
        t0 = time.time()
        log.info("[%s] training %s: %d steps", mode, arm.name, arm.training.steps)
        run_training(arm, ray_address=ray_address, tags={"longview.experiment": cfg.name})
        t1 = time.time()
        log.info("[%s] evaluating at %s tokens", mode, ", ".join(map(str, cfg.evaluation.lengths)))
        results[mode] = run_evaluation(arm, ray_address=ray_address, data_root=run_uri(cfg))
        timings[mode] = (t1 - t0, time.time() - t1)
    table = joint_table(results, cfg)
    figure = accuracy_figure({f"trained with {m}": r["records"] for m, r in results.items()},
                             f"trained at {cfg.data.synthetic.tokens} tokens: accuracy by context length")
    report = f"{table}\n\n{_timing_lines(timings, time.time() - started)}\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, FIGURE), "wb") as f:
            f.write(figure)
        with open(os.path.join(out_dir, TABLE), "w") as f:
            f.write(report)
        log.info("figure and table written to %s", out_dir)
    _log_experiment(cfg, results, figure, report, time.time() - started)
    return report


def joint_table(results: dict[str, dict], cfg: JobConfig) -> str:
    """One row per (context length, δ), a column pair per training mode."""
    from workloads.v2pe.evaluate import delta_value

    modes = list(results)
    rows = {(r["tokens"], r["delta"]): {} for res in results.values() for r in res["records"]}
    for mode, res in results.items():
        for r in res["records"]:
            rows[(r["tokens"], r["delta"])][mode] = r
    head = "| tokens | × train | δ | " + " | ".join(f"{m}: accuracy (95% interval)" for m in modes) + " |"
    lines = [head, "|" + "---|" * (3 + len(modes))]
    train = cfg.data.synthetic.tokens
    order = sorted(rows, key=lambda k: (k[0], -delta_value(k[1])))
    for tokens, delta in order:
        cells = []
        for m in modes:
            r = rows[(tokens, delta)].get(m)
            cells.append(f"{r['accuracy']:.2f} ({r['low']:.2f}–{r['high']:.2f})" if r else "-")
        lines.append(f"| {tokens} | {tokens / train:g} | {delta} | " + " | ".join(cells) + " |")
    n = {r["samples"] for res in results.values() for r in res["records"]}
    lines.append("")
    lines.append(f"Samples per cell: {', '.join(map(str, sorted(n)))}; intervals are 95% Wilson score intervals.")
    return "\n".join(lines)


def _timing_lines(timings: dict[str, tuple[float, float]], total: float) -> str:
    parts = [f"{m}: training {t:.0f} s, evaluation {e:.0f} s" for m, (t, e) in timings.items()]
    return f"Wall time {total / 60:.1f} min ({'; '.join(parts)})."


def _log_experiment(cfg: JobConfig, results: dict, figure: bytes, report: str, seconds: float) -> None:
    """One MLflow run of kind `experiment` with the joint figure and table, and each
    arm's accuracies as metrics `<mode>/accuracy_delta_1_4` at step = context length."""
    if not cfg.tracking.uri:
        return
    from mlflow.entities import Metric, Param

    from .evaluate import _png
    from .tracking import experiment_id, mlflow_client, run_tags

    try:
        client = mlflow_client(cfg.tracking.uri)
        exp = experiment_id(client, cfg.experiment)
        note = (f"Length generalisation: {cfg.name}-{cfg.data.position_mode} against {cfg.name}-{BASELINE}, "
                f"trained at {cfg.data.synthetic.tokens} tokens for {cfg.training.steps} steps; "
                f"evaluated at {', '.join(map(str, cfg.evaluation.lengths))} tokens.")
        run = client.create_run(exp, run_name=cfg.name, start_time=int((time.time() - seconds) * 1000),
                                tags={**run_tags(cfg, kind="experiment"), "longview.experiment": cfg.name,
                                      "mlflow.note.content": note})
        rid = run.info.run_id
        params = {"arms": ",".join(results), "train_tokens": cfg.data.synthetic.tokens,
                  "steps": cfg.training.steps, "seed": cfg.training.seed,
                  "eval.lengths": ",".join(map(str, cfg.evaluation.lengths)),
                  "eval.samples_per_length": cfg.evaluation.samples_per_length}
        ts = int(time.time() * 1000)
        metrics = [Metric(f"{mode}/{k}", float(v), ts, int(x)) for mode, res in results.items()
                   for k, curve in res["curves"].items() for x, v in curve.items()]
        client.log_batch(rid, metrics=metrics[:1000], params=[Param(k, str(v)) for k, v in params.items()])
        client.log_text(rid, report, TABLE)
        client.log_image(rid, _png(figure), FIGURE)
        client.set_terminated(rid, "FINISHED")
    except Exception as e:  # noqa: BLE001 - the figure and table are written whatever MLflow does
        log.warning("experiment not logged to MLflow (%s: %s)", type(e).__name__, e)
