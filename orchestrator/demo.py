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

`python -m orchestrator.demo experiment` runs `longview experiment
configs/v2pe-length.yaml` the same way (`make experiment`), writing its figure and
table to docs/; `... piip-experiment` runs configs/piip-det-demo.yaml (PIIP detection
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


def where_to_click(env, name: str) -> None:
    svc = LocalServices(home()).read()
    mlflow = svc["mlflow"].url
    link = mlflow
    try:
        client = mlflow_client(mlflow)
        exp, run_id = find_run(client, "longview-v2pe", name)
        link = (f"{mlflow}/#/experiments/{exp}/runs/{run_id}" if run_id else f"{mlflow}/#/experiments/{exp}") \
            + UI_MODEL_TRAINING
    except Exception:  # noqa: BLE001 - the links below still lead there
        pass
    print(f"  MLflow run        : {link}")
    print(f"  Ray dashboard     : {svc['ray'].url} (Jobs: {name})")
    print(f"  S3 checkpoints    : s3://longview/runs/{name}/ (endpoint {svc['s3'].url})")
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
        out = run(env, "experiment", config, "--set", f"name={name}", "--out", "docs")
        print(f"\nexperiment finished in {(time.time() - t0) / 60:.1f} min; figure and table in docs/")
        print("\n".join("    " + ln for ln in out.splitlines() if ln.startswith("|")))
        if what == "experiment":
            where_to_click(env, f"{name}-v2pe_rnd")
        return 0
    name = f"v2pe-demo-{stamp}"
    sets = ["--set", f"name={name}", "--set", "storage.uri=s3://longview/runs"]
    run(env, "submit", DEMO, *sets, "--wait")
    table = run(env, "eval", DEMO, *sets)
    print(f"\nV2PE demo finished in {time.time() - t0:.0f}s")
    print("  accuracy per (context length, δ) on held-out samples (chance: 1 in 8 colours):")
    for line in table.splitlines():
        if line.startswith("|"):
            print("    " + line)
    where_to_click(env, name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
