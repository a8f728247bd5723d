"""Generation on one GPU, per rank of a context-parallel group (`gpu_all.py`'s generate part).

- prefill: one attention layer's ring forward for one rank (the simulated schedule of
  `ring_gpu.simulated`, forward only, no graph) at total lengths up to 1M over W ranks;
  seconds per layer, and the prefill's attention for internvl2-2b's 24 layers;
- decode: internvl2-2b's whole decoder for one new token over a KV-cache shard of
  S_local tokens per layer (random K/V, the rank's share of a long prompt): ms per
  token. On one GPU there is no group, so the two all-reduces of the log-sum-exp merge
  (a few KB each) are not in the figure.

Each function's tensors go when it returns; the caller empties the allocator's cache.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ring_gpu import H_KV, H_Q, D, causal_flops, rnd, timed
from parallelism.ring_attention import simulated_ring_attention


def prefill(report: dict, S: int, W: int, *, kernel: str = "auto", layers: int = 24, device="cuda",
            dtype=torch.bfloat16) -> None:
    S_local = S // W
    q = rnd(S_local, H_Q, dtype, 0, device)
    kv = [(rnd(S_local, H_KV, dtype, r + 10, device), rnd(S_local, H_KV, dtype, r + 50, device)) for r in range(W)]

    def fwd():
        with torch.no_grad():
            simulated_ring_attention(q, kv, 0, kernel=kernel)

    t = timed(fwd, reps=2, device=device)
    row = {"S": S, "W": W, "S_local": S_local, "layer_s": t, "prefill_attention_s": layers * t,
           "tflops_per_rank": causal_flops(S, H_Q, D) / W / t / 1e12}
    report["prefill"].append(row)
    print("prefill", row, flush=True)


def decode(report: dict, size: str, S_local: int, *, device="cuda", dtype=torch.bfloat16) -> None:
    from workloads.v2pe.model import AttentionSpec, KVCache, V2PEModel, model_config

    torch.manual_seed(0)
    model = V2PEModel(model_config(size)).to(device, dtype).eval()
    llm = model.cfg.llm
    cache = KVCache(llm.num_layers, room=64)
    g = torch.Generator(device=device).manual_seed(0)
    for i in range(llm.num_layers):
        shape = (1, S_local, llm.num_kv_heads, llm.head_dim)
        cache.add(i, torch.randn(shape, generator=g, device=device, dtype=dtype),
                  torch.randn(shape, generator=g, device=device, dtype=dtype))
    cache.append = False  # every timed token reads the same cache
    ids = torch.tensor([[1]], device=device)
    pos = torch.tensor([[float(S_local)]], dtype=torch.float64, device=device)
    empty = torch.zeros(0, llm.hidden_size, device=device, dtype=dtype)
    spec = AttentionSpec(cache=cache, decode=True)

    def step():
        with torch.no_grad():
            h = model.forward_hidden(ids, pos, empty, torch.full_like(ids, -1), spec)
            model.decoder.lm_head(h[0, -1]).argmax()

    t = timed(step, reps=5, warmup=2, device=device)
    cache_gib = sum(k.numel() * k.element_size() * 2 for k in cache.k) / 2**30
    row = {"size": size, "S_local": S_local, "ms_per_token": 1e3 * t, "cache_gib": cache_gib}
    report["decode"].append(row)
    print("decode", row, flush=True)


def main(argv=None) -> int:
    """python benchmarks/generate_gpu.py [--prefill S:W ...] [--decode S_local ...] [--size internvl2-2b]"""
    import argparse
    import json

    from benchmarks._measure import empty_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", nargs="*", default=["131072:8", "1048576:16"], help="total:W pairs")
    ap.add_argument("--decode", nargs="*", type=int, default=[32768, 131072], help="cache tokens per rank")
    ap.add_argument("--size", default="internvl2-2b")
    a = ap.parse_args(argv)
    report: dict = {"prefill": [], "decode": []}
    for pair in a.prefill:
        S, W = map(int, pair.split(":"))
        prefill(report, S, W)
        empty_cache("cuda")
    for S_local in a.decode:
        decode(report, a.size, S_local)
        empty_cache("cuda")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
