"""What every Ray Train worker runs: the training loop and the evaluation loop.

Both know no workload: they rebuild the job config, ask the workload's spec for a runner
(or an evaluation) and drive it. Training resumes from the newest usable checkpoint in
storage (`CheckpointStore`, resharded when the worker count changed), logs from rank 0
to the job's MLflow run, checkpoints every `training.checkpoint_every` steps in the
background (`Checkpointer`), and exports the model at the end. Batches are a pure
function of (seed, global sample index): with `training.global_batch` the samples of
step s are s*B .. s*B+B-1 whatever the worker count, so a resumed or resized run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time

import torch

from parallelism.dims import checkpoint_group
from workloads.engine import DivergenceError
from workloads.memory import StepMemoryProbe
from workloads.spec import RunContext

from . import log as logsetup
from .checkpoint import Checkpointer, TrainState, checkpoint_store
from .config import ConfigError, from_dict
from .faults import StepFaults, before_checkpoint_upload
from .identity import bind_run, outbox
from .storage import RETRIES as s3_retries
from .storage import run_uri, storage_fs, write_export_meta
from .tracking import Tracker, loss_curve_png

log = logging.getLogger(__name__)


def _worker_context():
    """(Ray Train's context, this worker's device), with longview's logging set up."""
    import ray.train

    logsetup.setup()
    ctx = ray.train.get_context()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    return ctx, device


