"""`make demo`: the whole path on this machine, from nothing to an evaluated model.

1. `longview up`: S3 endpoint, MLflow server and Ray head on 127.0.0.1 (reused when
   they are already running, restarted when some died).
2. `longview submit configs/v2pe-demo.yaml --wait`: a tiny V2PE model is trained on the needle
   task (the colour of the one image with a black square) through Ray job submission,
   context parallel 2 over 2 CPU workers, with δ drawn per image; checkpoints go to S3,
   metrics to MLflow.
3. `longview eval`: accuracy per (context length, δ) on held-out samples, logged as an
   MLflow run of its own.
4. The services stay up so the run can be browsed; `make down` (`longview down`) stops them.

`python -m orchestrator.demo experiment [FOLDER]` runs `longview experiment
configs/v2pe-length.yaml` the same way (`make experiment`), writing its figure and
table to FOLDER (default out/experiment; `make experiment OUT=docs` renews the ones
the README shows); `... piip-experiment [FOLDER]` runs configs/piip-det-demo.yaml (PIIP detection
against a single-branch ViT, `make piip-experiment`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .services import LocalServices, home
from .tracking import UI_MODEL_TRAINING, find_run, mlflow_client

DEMO = "configs/v2pe-demo.yaml"
EXPERIMENT = "configs/v2pe-length.yaml"
PIIP_EXPERIMENT = "configs/piip-det-demo.yaml"


def run(env, *args) -> str:
    print(f"$ longview {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        # Ray's own chatter stays out of the demo's output; the CLI's lines come through.
        if not line.startswith(("(", "\x1b[36m(", "20")) and line.strip():
            print("  " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        print("".join(lines[-60:]), file=sys.stderr)
        raise SystemExit(f"longview {args[0]} failed; the services are still up (`make down` stops them)")
    return "".join(lines)


def where_to_click(env, name: str, *, job_id: str | None = None) -> None:
    """The links to the run's records: its training and evaluation runs in MLflow, its Ray
    job, its checkpoints."""
    svc = LocalServices(home()).read()
    mlflow = svc["mlflow"].url
    train_link = eval_link = mlflow
    try:
        client = mlflow_client(mlflow)
        exp, run_id = find_run(client, "longview-v2pe", name)
        train_link = (f"{mlflow}/#/experiments/{exp}/runs/{run_id}" if run_id else f"{mlflow}/#/experiments/{exp}") \
            + UI_MODEL_TRAINING
        evals = client.search_runs([exp], f"tags.`longview.evaluates` = '{name}'", order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if evals:
            eval_link = f"{mlflow}/#/experiments/{exp}/runs/{evals[0].info.run_id}{UI_MODEL_TRAINING}"
    except Exception:  # noqa: BLE001 - the links below still lead there
        pass
    print(f"  MLflow training run   : {train_link}  (loss, its plot, the description's headline)")
    print(f"  MLflow evaluation run : {eval_link}  (accuracy table and figure)")
    ray = svc["ray"].url
    print(f"  Ray job               : {ray}/#/jobs/{job_id}" if job_id else f"  Ray jobs              : {ray}/#/jobs")
    print(f"  S3 checkpoints        : s3://longview/runs/{name}/ (endpoint {svc['s3'].url})")
    print(f"  The services stay up for browsing; `make down` (or `{Path(sys.executable).parent}/longview down`) "
          "stops them.")


def main(argv: list[str]) -> int:
    t0 = time.time()
    what = argv[0] if argv else "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stamp = f"{time.strftime('%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"  # a reused name would resume
    run(env, "up", "--bucket", "longview")
    env.update(LocalServices(home()).env())
    if what in ("experiment", "piip-experiment"):
        config, name = ((EXPERIMENT, f"v2pe-length-{stamp}") if what == "experiment"
                        else (PIIP_EXPERIMENT, f"piip-det-{stamp}"))
        # Into a folder of its own, not over the tracked docs/ unless asked (`make experiment OUT=docs`).
        folder = argv[1] if len(argv) > 1 else f"out/{what}"
        run(env, "experiment", config, "--set", f"name={name}", "--out", folder)  # its table is printed as it ends
        print(f"\nexperiment finished in {(time.time() - t0) / 60:.1f} min; figure and table in {folder}/")
        if what == "experiment":
            where_to_click(env, f"{name}-v2pe_rnd")
        return 0
    name = f"v2pe-demo-{stamp}"
    sets = ["--set", f"name={name}", "--set", "storage.uri=s3://longview/runs"]
    submitted = run(env, "submit", DEMO, *sets, "--wait")
    job_id = submitted.split("submitted job ", 1)[1].split()[0] if "submitted job " in submitted else None
    run(env, "eval", DEMO, *sets)  # its table and files are printed as it ends
    print(f"\nV2PE demo finished in {time.time() - t0:.0f}s (accuracy above: chance is 1 in 8 colours)")
    where_to_click(env, name, job_id=job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
