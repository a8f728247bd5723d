"""CPU benchmark of the V2PE training step: tokens/s and peak memory per rank.

    python benchmarks/v2pe_cpu.py [--lengths 2048 4096 8192 16384] [--worlds 1 2]

A small InternVL2-style model (ViT on 448-pixel tiles, 256 visual tokens per image;
decoder width 256, 4 layers, GQA 8/4) trains on synthetic long samples (one image per
~1K tokens, δ drawn per image) with activation checkpointing and the chunked loss.
For each length and context-parallel degree W (one sample sharded over W gloo ranks,
one thread each): tokens/s of the whole step (forward, backward, AdamW) and the rise
of each rank's peak RSS during the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._measure import reset_peak, status_mib
from parallelism.local_world import LocalWorld
from workloads.engine import TrainingConfig, build_engine
from workloads.v2pe.data import DataConfig, load_samples
from workloads.v2pe.model import V2PEModel, model_config
from workloads.v2pe.packing import make_batch, shard_batch
from workloads.v2pe.synth import SynthConfig, write_dataset
from workloads.v2pe.tokenizer import ByteTokenizer
from workloads.v2pe.train import TrainStepConfig, parallelize, train_step

SMALL = dict(llm_hidden_size=256, llm_num_heads=8, llm_num_kv_heads=4, llm_num_layers=4, llm_intermediate_size=768)


def _rank(batch, repeats):
    W, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = V2PEModel(model_config("tiny", **SMALL))
    cfg = TrainStepConfig(loss_chunk_tokens=1024, activation_checkpointing=True)
    parallelize(model, cfg)
    engine = build_engine(model, TrainingConfig(lr=1e-4, sharding="none"))
    local = shard_batch(batch, W, r) if W > 1 else batch
    group = dist.group.WORLD if W > 1 else None
    train_step(engine, local, cp_group=group, loss_group=group, cfg=cfg)  # warm-up: optimizer state exists now
    reset_peak()
    base = status_mib("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(engine, local, cp_group=group, loss_group=group, cfg=cfg)
        best = min(best, time.perf_counter() - t0)
    return best, status_mib("VmHWM") - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    tok = ByteTokenizer()
    print(f"cores: {os.cpu_count()}; model: tiny ViT + decoder {SMALL}; fp32; one thread per rank")
    print("| W | tokens | images | step s | tokens/s | peak MiB/rank |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lengths:
            images = max(1, n // 1024)
            path = write_dataset(os.path.join(tmp, str(n)), SynthConfig(tokens=n, images=images, task="marked"), 1)
            samples = load_samples(path, tokenizer=tok, cfg=DataConfig(max_tokens=n))
            for W in args.worlds:
                batch = make_batch(samples, tokenizer=tok, cfg=DataConfig(max_tokens=n), cp=W,
                                   generator=torch.Generator().manual_seed(0))
                with LocalWorld(W, timeout_s=600) as world:
                    res = world.run(_rank, batch, args.repeats)
                t = max(x[0] for x in res)
                mem = max(x[1] for x in res)
                print(f"| {W} | {n} | {images} | {t:.2f} | {n / t:.0f} | {mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
