"""`make demo`: the whole path on this machine, from nothing to an accuracy table.

1. `longview up`: S3 endpoint, MLflow server and Ray head on 127.0.0.1.
2. `longview submit configs/v2pe-demo.yaml --wait`: a tiny V2PE model trains through Ray
   job submission, context parallel 2 over 2 CPU workers, on synthetic long samples
   with δ drawn per image; checkpoints go to S3, metrics to MLflow.
3. `longview eval`: accuracy per (context length, δ) at lengths up to 4x the training
   length, with δ = 1 and δ = 1/4, logged as a nested MLflow run.
4. `longview down`, also when a step fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

CONFIG = "configs/v2pe-demo.yaml"


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
        raise SystemExit(f"longview {args[0]} failed")
    return "".join(lines)


def main() -> int:
    t0 = time.time()
    home = tempfile.mkdtemp(prefix="longview-demo-")
    env = dict(os.environ, LONGVIEW_HOME=home, PYTHONUNBUFFERED="1")
    name = f"v2pe-demo-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"  # a reused name would resume
    sets = ["--set", f"name={name}", "--set", "storage.uri=s3://longview/runs"]
    run(env, "up", "--bucket", "longview")
    try:
        from orchestrator.services import LocalServices

        env.update(LocalServices(home).env())
        run(env, "submit", CONFIG, *sets, "--wait")
        table = run(env, "eval", CONFIG, *sets)
        mlflow = LocalServices(home).read()["mlflow"].url
        print("\nV2PE demo finished in %.0fs" % (time.time() - t0))
        print(f"  MLflow experiment : {mlflow} (experiment longview-v2pe, run {name})")
        print(f"  S3 checkpoints    : s3://longview/runs/{name}/ (endpoint {env['AWS_ENDPOINT_URL_S3']})")
        print("  accuracy per (context length, δ); trained at 1024 tokens:")
        for line in table.splitlines():
            if line.startswith("|"):
                print("    " + line)
    finally:
        run(env, "down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
