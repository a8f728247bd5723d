"""The planner's per-GPU memory against the measured peak of real training steps.

    python benchmarks/plan_vs_measured.py                      # CPU, gloo ranks
    python benchmarks/plan_vs_measured.py --device cuda --size internvl2-2b --lengths 16384 32768 --layouts 1x1

Each case trains one synthetic sample (one image per ~1K tokens) for two steps with
activation checkpointing and AdamW; the second step's peak is measured: on CPU the
peak bytes of live tensors (`workloads.memory.TensorMemoryPeak`, the counterpart of
CUDA's allocator statistics), on CUDA `torch.cuda.max_memory_allocated`. The planner
predicts the same quantity from the model's dimensions alone. Layouts are CPxU (context
parallel degree x all-to-all degree); on CUDA only one rank (1x1) is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._measure import peak_tensor_bytes
from parallelism.dims import ParallelDims
from parallelism.local_world import LocalWorld
from workloads.engine import TrainingConfig, build_engine
from workloads.memory import model_state_tensors
from workloads.v2pe.data import DataConfig, load_samples
from workloads.v2pe.model import V2PEModel, model_config
from workloads.v2pe.packing import make_batch, shard_batch
from workloads.v2pe.plan import RunShape, estimate_memory
from workloads.v2pe.synth import SynthConfig, write_dataset
from workloads.v2pe.tokenizer import ByteTokenizer
from workloads.v2pe.train import TrainStepConfig, parallelize, train_step

# The CPU model of benchmarks/v2pe_cpu.py: ViT on 448-pixel tiles, decoder 256 wide.
SMALL = dict(llm_hidden_size=256, llm_num_heads=8, llm_num_kv_heads=4, llm_num_layers=4, llm_intermediate_size=768)
CHUNK = 1024


def _model_cfg(size: str):
    return model_config("tiny", **SMALL) if size == "small" else model_config(size)


def _eval_rank(size, sample, a2a, device, bf16):
    from workloads.v2pe.evaluate import score_sample

    W = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    model = V2PEModel(_model_cfg(size)).to(device, torch.bfloat16 if bf16 else torch.float32).eval()
    groups = ParallelDims(world_size=W, cp=W, cp_a2a=a2a).build() if W > 1 else None
    kw = dict(tokenizer=ByteTokenizer(), mode="v2pe_fix", stride=64, chunk=CHUNK,
              cp_group=groups.cp_group if groups else None, hybrid=groups.hybrid if groups else None)
    return peak_tensor_bytes(device, lambda: score_sample(model, sample, **kw), list(model.parameters()))


def _rank(size, batch, a2a, device, bf16):
    W = dist.get_world_size() if dist.is_initialized() else 1
    r = dist.get_rank() if W > 1 else 0
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = V2PEModel(_model_cfg(size)).to(device, dtype)
    cfg = TrainStepConfig(loss_chunk_tokens=CHUNK, activation_checkpointing=True)
    parallelize(model, cfg)
    engine = build_engine(model, TrainingConfig(lr=1e-4, sharding="none"))
    groups = ParallelDims(world_size=W, cp=W, cp_a2a=a2a).build() if W > 1 else None
    local = shard_batch(batch, W, r, a2a=a2a) if W > 1 else batch
    for name in ("input_ids", "targets", "positions", "visual_index", "loss_weight", "cu_seqlens"):
        setattr(local, name, getattr(local, name).to(device))
    local.pixels = local.pixels.to(device, dtype)
    kw = dict(cp_group=groups.cp_group if groups else None, loss_group=groups.cp_group if groups else None,
              hybrid=groups.hybrid if groups else None, cfg=cfg)
    train_step(engine, local, **kw)  # warm-up: gradients and optimizer states exist from here on
    tracked = list(model_state_tensors(engine.module, engine.optimizer))
    tracked += [t for t in vars(local).values() if isinstance(t, torch.Tensor)]
    return peak_tensor_bytes(device, lambda: train_step(engine, local, **kw), tracked)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", help="'small' (the CPU model) or a model size")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "4x2"])
    ap.add_argument("--bf16", action="store_true", help="bf16 model (default float32 on CPU)")
    ap.add_argument("--eval", action="store_true", help="evaluation (scoring one sample, no graph) instead")
    args = ap.parse_args(argv)
    tok = ByteTokenizer()
    device = torch.device(args.device)
    mcfg = _model_cfg(args.size)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; model {args.size}; "
          f"{'bf16' if args.bf16 else 'fp32'}; "
          + ("evaluation: teacher-forced scoring" if args.eval else "AdamW, sharding none, activation checkpointing"))
    print("| tokens | tiles | cp x a2a | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lengths:
            images = max(1, n // 1024)
            synth = SynthConfig(tokens=n, images=images, task="marked", tile=mcfg.vision.image_size,
                                tokens_per_tile=mcfg.tokens_per_tile)
            path = write_dataset(os.path.join(tmp, str(n)), synth, 1)
            dcfg = DataConfig(max_tokens=n, tile=mcfg.vision.image_size, tokens_per_tile=mcfg.tokens_per_tile)
            samples = load_samples(path, tokenizer=tok, cfg=dcfg)
            for layout in args.layouts:
                cp, a2a = (int(x) for x in layout.split("x"))
                batch = make_batch(samples, tokenizer=tok, cfg=dcfg, cp=cp, generator=torch.Generator().manual_seed(0))
                fn, what = (_eval_rank, samples[0]) if args.eval else (_rank, batch)
                if cp == 1:
                    measured = fn(args.size, what, 1, device, args.bf16)
                else:
                    with LocalWorld(cp, timeout_s=1200) as world:
                        measured = max(world.run(fn, args.size, what, a2a, device, args.bf16))
                supervised = int((batch.targets != -100).sum())
                shape = RunShape(seq_len=batch.input_ids.shape[1], tiles=batch.num_tiles, cp=cp, cp_a2a=a2a,
                                 training=not args.eval, sharding="none", bf16=args.bf16, loss_chunk_tokens=CHUNK,
                                 supervised_fraction=supervised / batch.input_ids.shape[1])
                predicted = estimate_memory(mcfg, shape)["total"]
                err = (predicted - measured) / measured
                print(f"| {batch.input_ids.shape[1]} | {batch.num_tiles} | {cp}x{a2a} | {predicted / 2**20:.0f} | "
                      f"{measured / 2**20:.0f} | {err:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
