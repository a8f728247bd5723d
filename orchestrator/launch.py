"""Job config -> Ray Train `TorchTrainer`, and the function every worker runs.

Driver (`run_training`): prepares the data (synthetic samples are written to storage
once), finds or creates the job's MLflow run, and fits a TorchTrainer whose storage is
the configured S3 prefix (through s3fs), with `FailureConfig` so a failed worker group
restarts from the last checkpoint, and `CheckpointConfig` keeping the last N.

Worker (`train_loop`): builds the process groups through `parallelism.dims`, the model,
engine and data through the workload, resumes from `ray.train.get_checkpoint()` if
there is one, and runs steps. Batches are a pure function of (seed, step, replica), so
a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import sys
import tempfile
import time

import torch

from .config import JobConfig, build, flatten, to_dict

from .faults import ENV_KEYS as FAULT_ENV_KEYS


# --- storage -----------------------------------------------------------------------------------


def storage_fs(url: str, cfg: JobConfig):
    """(filesystem, path) for a storage URL with the job's S3 endpoint and retries."""
    from .storage import filesystem  # noqa: PLC0415

    return filesystem(url, endpoint_url=cfg.storage.endpoint_url, retries=cfg.storage.retries)


def storage_for_ray(cfg: JobConfig):
    """(storage_path, storage_filesystem) for RunConfig: s3://b/p becomes "b/p" + s3fs."""
    uri = cfg.storage.uri
    if not uri.startswith("s3://"):
        return (uri or os.path.abspath("longview-runs")), None
    import pyarrow.fs  # noqa: PLC0415

    fs, path = storage_fs(uri, cfg)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_uri(cfg: JobConfig, *parts: str) -> str:
    base = cfg.storage.uri.rstrip("/") or os.path.abspath("longview-runs")
    return posixpath.join(base, cfg.name, *parts)


