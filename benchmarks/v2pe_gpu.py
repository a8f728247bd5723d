"""One-GPU V2PE capacity for internvl2-2b dimensions (one prepared run, prints a report).

    python benchmarks/v2pe_gpu.py [--lengths 16384 32768 65536 131072 262144] [--out v2pe_gpu.json]

1. Training: bf16 model with activation checkpointing and the chunked loss, AdamW in
   bf16 (no sharding: one GPU). For growing sequence lengths (one image of 256 visual
   tokens per 4K tokens, δ drawn per image) it runs steps until memory runs out and
   reports tokens/s, model FLOPs utilisation and peak memory.
2. Evaluation: forward only at the same lengths, peak memory.
   Each row carries the planner's prediction (`workloads/v2pe/plan.py`) and its error.
3. From the measured peak memory m(S) = a + b·S (least squares over the lengths that
   fit), the per-GPU memory of a 256K-token training sample on 8 GPUs (S_local = 32K)
   and of a 1M-token evaluation on 16 and 32 GPUs (S_local = 64K, 32K).

Model FLOPs per token: 6·N_decoder (matmuls forward+backward) + 6·L·S·H·D/2·2 for causal
attention (QK and PV), plus the ViT's 6·N_vit·1025 per tile; recomputation from
activation checkpointing is not counted (the usual MFU convention). Peak: 989 TFLOP/s
dense bf16 (H100/H200 SXM). Needs only torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._measure import empty_cache, peak_tensor_bytes
from workloads.engine import TrainingConfig, build_engine
from workloads.v2pe.data import EncodedSample
from workloads.v2pe.model import AttentionSpec, V2PEModel, model_config
from workloads.v2pe.packing import pack
from workloads.v2pe.plan import RunShape, estimate_memory
from workloads.v2pe.tokenizer import ByteTokenizer
from workloads.v2pe.train import TrainStepConfig, parallelize, train_step

PEAK_TFLOPS = 989.0


def synthetic_sample(S: int, tok: ByteTokenizer, tokens_per_tile: int, tile: int, every: int = 4096) -> EncodedSample:
    """S tokens of random text with one single-tile image per `every` tokens, answer at the end."""
    g = torch.Generator().manual_seed(S)
    ids = torch.randint(0, 256, (S,), generator=g)
    n_img = max(1, S // every)
    for i in range(n_img):
        at = i * every + 8
        ids[at] = tok.img_start_id
        ids[at + 1 : at + 1 + tokens_per_tile] = tok.img_context_id
        ids[at + 1 + tokens_per_tile] = tok.img_end_id
    targets = torch.full((S,), -100)
    targets[-65:-1] = ids[-64:]  # 64 supervised answer tokens
    pixels = torch.randn(n_img, 3, tile, tile, generator=g)
    return EncodedSample(sample_id=f"synthetic-{S}", input_ids=ids, targets=targets, pixels=pixels)


def model_flops_per_token(model: V2PEModel, S: int, n_tiles: int) -> float:
    cfg = model.cfg
    n_dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    n_vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision.", "projector.")))
    attn = 6 * cfg.llm.num_layers * S * cfg.llm.num_heads * cfg.llm.head_dim  # causal: half of 12·L·S·H·D
    vit = 6 * n_vit * (cfg.vision.grid**2 + 1) * n_tiles / S
    return 6 * n_dec + attn + vit


def fit_line(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    return my - b * mx, b


def _batch(S: int, model: V2PEModel, device: torch.device, dtype: torch.dtype, every: int):
    tok = ByteTokenizer()
    sample = synthetic_sample(S, tok, model.cfg.tokens_per_tile, model.cfg.vision.image_size, every)
    batch = pack([sample], tokenizer=tok, tokens_per_tile=model.cfg.tokens_per_tile, multiple=2, mode="v2pe_rnd",
                 generator=torch.Generator().manual_seed(0))
    for name in ("input_ids", "targets", "positions", "visual_index", "loss_weight", "cu_seqlens"):
        setattr(batch, name, getattr(batch, name).to(device))
    batch.pixels = batch.pixels.to(device, dtype)
    return batch


def capacity(report: dict, *, size: str, lengths: list[int], device: torch.device, every: int = 4096,
             evals: bool = True) -> None:
    """Training and forward-only steps at growing lengths until both run out of memory;
    rows in report["train"] / report["eval"], and the linear memory models.

    The forward-only rows run in the process that trained, so the optimizer state and
    gradients are resident under them (the planner's evaluation figure leaves them out);
    `evals=False` leaves them to a fresh process (gpu_all's eval_1m part)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = V2PEModel(model_config(size)).to(device, dtype)
    cfg = TrainStepConfig(loss_chunk_tokens=4096, activation_checkpointing=True)
    parallelize(model, cfg)
    engine = build_engine(model, TrainingConfig(lr=1e-5, sharding="none"))
    report.update(size=size, params=sum(p.numel() for p in model.parameters()))
    report.setdefault("train", [])
    report.setdefault("eval", [])
    for S in lengths:
        batch = _batch(S, model, device, dtype, every)
        # The planner's figure for the same step (one GPU, no sharding, 64 answer tokens).
        shape = RunShape(seq_len=batch.input_ids.shape[1], tiles=batch.num_tiles, sharding="none",
                         bf16=dtype == torch.bfloat16, loss_chunk_tokens=cfg.loss_chunk_tokens,
                         supervised_fraction=64 / S)
        row = {"S": S, "predicted_gib": estimate_memory(model.cfg, shape)["total"] / 2**30}
        try:
            train_step(engine, batch, cfg=cfg)  # warm-up (and optimizer state allocation)
            t0 = time.perf_counter()
            peak = peak_tensor_bytes(device, lambda b=batch: train_step(engine, b, cfg=cfg))
            dt = time.perf_counter() - t0
            f = model_flops_per_token(model, S, batch.num_tiles) * S
            row.update(step_s=dt, tokens_per_s=S / dt, mfu=f / dt / 1e12 / PEAK_TFLOPS, peak_gib=peak / 2**30)
            row["plan_error"] = (row["predicted_gib"] - row["peak_gib"]) / row["peak_gib"]
        except torch.OutOfMemoryError:
            row["oom"] = True
        report["train"].append(row)
        print("train", row, flush=True)
        empty_cache(device)
        if not evals:
            if row.get("oom"):
                break
            continue
        erow = forward_peak(model, batch, shape, device)
        report["eval"].append(erow)
        print("eval", erow, flush=True)
        if row.get("oom") and erow.get("oom"):
            break
    report.update(memory_models(report["train"], report["eval"]))


def forward_peak(model: V2PEModel, batch, shape: RunShape, device: torch.device) -> dict:
    """Forward-only (evaluation) peak memory of one batch, with the planner's figure."""
    eshape = RunShape(**{**shape.__dict__, "training": False})
    erow = {"S": shape.seq_len, "predicted_gib": estimate_memory(model.cfg, eshape)["total"] / 2**30}

    def run():
        with torch.no_grad():
            visual = model.encode_images(batch.pixels)
            model.forward_hidden(batch.input_ids, batch.positions, visual, batch.visual_index,
                                 AttentionSpec(cu_seqlens=batch.cu_seqlens))

    try:
        t0 = time.perf_counter()
        erow["peak_gib"] = peak_tensor_bytes(device, run) / 2**30
        erow["forward_s"] = time.perf_counter() - t0
        erow["plan_error"] = (erow["predicted_gib"] - erow["peak_gib"]) / erow["peak_gib"]
    except torch.OutOfMemoryError:
        erow["oom"] = True
    empty_cache(device)
    return erow


def memory_models(train: list[dict], evals: list[dict]) -> dict:
    """Least-squares lines of peak memory against length, and what they give at 256K / 1M."""
    out = {}
    fits = [r for r in train if "peak_gib" in r]
    efits = [r for r in evals if "peak_gib" in r]
    if len(fits) >= 2:
        a, b = fit_line([r["S"] for r in fits], [r["peak_gib"] for r in fits])
        out["train_memory_model"] = {"fixed_gib": a, "gib_per_token": b, "256k_on_8_gpus_gib": a + b * 262144 / 8,
                                     "longest_trained": max(r["S"] for r in fits)}
    if len(efits) >= 2:
        a, b = fit_line([r["S"] for r in efits], [r["peak_gib"] for r in efits])
        out["eval_memory_model"] = {"fixed_gib": a, "gib_per_token": b,
                                    **{f"1m_on_{w}_gpus_gib": a + b * 2**20 / w for w in (1, 4, 8, 16, 32)},
                                    "longest_evaluated": max(r["S"] for r in efits)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="internvl2-2b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    capacity(report, size=args.size, lengths=args.lengths, device=torch.device("cuda"))
    print(json.dumps({k: v for k, v in report.items() if k.endswith("model")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
