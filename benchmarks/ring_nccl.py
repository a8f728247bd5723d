"""Multi-GPU ring attention over NCCL, for users' clusters.

    torchrun --nproc-per-node 8 benchmarks/ring_nccl.py --total 262144 --kernels auto ring_flash_attn

For each kernel (longview's ring with its block kernels, `auto` by default; or
`ring_flash_attn`, ring-flash-attn's whole ring where the `gpu` extra is installed),
checks the ring against one GPU's full attention on a small sequence (every rank
computes the reference and compares its own shard), then times forward and
forward+backward on `--total` tokens split over all ranks, and prints a row of per-rank
TFLOP/s from rank 0: the rows sit side by side, the same inputs and group.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ring_gpu import H_KV, H_Q, D, causal_flops, timed
from parallelism.dims import ParallelDims, init_distributed
from parallelism.ring_attention import ring_attention
from parallelism.zigzag import zigzag_shard


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=262144)
    ap.add_argument("--kernels", nargs="+", default=["auto"])
    ap.add_argument("--timeout-s", type=float, default=300)
    args = ap.parse_args(argv)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_distributed(backend="nccl", timeout_s=args.timeout_s)
    groups = ParallelDims.infer(world_size=dist.get_world_size(), cp=dist.get_world_size()).build()
    W, r, g = groups.dims.cp, groups.cp_rank, groups.cp_group

    def inputs(S, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(1, S, h, D, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (H_Q, H_KV, H_KV, H_Q)]

    for kernel in args.kernels:
        row(kernel, inputs, W, r, g, args.total)
    dist.destroy_process_group()


def row(kernel: str, inputs, W: int, r: int, g, total: int) -> None:
    # correctness on a small sequence
    q, k, v, do = inputs(8192, 0)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    out = ring_attention(*(zigzag_shard(t, W, r) for t in (q, k, v)), group=g, kernel=kernel)
    err = (out.float() - zigzag_shard(ref, W, r).float()).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    q, k, v, do = (zigzag_shard(t, W, r).contiguous() for t in inputs(total, 1))
    q.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            ring_attention(q, k, v, group=g, kernel=kernel)

    def fwd_bwd():
        ring_attention(q, k, v, group=g, kernel=kernel).backward(do)

    f = causal_flops(total, H_Q, D) / W
    tf, tfb = timed(fwd), timed(fwd_bwd)
    if r == 0:
        print(f"{kernel}: W={W} total={total} max_err_vs_single_gpu={err.item():.3e} "
              f"fwd {f / tf / 1e12:.1f} TFLOP/s/rank, fwd+bwd {3.5 * f / tfb / 1e12:.1f} TFLOP/s/rank")


if __name__ == "__main__":
    main()