# Never sent with a job: a runtime environment is stored by the cluster and shown by
# its dashboard and job API. Nodes get credentials from their own environment or the
# standard AWS configuration (instance profile, mounted secret).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def worker_env(cfg: JobConfig) -> dict[str, str]:
    """Environment the workers need from *this* one: the S3 endpoint and region, not
    the credentials (SECRET_ENV)."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("AWS_") and k not in SECRET_ENV) or k in ("MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_MODE")}
    from .storage import s3_endpoint  # noqa: PLC0415

    endpoint = s3_endpoint(cfg.storage.endpoint_url)
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
        env["FSSPEC_S3_ENDPOINT_URL"] = endpoint  # fsspec reads s3fs options from FSSPEC_S3_*
    for k in FAULT_ENV_KEYS:
        if k in os.environ:
            env[k] = os.environ[k]
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.resources.cpus_per_worker))))
    return env


# --- the V2PE workload as the worker loop sees it ---------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def sample_at(i: int, n: int, seed: int) -> int:
    """Index of the i-th sample drawn from n: a fresh permutation per epoch, a function
    of (seed, epoch) only, so a resumed run draws exactly what the uninterrupted one did.
    One permutation per epoch is computed (and kept), not one per draw."""
    epoch, j = divmod(i, n)
    return _epoch_order(n, seed, epoch)[j]


class V2PERunner:
    """V2PE as the worker loop sees it: engine, step(micro), checkpoint shard, export."""

    def __init__(self, cfg: JobConfig, world: int, device: torch.device):
        from parallelism.dims import ParallelDims  # noqa: PLC0415

        groups = ParallelDims.infer(world_size=world, cp=cfg.parallelism.cp,
                                    cp_a2a=cfg.parallelism.cp_a2a).build(cfg.parallelism.timeout_s)
        from workloads.engine import OptimConfig, ShardingConfig, build_engine  # noqa: PLC0415
        from workloads.v2pe.data import ByteTokenizer, DataConfig, LoadReport, load_samples, pack_greedy  # noqa: PLC0415
        from workloads.v2pe.model import V2PEModel, model_config  # noqa: PLC0415
        from workloads.v2pe.train import TrainStepConfig, parallelize  # noqa: PLC0415

        self.cfg, self.groups, self.device = cfg, groups, device
        t = cfg.training
        torch.manual_seed(t.seed)  # same initial weights on every rank
        if cfg.model.pretrained:
            from workloads.v2pe.checkpoint_io import load_pretrained  # noqa: PLC0415

            model = load_pretrained(cfg.model.pretrained)
        else:
            model = V2PEModel(model_config(cfg.model.size, **cfg.model.overrides))
        model.to(device, torch.bfloat16 if t.bf16 and not t.sharding == "deepspeed" else torch.float32)
        self.step_cfg = TrainStepConfig(loss_chunk_tokens=t.loss_chunk_tokens,
                                        activation_checkpointing=t.activation_checkpointing)
        parallelize(model, self.step_cfg)
        self.engine = build_engine(
            model,
            OptimConfig(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, total_steps=t.steps,
                        grad_clip=t.grad_clip),
            ShardingConfig(sharding=t.sharding, zero_stage=t.zero_stage, bf16=t.bf16, grad_accum=t.grad_accum),
        )
        mc = model.cfg
        self.tokenizer = ByteTokenizer()
        self.data_cfg = DataConfig(max_tokens=cfg.data.max_tokens, max_tiles=cfg.data.max_tiles,
                                   tile=mc.vision.image_size, tokens_per_tile=mc.tokens_per_tile,
                                   position_mode=cfg.data.position_mode, position_stride=cfg.data.position_stride,
                                   on_bad_sample=cfg.data.on_bad_sample)
        train_path = cfg.data.train if cfg.data.train != "synthetic" else run_uri(cfg, "data", "train", "data.jsonl")
        self.data_report = LoadReport(train_path)
        samples = load_samples(train_path, tokenizer=self.tokenizer, cfg=self.data_cfg, report=self.data_report)
        self.rows = pack_greedy(samples, budget=cfg.data.max_tokens, multiple=2 * cfg.parallelism.cp)

    def batch(self, micro: int):
        """The packed row of micro-step `micro` for this data-parallel replica, CP-sharded."""
        from workloads.v2pe.data import make_batch, shard_batch  # noqa: PLC0415

        dp, d = self.groups.dims.dp, self.groups.dp_rank
        i = micro * dp + d
        gen = torch.Generator().manual_seed(self.cfg.training.seed * 1_000_003 + i)  # δ draws of this batch
        row = self.rows[sample_at(i, len(self.rows), self.cfg.training.seed)]
        batch = make_batch(row, tokenizer=self.tokenizer, cfg=self.data_cfg,
                           cp=self.groups.dims.cp, generator=gen)
        self.last_row = (batch.input_ids.shape[1], batch.num_tiles, int((batch.targets != -100).sum()))
        local = shard_batch(batch, self.groups.dims.cp, self.groups.cp_rank, a2a=self.groups.dims.cp_a2a)
        for name in ("input_ids", "targets", "positions", "visual_index", "loss_weight", "cu_seqlens"):
            setattr(local, name, getattr(local, name).to(self.device))
        local.pixels = local.pixels.to(self.device, next(self.engine.module.parameters()).dtype)
        return local

    def step(self, micro: int) -> dict:
        from workloads.v2pe.train import train_step  # noqa: PLC0415

        import torch.distributed as dist  # noqa: PLC0415

        cp_group = self.groups.cp_group if self.groups.dims.cp > 1 else None
        loss_group = dist.group.WORLD if self.groups.dims.world_size > 1 else None
        return train_step(self.engine, self.batch(micro), cp_group=cp_group, loss_group=loss_group,
                          hybrid=self.groups.hybrid, cfg=self.step_cfg)

    @property
    def samples_per_micro(self) -> int:
        return self.groups.dims.dp

    def predicted_memory(self) -> dict[str, float]:
        """The planner's bytes per GPU for the last row this rank trained on."""
        from dataclasses import replace  # noqa: PLC0415

        from workloads.v2pe.plan import estimate_memory  # noqa: PLC0415

        from .plan import v2pe_shape  # noqa: PLC0415

        seq, tiles, supervised = self.last_row
        _, shape = v2pe_shape(self.cfg)
        shape = replace(shape, seq_len=seq, tiles=tiles, supervised_fraction=max(supervised, 1) / seq)
        return estimate_memory(self.engine.module.cfg, shape)

    def checkpoint_shard(self, rank: int) -> tuple[str, bool]:
        return "", rank == 0  # every rank holds the same model: rank 0 writes it

    def export(self, rank: int) -> None:
        export_model(self, self.cfg, rank)


