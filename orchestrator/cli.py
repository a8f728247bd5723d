"""The `longview` command line.

    longview up | down                      local S3 endpoint, MLflow server, Ray head on 127.0.0.1
    longview train CONFIG [--address A]     run a job on a Ray cluster (default: the local head)
    longview submit CONFIG [--address URL]  submit it through Ray job submission; prints the job id
    longview status|logs|stop JOB_ID        follow a submitted job
    longview eval CONFIG [--checkpoint URI] the workload's evaluation of a trained model (V2PE:
                                            needle accuracy per (length, δ), or MM-NIAH)
    longview experiment CONFIG [--out DIR]  V2PE against plain positions: train both, evaluate, plot
    longview runs CONFIG                    the experiment's MLflow runs with their key metrics
    longview flops VARIANT --resolutions R1,R2,...   PIIP backbone GFLOPs (paper's counting)
    longview plan CONFIG [--gpus N --gpu-memory GB ...] [--json]   memory per GPU and the layout to use
    longview ring-demo                      ring attention across local processes

`--set key=value` (repeatable) overrides any config key, e.g. `--set training.steps=5`.
Endpoints left out of the config are taken from the services `longview up` started
(state in $LONGVIEW_HOME, default ~/.longview).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from parallelism.ring_demo import main as ring_demo
from workloads.registry import commands
from workloads.scrub import scrub_credentials
from workloads.spec import Budget, Hardware

from . import log as logsetup
from .cluster import check_job_fits, load_cluster_yaml
from .config import ConfigError, from_dict, load_config, to_dict, yaml_value
from .errors import failure_reason
from .evaluate import run_evaluation
from .experiment import run_experiment
from .identity import deliver_outbox, deliver_pending, outbox
from .launch import run_training
from .placement import PlacementRefused
from .preflight import InputError, check_inputs, check_resume_rules, check_storage, check_tracking
from .progress import JobProgress
from .ray_job import RunStopped, stop_on_sigterm, stop_signal, stopped_exit_code, submitted_job_id, worker_env
from .services import LocalServices, ServiceError, home, ray_env
from .storage import run_uri
from .tracking import code_version, run_url

log = logging.getLogger("longview")

CONFIG_ENV = "LONGVIEW_JOB_CONFIG"  # a submitted job's resolved config, as JSON


def _services():
    return LocalServices(home())


def _say(msg: str) -> None:
    """A command's result (tables, JSON, ids): plain stdout, whatever the log level."""
    print(msg, flush=True)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"config error: --set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml_value(v)  # so numbers and booleans keep their types
        except (ConfigError, ValueError) as e:  # yaml's errors are ValueErrors too
            raise SystemExit(f"config error: --set {item!r}: {e}") from None
    return out


def load_job(args):
    """The job config from a file (or the submitted job's environment), with --set and the
    local services' endpoints filled in where the config leaves them out."""
    overrides = _parse_sets(getattr(args, "set", []))
    services = _services().read()

    def load(extra: dict):
        if args.config == "-":  # a submitted job's config: JSON, read as JSON
            return from_dict(json.loads(os.environ[CONFIG_ENV]), overrides={**overrides, **extra})
        return load_config(args.config, overrides={**overrides, **extra})

    try:
        cfg = load({})
        if "mlflow" in services and not cfg.tracking.uri:
            cfg = load({"tracking.uri": services["mlflow"].url})
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if "s3" in services:
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", services["s3"].url)
        for k, v in _services().env().items():
            os.environ.setdefault(k, v)
    return cfg


def cmd_up(args) -> int:
    svc = _services()
    log.info("starting local services (state in %s) ...", svc.state_file)
    t0 = time.time()

    try:
        with _spinner(f"starting S3, MLflow and Ray on {args.host}"):
            started = svc.up(ray_cpus=args.ray_cpus, bucket=args.bucket, ray=not args.no_ray, host=args.host,
                             expose=args.expose)
    except ServiceError as e:
        raise SystemExit(f"up: {e}") from None
    for name, s in started.items():
        extra = f"  ray address {s.extra['address']}" if name == "ray" else ""
        extra += "  (already running)" if s.extra.get("reused") else ""
        _say(f"  {name:6s} {s.url}  pid {s.pid}{extra}")
    log.info("up in %.0fs; bucket s3://%s; `longview down` stops them", time.time() - t0, args.bucket)
    return 0


