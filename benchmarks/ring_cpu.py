"""CPU benchmark: W gloo processes running ring attention against one process.

    python benchmarks/ring_cpu.py [--worlds 2 4] [--s-local 512 1024 2048 4096]

For every local length S_local and world size W, the ring runs over a total of
W·S_local tokens (causal, GQA, float32, forward+backward, one thread per rank). The
reference is one process doing plain SDPA on the same total length, also on one thread.

- efficiency per rank = t_single / (W · t_ring): 1.0 means the ring splits the work
  perfectly; communication, merging and imbalance push it below.
- peak memory per rank: the rise of the process's peak RSS (VmHWM, reset after the
  inputs are made) over its RSS before the first step.

Each measurement runs in a fresh set of processes, so a peak belongs to one size only.
The machine's core count bounds what W can show: with W above it, ranks share cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._measure import reset_peak, status_mib
from parallelism.dims import ParallelDims
from parallelism.hybrid_attention import hybrid_attention, hybrid_shard
from parallelism.local_world import LocalWorld
from parallelism.ring_attention import ring_attention
from parallelism.zigzag import zigzag_shard


def _inputs(S, H, Hkv, D):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, S, h, D, generator=g) for h in (H, Hkv, Hkv, H))


def _run(S_total, H, Hkv, D, repeats, use_ring, warm=True, a2a=1):
    W = dist.get_world_size()
    r = dist.get_rank()
    if warm:  # page in the kernels' code on a tiny problem, so RSS counts data, not code
        _run(8 * W, H, Hkv, D, 1, use_ring, warm=False, a2a=a2a)
    q, k, v, dout = _inputs(S_total, H, Hkv, D)
    attend = None
    if use_ring and a2a > 1:  # hybrid: heads all-to-all inside groups of a2a ranks x ring
        groups = ParallelDims.infer(world_size=W, cp=W, cp_a2a=a2a).build()
        rr, ar = dist.get_rank(groups.ring_group), dist.get_rank(groups.a2a_group)
        q, k, v, dout = (hybrid_shard(t, W // a2a, a2a, rr, ar).clone() for t in (q, k, v, dout))

        def attend(q, k, v):
            return hybrid_attention(q, k, v, a2a_group=groups.a2a_group, ring_group=groups.ring_group)
    elif use_ring:
        q, k, v, dout = (zigzag_shard(t, W, r).clone() for t in (q, k, v, dout))
    for t in (q, k, v):
        t.requires_grad_(True)
    reset_peak()  # earlier peaks (imports, the unsharded inputs) must not count
    base = status_mib("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        if attend is not None:
            out = attend(q, k, v)
        elif use_ring:
            out = ring_attention(q, k, v, causal=True)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        out.backward(dout)
        best = min(best, time.perf_counter() - t0)
        del out
    return best, status_mib("VmHWM") - base


def measure(W, S_local, H, Hkv, D, repeats, a2a=1):
    with LocalWorld(W) as world:
        res = world.run(_run, W * S_local, H, Hkv, D, repeats, True, a2a=a2a)
    with LocalWorld(1) as world:
        (single,) = world.run(_run, W * S_local, H, Hkv, D, repeats, False)
    t_ring = max(t for t, _ in res)
    return {
        "W": W,
        "a2a": a2a,
        "S_local": S_local,
        "S_total": W * S_local,
        "t_ring_ms": round(t_ring * 1e3, 1),
        "t_single_ms": round(single[0] * 1e3, 1),
        "efficiency_per_rank": round(single[0] / (W * t_ring), 3),
        "peak_mib_per_rank": round(max(m for _, m in res), 1),
        "peak_mib_single": round(single[1], 1),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="ring attention on CPU: gloo ranks vs one process")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--s-local", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--a2a", type=int, default=1, help="hybrid: all-to-all degree U (ring degree W/U)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    print(f"cores: {os.cpu_count()}, H_q={args.heads}, H_kv={args.kv_heads}, D={args.head_dim}, fp32, causal, "
          f"fwd+bwd, all-to-all degree {args.a2a}")
    print("| W | S_local | S_total | ring ms | single ms | efficiency/rank | peak MiB/rank | peak MiB single |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for W in args.worlds:
        for S_local in args.s_local:
            row = measure(W, S_local, args.heads, args.kv_heads, args.head_dim, args.repeats, a2a=args.a2a)
            rows.append(row)
            print(
                f"| {W} | {S_local} | {row['S_total']} | {row['t_ring_ms']} | {row['t_single_ms']} | "
                f"{row['efficiency_per_rank']} | {row['peak_mib_per_rank']} | {row['peak_mib_single']} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