class PIIPRunner:
    """PIIP with each branch on its own group of workers (parallelism.dims.BranchLayout)."""

    def __init__(self, cfg: JobConfig, world: int, device: torch.device):
        from parallelism.dims import BranchLayout  # noqa: PLC0415
        from workloads.engine import OptimConfig, ShardingConfig, build_engine  # noqa: PLC0415
        from workloads.piip.data import ImageFolder  # noqa: PLC0415
        from workloads.piip.model import PIIP  # noqa: PLC0415
        from workloads.piip.parallel import owned_parameters  # noqa: PLC0415

        from .config import piip_layout, piip_model_config  # noqa: PLC0415

        self.cfg, self.device = cfg, device
        self.groups = BranchLayout(ranks_per_branch=piip_layout(cfg), world_size=world).build(cfg.parallelism.timeout_s)
        t = cfg.training
        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.mcfg = piip_model_config(cfg)
        model = PIIP(self.mcfg).to(device)
        self.engine = build_engine(
            model,
            OptimConfig(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, total_steps=t.steps,
                        grad_clip=t.grad_clip),
            ShardingConfig(sharding=t.sharding, zero_stage=t.zero_stage, bf16=t.bf16, grad_accum=t.grad_accum),
            owned=owned_parameters(model, self.groups),
        )
        root = cfg.piip.data if cfg.piip.data != "synthetic" else run_uri(cfg, "data", "shapes")
        self.data = ImageFolder(root.rstrip("/") + "/" + cfg.piip.task, cfg.piip.task)
        self.size = max(b.resolution for b in self.mcfg.branches)

    @property
    def samples_per_micro(self) -> int:
        return self.cfg.piip.batch_size

    def step(self, micro: int) -> dict:
        import torch.distributed as dist  # noqa: PLC0415

        from parallelism.branch import batch_slice  # noqa: PLC0415
        from workloads.piip.data import batch  # noqa: PLC0415
        from workloads.piip.model import make_pyramid  # noqa: PLC0415
        from workloads.piip.parallel import classification_loss, segmentation_loss  # noqa: PLC0415

        g, B, n = self.groups, self.cfg.piip.batch_size, len(self.data)
        # the global batch: a function of (seed, micro)
        rows = [sample_at(i, n, self.cfg.training.seed) for i in range(micro * B, (micro + 1) * B)]
        lo, hi = batch_slice(g.layout, g.branch, g.rank, B)
        images, labels, masks = batch([self.data[r] for r in rows[lo:hi]], self.size)
        image = make_pyramid(images.to(self.device), self.mcfg)[g.branch]
        t0 = time.perf_counter()
        if self.cfg.piip.task == "classification":
            loss = classification_loss(self.engine.module, image, labels.to(self.device), g, B)
        else:
            loss = segmentation_loss(self.engine.module, image, masks.to(self.device), g, B)
        self.engine.backward(loss)
        stepped = self.engine.step()
        dt = torch.tensor([time.perf_counter() - t0, float(g.branch)])
        times = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(times, dt)
        total = loss.detach().clone().cpu()
        dist.all_reduce(total)
        out = {"loss": float(total), "stepped": stepped}
        for b in range(len(self.mcfg.branches)):  # a branch's time: its slowest rank
            out[f"branch{b}_step_s"] = max(float(t[0]) for t in times if int(t[1]) == b)
        if stepped:
            out.update(grad_norm=self.engine.last_grad_norm, lr=self.engine.lr)
        return out

    def checkpoint_shard(self, rank: int) -> tuple[str, bool]:
        # Each branch group's first rank writes that group's model and optimizer state.
        return f"-branch{self.groups.branch}", self.groups.index_in_branch == 0

    def export(self, rank: int) -> None:
        return None  # PIIP checkpoints are the deliverable for now


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _MemoryProbe:
    """The first step's measured peak tensor memory beside the planner's prediction.

    Measured: CUDA's allocator peak, or on CPU the live-tensor tracker (only where every
    model-state tensor is visible to it, i.e. without DeepSpeed's flat buffers). The
    largest rank's figures are compared (one MAX all-reduce, on every rank)."""

    def __init__(self, runner, device: torch.device):
        self.runner, self.device, self.mode = runner, device, None
        self.enabled = hasattr(runner, "predicted_memory")
        if not self.enabled:
            return
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif runner.engine.ds is None:
            from workloads.memory import TensorMemoryPeak, model_state_tensors  # noqa: PLC0415

            self.mode = TensorMemoryPeak("cpu")
            self.mode.track(model_state_tensors(runner.engine.module, runner.engine.optimizer))

    def __enter__(self):
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
        return False

    def report(self, tracker, *, rank: int) -> dict[str, float]:
        """Metrics to log with the step; the breakdown goes to the run's tags."""
        if not self.enabled:
            return {}
        import torch.distributed as dist  # noqa: PLC0415

        if self.device.type == "cuda":
            measured = float(torch.cuda.max_memory_allocated(self.device))
        else:
            measured = float(self.mode.peak) if self.mode is not None else float("nan")
        predicted = self.runner.predicted_memory()
        both = torch.tensor([predicted["total"], measured], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX)  # NaN (not measured) stays NaN
        predicted_mib, measured_mib = (float(x) / 2**20 for x in both)
        metrics = {"memory_predicted_mib": predicted_mib}
        msg = f"[longview] memory per GPU: predicted {predicted_mib:.1f} MiB"
        if measured_mib == measured_mib:  # not NaN
            err = 100 * (predicted_mib - measured_mib) / measured_mib
            metrics.update(memory_measured_mib=measured_mib, memory_error_pct=err)
            msg += f", measured peak {measured_mib:.1f} MiB ({err:+.1f}%)"
        else:
            msg += " (no measurement: DeepSpeed on CPU keeps buffers the tracker cannot see)"
        if rank == 0:
            print(msg, flush=True)
            for k, v in predicted.items():  # tags, not params: a resumed run may predict anew
                tracker.call("set_tag", f"longview.memory_predicted_gib.{k}", f"{v / 2**30:.4f}")
        return metrics