def cmd_down(args) -> int:
    try:
        stopped = _services().down()
    except ServiceError as e:
        raise SystemExit(f"down: {e}") from None
    log.info("stopped: %s", ", ".join(stopped) or "nothing was running")
    return 0


def _ray_address(args) -> str | None:
    if args.address:
        return args.address
    s = _services().read()
    return s["ray"].extra["address"] if "ray" in s else None


def _spinner(text: str):
    """A spinner while a user waits on something with no steps to count (rich; on a
    terminal only: redirected output gets no control characters)."""
    import contextlib

    from rich.console import Console

    console = Console(stderr=True)
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


def _check_cluster(cfg, args) -> None:
    if getattr(args, "cluster_yaml", None):
        try:
            check_job_fits(cfg, load_cluster_yaml(args.cluster_yaml), args.cluster_yaml)
        except ConfigError as e:
            raise SystemExit(f"refused: {e}") from None


def _preflight(cfg, what: str, *, inputs: bool = True) -> None:
    """The checks that cost seconds (`preflight`): one line and exit 1 if one fails."""
    try:
        check_storage(cfg)
        check_tracking(cfg)
        if inputs:
            check_resume_rules(cfg)
            check_inputs(cfg)
    except InputError as e:
        print(f"error: {what}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def cmd_train(args) -> int:
    cfg = load_job(args)
    stop_on_sigterm()
    _check_cluster(cfg, args)
    _preflight(cfg, f"training {cfg.name} failed")
    log.info("training %s: %s workers (%s), %d steps; checkpoints %s", cfg.name, cfg.resources.workers,
             cfg.spec.layout(cfg), cfg.training.steps, run_uri(cfg))
    tags = {"longview.ray_job_id": submitted_job_id() or ""}
    try:
        _, run_id, final = run_training(cfg, ray_address=_ray_address(args), tags=tags)
    except PlacementRefused as e:
        print(f"error: training {cfg.name} refused: {e}", file=sys.stderr, flush=True)
        return 1
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return stopped_exit_code()
    except KeyboardInterrupt:  # before the workers started: nothing to resume from but what was there
        print(f"stopped: training {cfg.name} stopped ({stop_signal()}) before its workers started",
              file=sys.stderr, flush=True)
        return stopped_exit_code()
    except Exception as e:  # noqa: BLE001 - Ray wraps the workers' errors; say the cause last
        print(f"error: training {cfg.name} failed: {failure_reason(e, storage_retries=cfg.storage.retries)}",
              file=sys.stderr, flush=True)
        return 1
    log.info("finished: last checkpoint %s", final)
    if run_id:
        log.info("MLflow run: %s", run_url(cfg.tracking.uri, run_id))
    return 0


# Errors of ours whose message is the whole story, in the order they are looked for.
def _job_address(args) -> str:
    """The job API's address: --address, else the local head's dashboard."""
    if args.address:
        return args.address
    s = _services().read()
    if "ray" not in s:
        raise SystemExit("no --address and no local Ray head (run `longview up`)")
    return s["ray"].url


def _job_client(args):
    from ray.job_submission import JobSubmissionClient

    os.environ.update(ray_env())
    return JobSubmissionClient(_job_address(args))


def cmd_submit(args) -> int:
    cfg = load_job(args)
    _check_cluster(cfg, args)
    _preflight(cfg, f"{cfg.name} not submitted")
    client = _job_client(args)
    repo = Path(__file__).resolve().parent.parent
    env = dict(worker_env(cfg))
    env[CONFIG_ENV] = json.dumps(to_dict(cfg))
    env["LONGVIEW_HOME"] = str(home())
    env["LONGVIEW_CODE_VERSION"] = code_version()
    # `longview stop` (Ray's job stop) sends SIGTERM, then SIGKILL after this many
    # seconds (Ray's default: 3): time for the run to stop its workers and say where it
    # resumes from. Read by the job's supervisor, which runs in the job's environment.
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", "60")
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=f"{sys.executable} -m orchestrator.cli train -",
                runtime_env={"working_dir": str(repo), "env_vars": env,
                             "excludes": [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]},
                # job_name: the Name column of the Ray dashboard's job list
                metadata={"job_name": cfg.name, "longview.run_name": cfg.name, "longview.workload": cfg.workload},
            )
            break
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            log.info("the cluster's job agent is not up yet; retrying ...")
            time.sleep(3)
    _say(f"submitted job {job_id}")
    log.info("  checkpoints: %s", run_uri(cfg))
    if cfg.tracking.uri:
        log.info("  MLflow: %s (experiment %s, run %s)", cfg.tracking.uri, cfg.experiment, cfg.name)
    if args.wait:
        return _wait(client, job_id, cfg)
    return 0