def _system_metrics(tracker):
    """MLflow's system-metrics monitor (CPU, memory, GPU) on rank 0's node, into the job's run."""
    if not tracker.enabled or tracker.run_id is None:  # not while MLflow has not answered yet
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logsetup.quiet_libraries()  # MLflow set its loggers' levels when it was imported
        # resume_logging: after a restart, continue the monitor's step numbers. A sample
        # every 2 s draws a curve for a run of a few minutes too.
        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=2, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=tracker.uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - optional: never fatal
        log.warning("system metrics off: %s", e)
        return None


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The worker's peak memory, named for what it is: tensor bytes on a GPU, the
    process's resident set on a CPU (tensors, Python, libraries and all)."""
    if device.type == "cuda":
        return {"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"cpu_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_loop(config: dict) -> None:
    import ray.train

    ctx, device = _worker_context()
    cfg = from_dict(config["job"])
    storage_fs(run_uri(cfg), cfg)  # the job's storage retry policy for every S3 read of this worker, data included
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    if world % cfg.parallelism.cp:
        raise ConfigError(f"Ray Train started {world} workers, not a multiple of parallelism.cp="
                          f"{cfg.parallelism.cp} (resources.workers={cfg.resources.workers}): give each node "
                          f"resources for a multiple of {cfg.parallelism.cp} workers")
    runner = cfg.spec.build_runner(cfg, RunContext(rank=rank, world_size=world, device=device,
                                                   run_root=run_uri(cfg)))
    t = cfg.training
    accum = t.accumulation(runner.samples_per_micro, world)
    runner.engine.set_grad_accum(accum)
    store = checkpoint_store(cfg)
    group = checkpoint_group(cfg.parallelism.timeout_s)

    state = TrainState(mlflow_run_id=config.get("mlflow_run_id"))
    restored = store.restore_latest(rank=rank, world=world, engine=runner.engine, group=group)
    if restored is not None:
        state, name, skipped = restored
        if rank == 0:
            log.info("resumed from %s at step %d on %d workers", store.location(name), state.step, world)
    # The driver's run (bound to the run's storage, `orchestrator.identity`) wins over the
    # one a checkpoint recorded: the metrics go where the CLI said they would.
    state.mlflow_run_id = config.get("mlflow_run_id") or state.mlflow_run_id
    tracker = Tracker(None, None)
    if rank == 0:
        # Without a run id (MLflow did not answer the driver), the run is bound when it first answers.
        tracker = Tracker(config.get("tracking_uri"), state.mlflow_run_id, outbox=outbox(cfg),
                          bind=functools.partial(bind_run, cfg, config.get("run_tags") or {}))
    if rank == 0:
        for key, value in runner.tags().items():
            tracker.call("set_tag", f"longview.{key}", value[:5000])
    if restored is not None and rank == 0:
        # Every resume is on the run's record (the step it went back to), and so is every
        # checkpoint passed over; the driver's copy of worker output can miss lines.
        tracker.call("log_metric", "resumed_from_step", float(state.step), int(time.time() * 1000), state.step)
        if skipped:
            tracker.call("set_tag", f"longview.unusable_checkpoint.step{state.step}", "; ".join(skipped)[:4000])
    system = _system_metrics(tracker)
    report = runner.data_report()
    if report is not None and rank == 0:
        for line in runner.data_report_lines():
            log.info("%s", line)
        tracker.log_metrics(report, step=0)

    saver = Checkpointer(store, rank=rank, world=world, group=group, engine=runner.engine,
                         keep=t.keep_checkpoints, layout=runner.layout(), upload_hook=before_checkpoint_upload,
                         job=config["job"], checkpoint_format=t.checkpoint_format)
    first, started, start_step = True, time.perf_counter(), state.step
    nonfinite = NonFiniteSteps(t)
    try:
        while state.step < t.steps:
            probe = StepMemoryProbe(runner.engine, device) if first else None
            t0 = time.perf_counter()
            results = []
            with StepFaults(state.step, rank, settle=saver.settle, world=world), probe or contextlib.nullcontext():
                for m in range(accum):
                    results.append(runner.step(state.step * accum + m))
            dt = time.perf_counter() - t0
            last = results[-1]
            tokens = sum(r.tokens for r in results)
            # The step's loss is the mean over its tokens (micro-steps weighted by theirs),
            # as the gradient is (workloads.engine).
            loss = (sum(r.loss * r.tokens for r in results) / tokens if tokens
                    else sum(r.loss for r in results) / len(results))
            metrics = {"loss": loss, "lr": _or_nan(last.lr), "grad_norm": _or_nan(last.grad_norm),
                       "samples_per_s": runner.samples_per_micro * accum / dt, "world_size": float(world),
                       "grad_accum": float(accum), **_peak_memory(device),
                       **saver.timings(), **last.metrics}
            if tokens:
                metrics["tokens_per_s"] = tokens / dt
            if probe is not None:
                first = False
                predicted = runner.predicted_memory()
                memory, line = probe.report(predicted)
                metrics.update(memory)
                if rank == 0:
                    log.info("%s", line)
                    for k, v in (predicted or {}).items():  # tags, not params: a resumed run may predict anew
                        tracker.call("set_tag", f"longview.memory_predicted_gib.{k}", f"{v / 2**30:.4f}")
            if s3_retries[0]:
                metrics["storage_retries"] = float(s3_retries[0])  # this rank's, so far
            stop = nonfinite.check(state.step + 1, loss, last.grad_norm, runner.engine.last_applied)
            if nonfinite.total:
                metrics["nonfinite_steps"] = float(nonfinite.total)
            if stop is not None:  # before the step counts or any checkpoint holds it
                tracker.log_metrics(metrics, step=state.step + 1)
                _drain_or_keep(tracker, cfg)  # the bad step's figures reach MLflow before the run ends
                raise stop
            state.step += 1
            state.losses.append([state.step, loss])
            tracker.log_metrics(metrics, step=state.step)
            if rank == 0:
                rate = (time.perf_counter() - started) / (state.step - start_step)
                log.info("step %d/%d loss %.4f (%.2f s/step, ETA %s)", state.step, t.steps, loss, dt,
                         _eta(rate * (t.steps - state.step)))
            if state.step % t.checkpoint_every == 0 or state.step == t.steps:
                saver.save(state)  # waits for the previous save first; raises if that one failed
                ray.train.report({"step": state.step, "loss": loss, "world_size": world})
    except BaseException:
        # The save in flight runs on its own group: let it complete before this worker
        # goes down, so the restart resumes from it rather than from the one before.
        saver.settle(cfg.parallelism.timeout_s)
        raise
    saver.wait()  # the last checkpoint is complete before the run says it finished
    if s3_retries[0] and rank == 0:  # with the retries of the last uploads, which ran after the last step
        tracker.call("log_metric", "storage_retries", float(s3_retries[0]), int(time.time() * 1000), state.step)
    _drain_or_keep(tracker, cfg)
    if system is not None:
        system.finish()
    exported = runner.export(rank, run_uri(cfg, "export"))
    if rank == 0 and exported:
        # What evaluation reports of the model it reads: its run and training step.
        write_export_meta(exported, cfg, cfg.name, state.step)
    if rank == 0 and tracker.enabled:
        if exported:
            tracker.call("set_tag", "longview.export", exported)
        # At the artifacts' top level: the run page's Artifacts tab opens on it, no folder to open.
        tracker.log_artifact_bytes(loss_curve_png(state.losses, cfg.name), "loss.png")


def _drain_or_keep(tracker, cfg) -> None:
    """Every metric to MLflow, waiting up to tracking.wait_s for the server; what it
    has not taken by then is kept in the run's storage for the next start to send."""
    if not tracker.drain(wait_s=cfg.tracking.wait_s):
        n = tracker.keep()
        log.warning("%d metric values kept in %s for MLflow at %s, which did not answer", n, tracker.outbox.uri,
                    tracker.uri)


class NonFiniteSteps:
    """The training loop's watch on non-finite steps (`training.on_nonfinite`)."""

    def __init__(self, t):
        self.policy, self.limit = t.on_nonfinite, t.max_nonfinite_steps
        self.in_row = 0
        self.total = 0

    def check(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> DivergenceError | None:
        """None to go on; else the error that ends the run. Every rank sees the same global
        loss and norm, so every rank decides alike."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.in_row = 0
            return None
        self.in_row += 1
        self.total += 1
        what = f"step {step}: loss {loss:.4g}, gradient norm {_or_nan(grad_norm):.4g}"
        if applied:  # DeepSpeed steps before the norm is known (or the loss alone was not finite)
            return DivergenceError(f"{what}; the update was applied, so the run stops before any checkpoint "
                                   "holds it: resume from the last one with a smaller training.lr")
        if self.policy == "stop" or self.in_row >= self.limit:
            why = ("training.on_nonfinite: stop" if self.policy == "stop"
                   else f"{self.in_row} in a row, training.max_nonfinite_steps={self.limit}")
            return DivergenceError(f"{what}; the update was not applied and the run stops ({why}); no checkpoint "
                                   "holds a non-finite value: resume from the last one with a smaller "
                                   "training.lr, or set training.on_nonfinite: skip")
        log.warning("%s: the update was skipped (%d in a row, at most %d; training.on_nonfinite: skip)",
                    what, self.in_row, self.limit)
        return None


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else x


def eval_loop(config: dict) -> None:
    """The workload's evaluation on every worker; rank 0 writes the result to storage."""
    ctx, device = _worker_context()
    cfg = from_dict(config["job"])
    storage_fs(run_uri(cfg), cfg)  # the job's storage retry policy for every S3 read of this worker, data included
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    run_ctx = RunContext(rank=rank, world_size=ctx.get_world_size(), device=device, run_root=run_uri(cfg))
    result = cfg.spec.evaluation().run(cfg, run_ctx, config["model"], config["prepared"])
    if rank == 0:
        fs, root = storage_fs(config["out"], cfg)
        fs.pipe_file(f"{root}/result.json", json.dumps(
            {"table": result.table, "records": result.records, "metrics": result.metrics,
             "curves": result.curves}).encode())