class CheckpointUploadError(RuntimeError):
    pass


def restore_latest(cfg: JobConfig, *, rank: int, world: int, engine, shard: str):
    """Restores the newest checkpoint of the run in storage that verifies, going back
    through older ones past any that do not (corrupted, or incomplete: a rank's upload
    never finished); says which one failed and why. Every rank verifies every rank's
    manifest, so all ranks settle on the same checkpoint.

    Storage, not Ray's registry, is the source: Ray registers a checkpoint only after its
    controller has processed the report, so a worker killed just after an upload can
    come back to `ray.train.get_checkpoint() is None` with a complete checkpoint stored.

    Returns (state, the checkpoint's name, "name: reason" of each one passed over), or
    None when the run has no checkpoint yet."""
    from .checkpoint import CheckpointError, restore_checkpoint  # noqa: PLC0415

    fs, root = storage_fs(run_uri(cfg), cfg)
    if not fs.exists(root):
        return None
    fs.invalidate_cache(root)  # fsspec caches listings per process
    candidates = sorted((posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)
                         if re.fullmatch(r"step-\d{7}", posixpath.basename(p.rstrip("/")))), reverse=True)
    if not candidates:
        return None
    skipped = []
    for i, name in enumerate(candidates):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            try:
                fs.get(posixpath.join(root, name), local, recursive=True)
                state = restore_checkpoint(local, rank=rank, world_size=world, engine=engine, shard=shard)
            except (CheckpointError, FileNotFoundError) as e:
                skipped.append(f"{name}: {e}")
                if rank == 0:
                    nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                    print(f"[longview] checkpoint {name} is unusable ({e}); "
                          + (f"falling back to {nxt}" if nxt else "no older checkpoint left"), flush=True)
                continue
        return state, name, skipped
    raise CheckpointError(f"no usable checkpoint of {cfg.name} under {run_uri(cfg)} (tried {', '.join(candidates)})")


def _system_metrics(tracker):
    """MLflow's system-metrics monitor (CPU, memory, GPU) on rank 0's node, into the job's run."""
    if not tracker.enabled:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: PLC0415

        # resume_logging: after a restart, continue the monitor's step numbers.
        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=10, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=tracker.uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - optional: never fatal
        print(f"[longview] system metrics off: {e}", file=sys.stderr, flush=True)
        return None


