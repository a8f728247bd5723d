"""One-GPU ring attention check and benchmark (one prepared run, prints a report).

    python benchmarks/ring_gpu.py [--totals 131072 262144] [--worlds 4 8 16 32] [--out report.json]

1. Checks: every CUDA block kernel against float64 attention (forward, LSE and
   backward, causal and full, GQA), and the simulated ring's forward against a single
   call on the whole sequence.
2. Single-call ceiling: one kernel call on the whole sequence (causal, bf16), TFLOP/s
   forward and forward+backward.
3. Simulated ring: one rank's exact block schedule for W ranks run on this GPU with no
   communication (`parallelism.ring_attention.simulated_ring_attention`): per-rank
   TFLOP/s = (causal FLOPs of the whole sequence / W) / time of one rank's schedule,
   and its ratio to the single-call ceiling at the same total length.

FLOPs count a multiply-add as 2; causal attention does half of the S^2 work; the
backward does 2.5x the forward's matmul FLOPs (so forward+backward = 3.5x).
Needs only torch: the GPU machine has no ray, deepspeed, mlflow or flash-attn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._measure import empty_cache
from parallelism.attention_kernels import KERNELS, resolve_kernel, supported_kernels
from parallelism.ring_attention import plan_step, simulated_ring_attention
from parallelism.zigzag import zigzag_shard, zigzag_unshard

H_Q, H_KV, D = 16, 8, 128


def causal_flops(S, H, Dh, causal=True):
    return 4 * S * S * H * Dh * (0.5 if causal else 1.0)


def timed(fn, reps=3, warmup=1, device="cuda"):
    """Best of `reps` wall times of fn() in seconds: CUDA events on a GPU, the clock on CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def rnd(S, h, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(1, S, h, D, device=device, dtype=dtype, generator=g)


def check_kernels(report, device="cuda", dtype=torch.bfloat16, S=512):
    """Each kernel's out, LSE and grads against float64 math on a small problem."""
    q, k, v, do = (rnd(S, h, dtype, seed, device) for h, seed in ((H_Q, 1), (H_KV, 2), (H_KV, 3), (H_Q, 4)))
    scale = D**-0.5
    # bf16 inputs: a few bf16 steps (2^-8 relative) of error on O(1) values; float32
    # kernels (CPU) agree with float64 to float32 rounding over S terms.
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    for name in supported_kernels(q.device, q.dtype, D):
        kern = KERNELS[name]
        for causal in (True, False):
            row = {"kernel": name, "causal": causal}
            try:
                q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
                rep = H_Q // H_KV
                s = torch.einsum("bqhd,bkhd->bhqk", q64, k64.repeat_interleave(rep, 2)) * scale
                if causal:
                    s = s.masked_fill(torch.ones(S, S, device=device, dtype=torch.bool).triu(1), float("-inf"))
                lse_ref = torch.logsumexp(s, -1)
                o_ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v64.repeat_interleave(rep, 2))
                o_ref.backward(do.double())
                out, lse = kern.forward(q, k, v, causal, scale)
                dq, dk, dv = kern.backward(do, q, k, v, out, lse, causal, scale)
                row.update(
                    out_err=(out.double() - o_ref).abs().max().item(),
                    lse_err=(lse.double() - lse_ref).abs().max().item(),
                    dq_err=(dq.double() - q64.grad).abs().max().item(),
                    dk_err=(dk.double() - k64.grad).abs().max().item(),
                    dv_err=(dv.double() - v64.grad).abs().max().item(),
                )
                row["ok"] = all(row[x] < tol for x in ("out_err", "lse_err", "dq_err", "dk_err", "dv_err"))
            except Exception as e:  # noqa: BLE001 - a report line, not a crash
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            report["checks"].append(row)
            print("check", row, flush=True)


def check_simulated_ring(report, kernel, device="cuda", dtype=torch.bfloat16, S=8192, W=4):
    q, k, v = (rnd(S, h, dtype, seed, device) for h, seed in ((H_Q, 5), (H_KV, 6), (H_KV, 7)))
    full = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    kv = [(zigzag_shard(k, W, r), zigzag_shard(v, W, r)) for r in range(W)]
    with torch.no_grad():
        outs = [simulated_ring_attention(zigzag_shard(q, W, r), kv, r, kernel=kernel) for r in range(W)]
    err = (zigzag_unshard(outs).float() - full.float()).abs().max().item()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 output rounding; float32 summation order
    row = {"kernel": kernel, "check": f"simulated ring W={W} S={S} vs one SDPA call", "max_err": err, "ok": err < tol}
    report["checks"].append(row)
    print("check", row, flush=True)


def single_call(report, kernel, S, device="cuda", dtype=torch.bfloat16):
    q, k, v, do = (rnd(S, h, dtype, 0, device) for h in (H_Q, H_KV, H_KV, H_Q))
    kern, scale = KERNELS[kernel], D**-0.5
    state = {}

    def fwd():
        state["o"], state["l"] = kern.forward(q, k, v, True, scale)

    def fwd_bwd():
        fwd()
        kern.backward(do, q, k, v, state["o"], state["l"], True, scale)

    f = causal_flops(S, H_Q, D)
    tf, tfb = timed(fwd, device=device), timed(fwd_bwd, device=device)
    row = {"kernel": kernel, "S": S, "fwd_tflops": f / tf / 1e12, "fwdbwd_tflops": 3.5 * f / tfb / 1e12}
    report["single"].append(row)
    print("single", row, flush=True)
    del q, k, v, do, state
    empty_cache(device)
    return row