def _wait(client, job_id: str, cfg) -> int:
    """Follows a submitted job until it ends: its status and, from the job's MLflow run,
    steps done of total, the last loss and an ETA (a live bar on a terminal, a line per
    change otherwise)."""
    from ray.job_submission import JobStatus

    with JobProgress(cfg) as progress:
        while True:
            status = client.get_job_status(job_id)
            progress.update(str(status).rsplit(".", 1)[-1])
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
    if status == JobStatus.SUCCEEDED:
        return 0
    # The job's log has everything (Ray's tracebacks included); the terminal gets the
    # one-line reason the job's own `longview train` ended with, last.
    reason = _reason_in_log(client.get_job_logs(job_id)) or (client.get_job_info(job_id).message or "").strip()
    log.info("the job's whole log: `longview logs %s`", job_id)
    print(f"error: job {job_id} {str(status).rsplit('.', 1)[-1]}: {reason.splitlines()[-1] if reason else 'no reason given'}",
          file=sys.stderr, flush=True)
    return 1


def _reason_in_log(text: str) -> str | None:
    """The last one-line reason `longview` printed in a job's log (`error: ...`,
    `stopped: ...`), without its prefix."""
    for line in reversed(text.splitlines()):
        for prefix in ("error: ", "stopped: "):
            if line.startswith(prefix):
                return line[len(prefix):]
    return None


def _job_call(args, method: str):
    """One job-API call about args.job_id; an unknown job is one line, not a traceback."""
    client = _job_client(args)
    try:
        return getattr(client, method)(args.job_id)
    except RuntimeError as e:  # the job API answers an unknown id with HTTP 404
        if "404" in str(e) or "does not exist" in str(e):
            raise SystemExit(f"{args.command}: no job {args.job_id!r} on the cluster at {_job_address(args)}") from None
        raise


def cmd_status(args) -> int:
    info = _job_call(args, "get_job_info")
    _say(f"{args.job_id}: {info.status} {info.message or ''}".rstrip())
    return 0


def cmd_logs(args) -> int:
    _say(_job_call(args, "get_job_logs"))
    return 0


def cmd_stop(args) -> int:
    log.info("stop requested: %s", _job_call(args, "stop_job"))
    return 0


def cmd_runs(args) -> int:
    from mlflow.tracking import MlflowClient

    cfg = load_job(args)
    if not cfg.tracking.uri:
        raise SystemExit("no tracking.uri in the config and no local MLflow server")
    try:  # what an MLflow outage left in the run's storage
        sent = deliver_outbox(cfg)
        if sent:
            log.info("sent %d MLflow records run %s had kept in %s", sent, cfg.name, outbox(cfg).uri)
    except Exception as e:  # noqa: BLE001 - the listing below says whether the server answers
        log.warning("records kept in %s not sent (%s: %s)", outbox(cfg).uri, type(e).__name__, e)
    # and what other runs of this machine kept for this server, whatever their name
    for name, sent in deliver_pending(cfg.tracking.uri).items():
        if sent:
            log.info("sent %d MLflow records run %s had kept in its storage", sent, name)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        _say(f"experiment {cfg.experiment} has no runs yet")
        return 0
    _say("| run | status | steps | last loss | checkpoint |\n|---|---|---|---|---|")
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        hist = client.get_metric_history(r.info.run_id, "loss")
        last = max(hist, key=lambda m: m.step) if hist else None
        _say(f"| {r.info.run_name} | {r.info.status} | {last.step if last else 0} | "
             f"{last.value:.4f} | {r.data.tags.get('longview.final_checkpoint', '-')} |" if last else
             f"| {r.info.run_name} | {r.info.status} | 0 | - | - |")
    return 0


