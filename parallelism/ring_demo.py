"""Ring-attention demonstration on local gloo processes: exactness and throughput.

    python -m parallelism.ring_demo [--seq 4096] [--worlds 1 2 4]

For each world size W it shards one causal GQA sequence over W processes, runs ring
attention forward and backward, gathers the result and compares it with one process
running plain attention on the whole sequence.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .local_world import LocalWorld
from .ring_attention import ring_attention
from .zigzag import zigzag_shard, zigzag_unshard


def _rank_step(q, k, v, dout, repeats):
    W, r = dist.get_world_size(), dist.get_rank()
    qs, ks, vs, ds = (zigzag_shard(t, W, r).clone().requires_grad_(t is not dout) for t in (q, k, v, dout))
    times = []
    for _ in range(repeats):
        for t in (qs, ks, vs):
            t.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        out = ring_attention(qs, ks, vs, causal=True)
        out.backward(ds)
        times.append(time.perf_counter() - t0)
    return out.detach(), qs.grad, ks.grad, vs.grad, min(times)


def causal_flops(batch: int, seq: int, heads: int, head_dim: int, backward: bool) -> float:
    """Matmul FLOPs of causal attention (a multiply-add counts as 2): QK^T and PV, halved."""
    fwd = 4 * batch * seq * seq * heads * head_dim / 2
    return fwd * (3.5 if backward else 1.0)  # backward does 2.5x the forward's matmuls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    S, H, Hkv, Dh = args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, S, H, Dh, generator=g)
    k = torch.randn(1, S, Hkv, Dh, generator=g)
    v = torch.randn(1, S, Hkv, Dh, generator=g)
    dout = torch.randn(1, S, H, Dh, generator=g)

    torch.set_num_threads(1)  # every rank below also runs on one thread
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    t_ref = float("inf")
    for _ in range(args.repeats):  # best of N, like the ranks below
        for t in (qr, kr, vr):
            t.grad = None
        t0 = time.perf_counter()
        ref = F.scaled_dot_product_attention(
            qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        ref.backward(dout)
        t_ref = min(t_ref, time.perf_counter() - t0)
    flops = causal_flops(1, S, H, Dh, backward=True)
    print(f"ring attention demo: S={S}, H_q={H}, H_kv={Hkv}, D={Dh}, causal, float32, fwd+bwd")
    print(f"  one process, plain SDPA: {t_ref * 1e3:8.1f} ms  {flops / t_ref / 1e9:6.1f} GFLOP/s")
    for W in args.worlds:
        if S % (2 * W):
            print(f"  W={W}: skipped, {S} is not a multiple of {2 * W}")
            continue
        with LocalWorld(W) as world:
            res = world.run(_rank_step, q, k, v, dout, args.repeats)
        got = [zigzag_unshard([r[i] for r in res]) for i in range(4)]
        err = max((a - b).abs().max().item() for a, b in zip(got, (ref, qr.grad, kr.grad, vr.grad)))
        t = max(r[4] for r in res)
        print(
            f"  W={W} ring over gloo:    {t * 1e3:8.1f} ms  {flops / W / t / 1e9:6.1f} GFLOP/s per rank"
            f"   max |error| vs one process (out, dq, dk, dv): {err:.2e}"
        )
    print("(this machine may have fewer cores than ranks; per-rank rates then share cores)")


if __name__ == "__main__":
    main()
