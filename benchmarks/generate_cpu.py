"""CPU benchmark of greedy generation under context parallelism (`workloads.v2pe.generate`).

    python benchmarks/generate_cpu.py precision [--tokens 4096] [--worlds 1 2 4 8]
    python benchmarks/generate_cpu.py speed [--tokens 16384 65536] [--worlds 1 2 4] [--new 32]

precision: the prompt's logits in bfloat16 over W gloo ranks (ring prefill) against the
    same model in float64 on one process; max and mean absolute error per W. A ring
    whose merge lost precision with every step would show errors growing with W.
speed: per rank, prefill seconds, decode milliseconds per new token (the tokens after
    the first; stop tokens are switched off so every answer has --new tokens), and the
    peak of live tensor bytes during prefill alone and during prefill + decoding
    (`workloads.memory`, in a second run: tracking slows every operation), for the tiny
    model (float32) at the given prompt lengths; one thread per rank.

The prompt: text with one 448-pixel image (256 visual tokens) per 4096 tokens, V2PE
positions with δ = 1/4. Each W runs in a fresh set of processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallelism.local_world import LocalWorld
from workloads.v2pe.data import EncodedSample
from workloads.v2pe.generate import EOS, generate
from workloads.v2pe.model import V2PEModel, model_config
from workloads.v2pe.tokenizer import IM_END, ByteTokenizer

TOK = ByteTokenizer()
STRIDE = 64


class NoStop(ByteTokenizer):
    """Stop tokens on ids the model cannot produce: every answer runs to --new tokens."""

    def token_id(self, token):
        return -1 if token in (IM_END, EOS) else super().token_id(token)


def prompt(tokens: int, *, tile: int = 448, tokens_per_tile: int = 256, every: int = 4096, seed: int = 0):
    """A prompt of `tokens` tokens: random text bytes, one single-tile image per `every`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(32, 127, (tokens,), generator=g)
    ids[0] = TOK.bos_id
    images = 0
    for start in range(every // 2, tokens - tokens_per_tile - 2, every):
        ids[start] = TOK.img_start_id
        ids[start + 1: start + 1 + tokens_per_tile] = TOK.img_context_id
        ids[start + 1 + tokens_per_tile] = TOK.img_end_id
        images += 1
    pixels = torch.rand(images, 3, tile, tile, generator=g)
    return EncodedSample(sample_id=f"prompt-{tokens}", input_ids=ids, targets=torch.full_like(ids, -100),
                         pixels=pixels)


def _model(dtype):
    torch.manual_seed(0)
    return V2PEModel(model_config("tiny")).to(dtype).eval()


def _rank_logits(p, dtype_name):
    torch.set_num_threads(1)
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    g = generate(_model(getattr(torch, dtype_name)), p, tokenizer=TOK, mode="v2pe_fix", stride=STRIDE,
                 max_new_tokens=1, cp_group=group, return_prompt_logits=True)
    return g.prompt_logits if dist.get_rank() == 0 else None


def precision(tokens: int, worlds: list[int]) -> list[dict]:
    p = prompt(tokens)
    ref = generate(_model(torch.float64), p, tokenizer=TOK, mode="v2pe_fix", stride=STRIDE, max_new_tokens=1,
                   return_prompt_logits=True).prompt_logits
    rows = []
    for W in worlds:
        with LocalWorld(W, timeout_s=600) as world:
            got = world.run(_rank_logits, p, "bfloat16")[0]
        err = (got.double() - ref).abs()
        rows.append({"W": W, "tokens": tokens, "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                     "max_abs_logit": float(ref.abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _rank_speed(p, new):
    from benchmarks._measure import peak_tensor_bytes

    torch.set_num_threads(1)
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    model = _model(torch.float32)
    cpu = torch.device("cpu")
    out = {}

    def prefill_only():
        generate(model, p, tokenizer=NoStop(), mode="v2pe_fix", stride=STRIDE, max_new_tokens=1, cp_group=group)

    def with_decode():
        g = generate(model, p, tokenizer=NoStop(), mode="v2pe_fix", stride=STRIDE, max_new_tokens=new,
                     cp_group=group)
        out.update(prefill_s=g.prefill_s, new=len(g.tokens),
                   decode_ms_per_token=1e3 * g.decode_s / max(len(g.tokens) - 1, 1))

    with_decode()  # timed alone: the memory tracker below slows every operation
    timed = dict(out)
    out["prefill_peak_mib"] = peak_tensor_bytes(cpu, prefill_only, tracked=list(model.parameters())) / 2**20
    out["peak_mib"] = peak_tensor_bytes(cpu, with_decode, tracked=list(model.parameters())) / 2**20
    return {**out, **timed}


def speed(lengths: list[int], worlds: list[int], new: int) -> list[dict]:
    rows = []
    for n in lengths:
        p = prompt(n)
        for W in worlds:
            with LocalWorld(W, timeout_s=1800) as world:
                per_rank = world.run(_rank_speed, p, new)
            rows.append({"tokens": n, "W": W, "S_local": n // W, "new_tokens": per_rank[0]["new"],
                         "prefill_s": max(r["prefill_s"] for r in per_rank),
                         "decode_ms_per_token": max(r["decode_ms_per_token"] for r in per_rank),
                         "prefill_peak_mib": max(r["prefill_peak_mib"] for r in per_rank),
                         "peak_mib": max(r["peak_mib"] for r in per_rank)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("precision", "speed"))
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--worlds", type=int, nargs="+", default=None)
    ap.add_argument("--new", type=int, default=32, help="new tokens per answer (speed)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.part == "precision":
        rows = precision((a.tokens or [4096])[0], a.worlds or [1, 2, 4, 8])
        print("\n| W | tokens | max abs error | mean abs error | max abs logit |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['W']} | {r['tokens']} | {r['max_abs_err']:.2e} | {r['mean_abs_err']:.2e} | "
                  f"{r['max_abs_logit']:.2f} |")
    else:
        rows = speed(a.tokens or [16384, 65536], a.worlds or [1, 2, 4], a.new)
        print("\n| tokens | W | S_local | prefill s | decode ms/token | prefill peak MiB/rank | peak MiB/rank |"
              "\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['W']} | {r['S_local']} | {r['prefill_s']:.2f} | "
                  f"{r['decode_ms_per_token']:.1f} | {r['prefill_peak_mib']:.1f} | {r['peak_mib']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