def peer_forward(q, kv_by_rank, rank, *, kernel, causal=True):
    """The same rank's ring schedule with the plain per-block merge of ring-flash-attn:
    each block's (o_b, lse_b) is folded in as soon as it is computed,
        out <- out - sigmoid(lse_b - lse) * (out - o_b),  lse <- lse - logsigmoid(lse - lse_b)
    (its `update_out_and_lse`): several element-wise passes over the rows' output per
    block, where longview merges pending blocks in one multi-way pass
    (`ring_attention._Merger`). Forward only; out in float32."""
    W = len(kv_by_rank)
    blk = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
    scale = q.shape[-1] ** -0.5
    B, S_local, H, Dh = q.shape
    out = torch.zeros(B, S_local, H, Dh, dtype=torch.float32, device=q.device)
    lse = torch.zeros(B, S_local, H, 1, dtype=torch.float32, device=q.device)
    seen = torch.zeros(S_local, dtype=torch.bool)  # rows that hold a block already (first one is copied)
    with torch.no_grad():
        for step in range(W):
            src = (rank - step) % W
            k, v = kv_by_rank[src]
            for b in plan_step(rank, src, causal, [(0, S_local)]):
                o_b, lse_b = blk.forward(q[:, b.q0 : b.q0 + b.nq], k[:, b.k0 : b.k0 + b.nk],
                                         v[:, b.k0 : b.k0 + b.nk], b.causal, scale)
                lse_b = lse_b.transpose(1, 2).unsqueeze(-1)  # (B, H, n) -> (B, n, H, 1)
                o, l = out[:, b.q0 : b.q0 + b.nq], lse[:, b.q0 : b.q0 + b.nq]
                if not seen[b.q0 : b.q0 + b.nq].any():
                    o.copy_(o_b)
                    l.copy_(lse_b)
                    seen[b.q0 : b.q0 + b.nq] = True
                    continue
                o.sub_(torch.sigmoid(lse_b - l) * (o - o_b.float()))
                l.sub_(F.logsigmoid(l - lse_b))
    return out


def simulated(report, kernel, S, W, ceiling, device="cuda", dtype=torch.bfloat16):
    S_local = S // W
    # One rank's inputs; the other ranks' K/V shards only need the right shapes.
    q = rnd(S_local, H_Q, dtype, 0, device).requires_grad_(True)
    kv = [(rnd(S_local, H_KV, dtype, r + 10, device).requires_grad_(True), rnd(S_local, H_KV, dtype, r + 50, device))
          for r in range(W)]
    do = rnd(S_local, H_Q, dtype, 99, device)
    rank = 0  # every rank does the same work under zigzag

    def fwd():
        with torch.no_grad():
            return simulated_ring_attention(q, kv, rank, kernel=kernel)

    def fwd_bwd():
        simulated_ring_attention(q, kv, rank, kernel=kernel).backward(do)

    def peer():
        return peer_forward(q.detach(), [(k.detach(), v) for k, v in kv], rank, kernel=kernel)

    # The peer computes the same numbers: a wrong peer would make its timing meaningless.
    peer_err = (peer().to(q.dtype).float() - fwd().float()).abs().max().item()
    f = causal_flops(S, H_Q, D) / W
    tf, tfb, tp = timed(fwd, device=device), timed(fwd_bwd, device=device), timed(peer, device=device)
    row = {
        "kernel": kernel, "S": S, "W": W, "S_local": S_local,
        "fwd_tflops_per_rank": f / tf / 1e12,
        "fwdbwd_tflops_per_rank": 3.5 * f / tfb / 1e12,
        "peer_fwd_tflops_per_rank": f / tp / 1e12,
        "peer_max_err": peer_err,
    }
    row["fwd_vs_single"] = row["fwd_tflops_per_rank"] / ceiling["fwd_tflops"]
    row["fwdbwd_vs_single"] = row["fwdbwd_tflops_per_rank"] / ceiling["fwdbwd_tflops"]
    row["fwd_vs_peer"] = tp / tf  # > 1: longview's forward is faster than the per-block merge
    report["simulated"].append(row)
    print("simulated", row, flush=True)
    del q, kv, do
    empty_cache(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--totals", type=int, nargs="+", default=[131072, 262144])
    ap.add_argument("--worlds", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--kernels", nargs="+", default=None, help="default: every supported CUDA kernel")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"H_q": H_Q, "H_kv": H_KV, "D": D, "dtype": "bf16", "causal": True},
        "checks": [], "single": [], "simulated": [],
    }
    print(report["device"], report["torch"], flush=True)
    t0 = time.time()
    check_kernels(report)
    kernels = args.kernels or [k for k in supported_kernels(torch.device("cuda"), torch.bfloat16, D)]
    for kern in kernels:
        check_simulated_ring(report, kern)
    for kern in kernels:
        for S in args.totals:
            ceiling = single_call(report, kern, S)
            for W in args.worlds:
                simulated(report, kern, S, W, ceiling)
    report["wall_s"] = time.time() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report["simulated"], indent=1))


if __name__ == "__main__":
    main()
