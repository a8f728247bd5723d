"""`longview eval`: accuracy per (context length, δ) of a trained model, on Ray.

The driver writes synthetic evaluation sets of the configured lengths (the needle task
of the training data, at lengths up to and beyond the training length) to storage
once, then runs one Ray Train worker group in which all workers form one
context-parallel group: each sample is spread over every rank, up to 1M tokens. Rank 0
writes the table to storage and logs it to MLflow as a nested run of the job's run.
"""

from __future__ import annotations

import json
import os
import posixpath

import torch

from .config import JobConfig, build, to_dict
from .launch import connect_ray, run_uri, storage_for_ray, storage_fs, worker_env

EXPORT = "export"  # InternVL2-format model written at the end of training


def prepare_eval_data(cfg: JobConfig) -> dict[int, str]:
    from workloads.v2pe.model import model_config  # noqa: PLC0415
    from workloads.v2pe.synth import SynthConfig, write_dataset  # noqa: PLC0415

    mc = model_config(cfg.model.size, **cfg.model.overrides)
    e = cfg.evaluation
    paths = {}
    for n in e.lengths:
        url = run_uri(cfg, "data", f"eval-{n}")
        fs, root = storage_fs(url, cfg)
        if not fs.exists(posixpath.join(root, "data.jsonl")):
            write_dataset(url, SynthConfig(tokens=n, images=e.images, task=e.task, tile=mc.vision.image_size,
                                           tokens_per_tile=mc.tokens_per_tile, seed=10_000 + n), e.samples_per_length)
        paths[n] = url + "/data.jsonl"
    return paths


def eval_loop(config: dict) -> None:
    import ray.train  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from workloads.v2pe.checkpoint_io import load_pretrained  # noqa: PLC0415
    from workloads.v2pe.data import ByteTokenizer, DataConfig, load_samples  # noqa: PLC0415
    from workloads.v2pe.evaluate import accuracy_table, format_table  # noqa: PLC0415

    cfg = build(JobConfig, config["job"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    model = load_pretrained(config["model"]).eval()
    mc = model.cfg
    tok = ByteTokenizer()
    samples = []
    for n, path in sorted(config["data"].items(), key=lambda kv: int(kv[0])):
        samples += load_samples(path, tokenizer=tok, cfg=DataConfig(max_tokens=int(n), max_tiles=cfg.data.max_tiles,
                                                                   tile=mc.vision.image_size,
                                                                   tokens_per_tile=mc.tokens_per_tile))
    from parallelism.dims import ParallelDims  # noqa: PLC0415

    # Every worker is one context-parallel group; cp_a2a splits it for hybrid attention.
    world = dist.get_world_size()
    groups = ParallelDims(world_size=world, cp=world, cp_a2a=cfg.parallelism.cp_a2a).build(cfg.parallelism.timeout_s)
    rows = accuracy_table(model, samples, tokenizer=tok, strides=cfg.evaluation.strides,
                          cp_group=groups.cp_group if world > 1 else None, hybrid=groups.hybrid)
    if rank == 0:
        table = format_table(rows)
        fs, root = storage_fs(config["out"], cfg)
        fs.pipe_file(posixpath.join(root, "accuracy.md"), table.encode())
        fs.pipe_file(posixpath.join(root, "accuracy.json"), json.dumps([r.__dict__ for r in rows]).encode())
        if config.get("parent_run_id") and cfg.tracking.uri:
            _log_nested(cfg, config["parent_run_id"], rows, table)


def _log_nested(cfg: JobConfig, parent: str, rows, table: str) -> None:
    from mlflow.entities import Metric  # noqa: PLC0415
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(cfg.tracking.uri)
    exp_id = client.get_run(parent).info.experiment_id
    run = client.create_run(exp_id, run_name=f"{cfg.name}-eval",
                            tags={"mlflow.parentRunId": parent, "longview.kind": "evaluation"})
    metrics = [Metric(f"accuracy_len{r.tokens}_delta{r.delta.replace('/', '_')}", r.accuracy, 0, 0) for r in rows]
    client.log_batch(run.info.run_id, metrics=metrics)
    client.log_text(run.info.run_id, table, "accuracy.md")
    client.set_terminated(run.info.run_id)


def run_evaluation(cfg: JobConfig, *, checkpoint: str | None = None, ray_address: str | None = None) -> str:
    import ray.train  # noqa: PLC0415
    from ray.train.torch import TorchConfig, TorchTrainer  # noqa: PLC0415

    from .tracking import find_or_create_run  # noqa: PLC0415

    if not cfg.evaluation.lengths:
        raise SystemExit("evaluation.lengths is empty: nothing to evaluate")
    model = checkpoint or run_uri(cfg, EXPORT)
    data = {str(n): p for n, p in prepare_eval_data(cfg).items()}
    out = run_uri(cfg, "eval")
    parent = None
    if cfg.tracking.uri:
        parent, _ = find_or_create_run(cfg.tracking.uri, cfg.experiment, cfg.name, {})
    connect_ray(cfg, ray_address)
    storage_path, fs = storage_for_ray(cfg)
    use_gpu = cfg.resources.gpus_per_worker > 0
    trainer = TorchTrainer(
        eval_loop,
        train_loop_config={"job": to_dict(cfg), "model": model, "data": data, "out": out, "parent_run_id": parent},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.parallelism.timeout_s)),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.resources.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-eval-{os.getpid()}", storage_path=storage_path,
                                       storage_filesystem=fs, worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
    trainer.fit()
    fs_, root = storage_fs(out, cfg)
    return fs_.cat_file(posixpath.join(root, "accuracy.md")).decode()