def train_loop(config: dict) -> None:
    import ray.train  # noqa: PLC0415

    from .checkpoint import TrainState, save_checkpoint  # noqa: PLC0415
    from .faults import StepFaults, before_checkpoint_upload  # noqa: PLC0415
    from .storage import RETRIES as s3_retries  # noqa: PLC0415
    from .tracking import Tracker  # noqa: PLC0415

    cfg = build(JobConfig, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    runner = (PIIPRunner if cfg.workload == "piip" else V2PERunner)(cfg, world, device)
    shard, writer = runner.checkpoint_shard(rank)

    state = TrainState(mlflow_run_id=config.get("mlflow_run_id"))
    restored = restore_latest(cfg, rank=rank, world=world, engine=runner.engine, shard=shard)
    if restored is not None:
        state, name, skipped = restored
        if rank == 0:
            print(f"[longview] resumed from {run_uri(cfg, name)} at step {state.step}", flush=True)
    tracker = Tracker(config.get("tracking_uri"), state.mlflow_run_id) if rank == 0 else Tracker(None, None)
    if restored is not None and rank == 0:
        # Every resume is on the run's record (the step it went back to), and so is every
        # checkpoint passed over; the driver's copy of worker output can miss lines.
        tracker.call("log_metric", "resumed_from_step", float(state.step), int(time.time() * 1000), state.step)
        if skipped:
            tracker.call("set_tag", f"longview.unusable_checkpoint.step{state.step}", "; ".join(skipped)[:4000])
    system = _system_metrics(tracker)
    report = getattr(runner, "data_report", None)
    if report is not None and rank == 0:
        print(f"[longview] data: {report.summary()}", flush=True)
        for example in report.examples:
            print(f"[longview]   skipped: {example}", flush=True)
        tracker.log_metrics({"data_samples_loaded": report.loaded, "data_samples_skipped": report.total_skipped,
                             **{f"data_skipped_{r}": n for r, n in report.skipped.items()}}, step=0)

    t = cfg.training
    first = True
    while state.step < t.steps:
        probe = _MemoryProbe(runner, device) if first else None
        t0 = time.perf_counter()
        losses, tokens = [], 0.0
        with StepFaults(state.step, rank), probe or contextlib.nullcontext():
            for m in range(t.grad_accum):
                out = runner.step(state.step * t.grad_accum + m)
                losses.append(out["loss"])
                tokens += out.get("tokens", 0.0)
        dt = time.perf_counter() - t0
        memory = {}
        if probe is not None:
            first = False
            memory = probe.report(tracker, rank=rank)
        loss = sum(losses) / len(losses)
        metrics = {"loss": loss, "lr": out.get("lr", float("nan")), "grad_norm": out.get("grad_norm", float("nan")),
                   "samples_per_s": runner.samples_per_micro * t.grad_accum / dt,
                   "peak_memory_mib": _peak_memory_mib(device)}
        if tokens:
            metrics["tokens_per_s"] = tokens / dt
        metrics.update({k: v for k, v in out.items() if k.endswith("_step_s")})  # per-branch times (PIIP)
        metrics.update(memory)
        if s3_retries[0]:
            metrics["storage_retries"] = float(s3_retries[0])  # this rank's, so far
        state.step += 1
        state.losses.append([state.step, loss])
        tracker.log_metrics(metrics, step=state.step)
        if state.step % t.checkpoint_every == 0 or state.step == t.steps:
            name = f"step-{state.step:07d}"
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, rank=rank, state=state, engine=runner.engine, shard=shard, writer=writer)
                before_checkpoint_upload(state.step, rank)
                try:
                    ray.train.report({"step": state.step, "loss": loss},
                                     checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
                except Exception as e:  # noqa: BLE001 - the storage layer's errors vary by backend
                    # Ray registers a checkpoint only after every rank's upload: this one is
                    # not taken as complete, and the previous checkpoint stays the latest.
                    raise CheckpointUploadError(
                        f"checkpoint {name} of {cfg.name} could not be uploaded to {run_uri(cfg, name)} after "
                        f"storage.retries={cfg.storage.retries} attempts ({type(e).__name__}: {e}); "
                        f"the previous checkpoint stays the one to resume from") from e
    tracker.flush()
    if system is not None:
        system.finish()
    runner.export(rank)
    if rank == 0 and tracker.enabled:
        from .tracking import loss_curve_png  # noqa: PLC0415

        tracker.log_artifact_bytes(loss_curve_png(state.losses, cfg.name), "plots/loss.png")


def export_model(runner: "V2PERunner", cfg: JobConfig, rank: int) -> None:
    """The trained model in InternVL2 Hugging Face format at <run>/export (rank 0 writes)."""
    from workloads.v2pe.checkpoint_io import save_pretrained  # noqa: PLC0415

    module = runner.engine.module
    url = run_uri(cfg, "export")
    if runner.engine.ds is not None and cfg.training.zero_stage == 3:
        import deepspeed  # noqa: PLC0415

        # ZeRO-3 holds shards: gather the full parameters (collective), rank 0 writes.
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if rank == 0:
                save_pretrained(module, url)
    elif rank == 0:
        save_pretrained(module, url)


# --- driver ------------------------------------------------------------------------------------------


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a submitted job's entrypoint


def submitted_job_id() -> str | None:
    """The Ray job id when this process is a submitted job's entrypoint."""
    import json  # noqa: PLC0415

    raw = os.environ.get(SUBMITTED_JOB_ENV)
    return json.loads(raw).get("metadata", {}).get("job_submission_id") if raw else None


def connect_ray(cfg: JobConfig, address: str | None) -> None:
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    if os.environ.get(SUBMITTED_JOB_ENV):
        ray.init()  # inside a submitted job: its cluster and runtime env (set at submission)
        return
    # The job's environment reaches every actor, the Train controller included (it opens
    # the S3 storage too), not only the training workers.
    ray.init(address=address or "local", log_to_driver=True, runtime_env={"env_vars": worker_env(cfg)})


def prepare_data(cfg: JobConfig) -> str | None:
    """Writes the synthetic training set to storage once (skipped if it is there)."""
    if cfg.workload == "piip":
        if cfg.piip.data != "synthetic":
            return None
        from workloads.piip.data import write_shapes  # noqa: PLC0415

        url = run_uri(cfg, "data", "shapes")
        fs, root = storage_fs(url, cfg)
        if not fs.exists(posixpath.join(root, cfg.piip.task)):
            size = max(int(r) for r in cfg.piip.resolutions)
            write_shapes(url, cfg.piip.synthetic_samples, size=size, seed=cfg.training.seed)
        return url
    if cfg.data.train != "synthetic":
        return None

    from workloads.v2pe.model import model_config  # noqa: PLC0415
    from workloads.v2pe.synth import SynthConfig, write_dataset  # noqa: PLC0415

    url = run_uri(cfg, "data", "train")
    fs, root = storage_fs(url, cfg)
    if fs.exists(posixpath.join(root, "data.jsonl")):
        return url + "/data.jsonl"
    mc = model_config(cfg.model.size, **cfg.model.overrides)
    s = cfg.data.synthetic
    synth = SynthConfig(tokens=s.tokens, images=s.images, task=s.task, tile=mc.vision.image_size,
                        tokens_per_tile=mc.tokens_per_tile, seed=s.seed)
    return write_dataset(url, synth, s.samples)


def run_training(cfg: JobConfig, *, ray_address: str | None = None, tags: dict | None = None):
    """Fits the job on the Ray cluster at `ray_address` ("local": in-process). Returns the Result."""
    import ray  # noqa: PLC0415
    import ray.train  # noqa: PLC0415
    from ray.train.torch import TorchConfig, TorchTrainer  # noqa: PLC0415

    from .tracking import find_or_create_run  # noqa: PLC0415

    prepare_data(cfg)
    run_id = None
    if cfg.tracking.uri:
        run_id, created = find_or_create_run(cfg.tracking.uri, cfg.experiment, cfg.name, {
            "longview.checkpoint_uri": run_uri(cfg), "longview.workload": cfg.workload, **(tags or {}),
        })
        if created:
            from .tracking import Tracker  # noqa: PLC0415

            tr = Tracker(cfg.tracking.uri, run_id)
            params = flatten(to_dict(cfg))
            from mlflow.entities import Param  # noqa: PLC0415

            tr.call("log_batch", [], [Param(k, str(v)[:500]) for k, v in params.items()])
            import yaml  # noqa: PLC0415

            tr.log_artifact_bytes(yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(), "config/job.yaml")
    connect_ray(cfg, ray_address)
    storage_path, fs = storage_for_ray(cfg)
    use_gpu = cfg.resources.gpus_per_worker > 0
    resources = {"CPU": cfg.resources.cpus_per_worker, **cfg.resources.custom}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.parallelism.timeout_s)),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.resources.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    tracker = None
    if run_id:
        from .tracking import Tracker  # noqa: PLC0415

        tracker = Tracker(cfg.tracking.uri, run_id)
    try:
        result = trainer.fit()  # raises once FailureConfig's retries are used up
    except BaseException:
        if tracker:
            tracker.call("set_terminated", "FAILED")
        raise
    if tracker:
        tracker.call("set_tag", "longview.final_checkpoint", checkpoint_uri(cfg, result.checkpoint))
        tracker.call("set_tag", "longview.export", run_uri(cfg, "export"))
        tracker.call("set_terminated", "FINISHED")
    return result, run_id


def checkpoint_uri(cfg: JobConfig, checkpoint) -> str:
    """A Ray checkpoint's location as users write it (s3://bucket/... for S3 storage)."""
    path = str(checkpoint.path)
    return f"s3://{path}" if cfg.storage.uri.startswith("s3://") else path