def cmd_eval(args) -> int:
    cfg = load_job(args)
    stop_on_sigterm()
    _preflight(cfg, f"evaluation of {cfg.name} failed", inputs=False)
    try:
        result = run_evaluation(cfg, checkpoint=args.checkpoint, ray_address=_ray_address(args))
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and isinstance(e.code, str):
            raise
        print(f"stopped: evaluation of {cfg.name} stopped ({stop_signal()}); its MLflow run ends KILLED",
              file=sys.stderr, flush=True)
        return stopped_exit_code()
    except PlacementRefused as e:
        print(f"error: evaluation of {cfg.name} refused: {e}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"eval: {e}") from None
    except Exception as e:  # noqa: BLE001 - Ray wraps the workers' errors; say the cause last
        print(f"error: evaluation of {cfg.name} failed: {failure_reason(e, storage_retries=cfg.storage.retries)}",
              file=sys.stderr, flush=True)
        return 1
    _say(result["table"])
    _say_where(cfg, result)
    return 0


def _say_where(cfg, result: dict) -> None:
    """Where an evaluation's results are: its files in storage and its MLflow run."""
    for path in result.get("files", []):
        _say(f"  {path}")
    if result.get("mlflow_run_id"):
        _say(f"  MLflow run: {run_url(cfg.tracking.uri, result['mlflow_run_id'])}")


def cmd_experiment(args) -> int:
    cfg = load_job(args)
    stop_on_sigterm()
    _preflight(cfg, f"experiment {cfg.name} failed")
    try:
        report = run_experiment(cfg, ray_address=_ray_address(args), out_dir=args.out)
    except RunStopped as e:
        print(f"stopped: experiment {cfg.name}: {e}", file=sys.stderr, flush=True)
        return stopped_exit_code()
    except PlacementRefused as e:
        print(f"error: experiment {cfg.name} refused: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # the config cannot make the comparison (ConfigError is one)
        raise SystemExit(f"experiment: {e}") from None
    except Exception as e:  # noqa: BLE001 - a run failed: its cause in one line
        print(f"error: experiment {cfg.name} failed: {failure_reason(e, storage_retries=cfg.storage.retries)}",
              file=sys.stderr, flush=True)
        return 1
    _say(report)
    return 0


def cmd_plan(args) -> int:
    for flag, value in (("--gpus", args.gpus), ("--gpu-memory", args.gpu_memory), ("--gpus-per-node", args.gpus_per_node),
                        ("--intra-node-bandwidth", args.intra_node_bandwidth),
                        ("--inter-node-bandwidth", args.inter_node_bandwidth), ("--tiles", args.tiles),
                        ("--samples", args.samples), ("--epochs", args.epochs)):
        if value is not None and value <= 0 and not (flag == "--tiles" and value == 0):
            raise SystemExit(f"plan: {flag} must be positive, got {value}")
    try:
        cfg = load_config(args.config, overrides=_parse_sets(args.set))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    hw = Hardware(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node,
                  intra_node_gbps=args.intra_node_bandwidth, inter_node_gbps=args.inter_node_bandwidth)
    if cfg.spec.plan is None:
        raise SystemExit(f"plan: workload {cfg.workload!r} has no planner")
    if args.json:  # stdout is the JSON alone: notes (a library's fallback) only if they are warnings
        for name in ("workloads", "orchestrator"):
            logging.getLogger(name).setLevel(logging.WARNING)
    plan = cfg.spec.plan(cfg, hw, args.tiles, Budget(samples=args.samples, epochs=args.epochs))
    _say(json.dumps(plan) if args.json else cfg.spec.format_plan(plan))
    return 0


def _workload_command(command):
    def run(args) -> int:
        try:
            _say(command.run(args))
        except ValueError as e:
            raise SystemExit(f"{command.name}: {e}") from None
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The command line's grammar (`main` runs it; the README's commands are checked against it)."""
    ap = argparse.ArgumentParser(prog="longview", description="long-context training on Ray Train")
    noise = ap.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug logging, with times and module names")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start S3 endpoint, MLflow server and Ray head on 127.0.0.1")
    p.add_argument("--ray-cpus", type=int, default=max(2, os.cpu_count() or 2))
    p.add_argument("--bucket", default="longview")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--expose", action="store_true",
                   help="allow a non-loopback --host (the services have no authentication)")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the local services (by PID)").set_defaults(fn=cmd_down)
    for name, fn, hlp in [("train", cmd_train, "run a job on a Ray cluster"),
                          ("submit", cmd_submit, "submit a job through Ray job submission"),
                          ("eval", cmd_eval, "evaluate a trained model (V2PE: needle accuracy per (length, δ), or MM-NIAH)"),
                          ("experiment", cmd_experiment, "V2PE positions against plain ones: train, evaluate, plot"),
                          ("runs", cmd_runs, "the experiment's MLflow runs")]:
        p = sub.add_parser(name, help=hlp)
        p.add_argument("config", help="job config YAML ('-' reads a submitted job's config)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--address", default=None, help="Ray address (GCS host:port, or dashboard URL for submit)")
        if name in ("submit", "train"):
            p.add_argument("--cluster-yaml", default=None,
                           help="Ray cluster YAML: refuse the job if no node type can hold its workers")
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="wait for the job, showing its status")
        if name == "eval":
            p.add_argument("--checkpoint", default=None, help="checkpoint URI (default: the run's latest)")
        if name == "experiment":
            p.add_argument("--out", default=None, help="folder for the figure and the table")
        p.set_defaults(fn=fn)
    for name, fn in [("status", cmd_status), ("logs", cmd_logs), ("stop", cmd_stop)]:
        p = sub.add_parser(name, help=f"{name} of a submitted job")
        p.add_argument("job_id")
        p.add_argument("--address", default=None)
        p.set_defaults(fn=fn)

    for command in commands():  # the workloads' own subcommands (PIIP: flops)
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(fn=_workload_command(command))
    p = sub.add_parser("plan", help="memory per GPU, compute and communication; the layout to use")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the config's workers)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-node-bandwidth", type=float, default=450.0, help="GB/s per GPU inside a node")
    p.add_argument("--inter-node-bandwidth", type=float, default=50.0, help="GB/s per GPU across nodes")
    p.add_argument("--tiles", type=int, default=None, help="image tiles per sample (default: from the data)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per epoch, for hours and GPU-hours (default: the config's synthetic set, MM-NIAH's "
                        "max_samples)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("ring-demo", help="ring attention across local gloo processes", add_help=False)
    p.set_defaults(fn=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    logsetup.setup("DEBUG" if args.verbose else "WARNING" if args.quiet else None)
    if args.command == "ring-demo":
        ring_demo(rest)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args)
    except SystemExit as e:  # a command's one-line refusal: printed here, scrubbed like every other line
        if not isinstance(e.code, str):
            raise
        print(scrub_credentials(e.code), file=sys.stderr, flush=True)
        return 1
    except BrokenPipeError:  # the reader went away (`| head`): nothing is left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted ({stop_signal()})", file=sys.stderr, flush=True)
        return stopped_exit_code()
    except Exception as e:  # the last net: one line, the traceback only when asked for
        if args.verbose:
            raise
        print(f"error: {args.command}: {failure_reason(e)} (`longview -v {args.command} ...` shows where)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
