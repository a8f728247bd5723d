"""Every GPU figure longview reports, from one command.

    python benchmarks/gpu_all.py --out gpu_all.json   # one H100/H200: at most 8.5 minutes (its parts' budgets)
    python benchmarks/gpu_all.py --smoke              # CPU, tiny sizes, seconds (`make test` runs it)

Parts, in order, each in a child process with its own time budget, so a part that hangs
or runs long costs only its budget and the rest still run (a part's rows measured before
its budget ran out are kept):

1. kernels   each block kernel's output, log-sum-exp and gradients against float64
             attention; the simulated ring against one SDPA call; the V2PE model's
             loss and gradients on the device against its CPU result (small size).
2. ring      per-rank TFLOP/s of the simulated ring (forward, forward+backward) against
             one kernel call on the whole sequence, and against the peer: the same
             schedule with ring-flash-attn's per-block merge (`ring_gpu.peer_forward`).
3. capacity  internvl2-2b training steps at growing lengths: tokens/s, MFU, peak
             memory, the planner's prediction and its error.
4. eval_1m   forward-only peak memory at 1M tokens on one GPU for the tiny model; for
             internvl2-2b (minutes of attention at 1M) at 32K-128K, and the per-GPU
             memory at 1M over W ranks from a line through them.
5. generate  answering by generation (`benchmarks/generate_gpu.py`): one rank's ring
             prefill attention at 128K-1M over W ranks (simulated), and internvl2-2b's
             per-token decode over a KV-cache shard of 8K-256K tokens.

The smoke mode runs the same functions on CPU at tiny sizes, in float32 (the CPU kernels'
dtype): the numbers mean nothing, the code paths keep working. What cannot run on CPU
says so in its row ("note"). It writes one JSON and prints the tables in BENCHMARKS.md's
layout. Needs only torch (the GPU machine has no ray, mlflow or flash-attn).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of one mode (GPU or smoke)."""

    kernel_check_S: int
    ring_check_S: int
    ring_totals: tuple[int, ...]
    ring_worlds: tuple[int, ...]
    model_check_S: int
    capacity_size: str
    capacity_lengths: tuple[int, ...]
    # (model, lengths) of forward-only evaluation runs; where the longest is under 1M,
    # a line through the measured peaks gives the per-GPU memory at 1M over W ranks.
    eval_runs: tuple[tuple[str, tuple[int, ...]], ...]
    # Generation: (total, W) of the prefill rows; the decode rows' model and cache shards.
    prefill_runs: tuple[tuple[int, int], ...] = ()
    decode_size: str = "tiny"
    decode_locals: tuple[int, ...] = ()


GPU = Sizes(kernel_check_S=512, ring_check_S=8192, ring_totals=(131072, 262144), ring_worlds=(4, 8, 16, 32),
            model_check_S=2048, capacity_size="internvl2-2b",
            capacity_lengths=(16384, 32768, 65536, 131072, 262144),
            # internvl2-2b's forward at 1M is ~100 PFLOP of attention (minutes): measured at
            # 32K-128K and extrapolated; the tiny model runs 1M itself, last (packing 1M
            # tokens on the CPU is the slow unknown of the part).
            eval_runs=(("internvl2-2b", (32768, 65536, 131072)), ("tiny", (2**20,))),
            prefill_runs=((131072, 8), (262144, 8), (524288, 16), (1048576, 16), (1048576, 32)),
            decode_size="internvl2-2b", decode_locals=(8192, 32768, 131072, 262144))
SMOKE = Sizes(kernel_check_S=64, ring_check_S=256, ring_totals=(512,), ring_worlds=(2, 4), model_check_S=1024,
              capacity_size="tiny", capacity_lengths=(512, 1024), eval_runs=(("tiny", (1024, 2048)),),
              prefill_runs=((512, 2), (1024, 4)), decode_size="tiny", decode_locals=(256, 1024))
# Seconds per part on a GPU (8 minutes in all); the smoke run's parts take seconds.
# Set from the H200 run of 2026-12-04 (kernels 16 s, ring 131 s, eval_1m 30 s; capacity
# reached 128K in 150 s, and 256K's step alone is about a minute): 8.5 minutes in all.
BUDGETS = {"kernels": 30, "ring": 145, "capacity": 210, "eval_1m": 45, "generate": 80}
SMOKE_BUDGET_S = 120


class _Rows(list):
    """A list of result rows that also writes each row, as it comes, to the part's file,
    so the rows of a part stopped at its budget are not lost."""

    def __init__(self, path: str, section: str):
        super().__init__()
        self.path, self.section = path, section

    def append(self, row) -> None:
        super().append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps({"section": self.section, "row": row}, default=str) + "\n")


def _device(smoke: bool) -> tuple[torch.device, torch.dtype]:
    if smoke:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("gpu_all: no CUDA device (use --smoke for the CPU run)")
    return torch.device("cuda"), torch.bfloat16


def part_kernels(out: dict, sizes: Sizes, smoke: bool) -> None:
    from benchmarks.ring_gpu import D, check_kernels, check_simulated_ring
    from parallelism.attention_kernels import supported_kernels

    device, dtype = _device(smoke)
    check_kernels(out, device=device, dtype=dtype, S=sizes.kernel_check_S)
    for kern in supported_kernels(device, dtype, D):
        check_simulated_ring(out, kern, device=device, dtype=dtype, S=sizes.ring_check_S)
    out["checks"].append(model_check(device, sizes.model_check_S))


def model_check(device: torch.device, S: int) -> dict:
    """The tiny V2PE model's loss and gradients on `device` against the same step on CPU,
    both in float32 (TF32 off): the model's CUDA path agrees with the tested CPU path."""
    from benchmarks.v2pe_gpu import _batch
    from workloads.v2pe.model import V2PEModel, model_config
    from workloads.v2pe.train import TrainStepConfig, forward_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = TrainStepConfig(activation_checkpointing=False)
    results = {}
    for dev in (torch.device("cpu"), device):
        torch.manual_seed(0)
        model = V2PEModel(model_config("tiny")).to(dev)
        batch = _batch(S, model, dev, torch.float32, every=S // 2)
        loss, _ = forward_loss(model, batch, cfg=cfg)
        loss.backward()
        results[dev.type] = (loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                                           if p.grad is not None})
    (ref_loss, ref), (loss, got) = results["cpu"], results[device.type]
    # Relative error of each parameter's gradient; float32 with other summation orders
    # (cuBLAS, fused kernels) stays near 1e-5, a wrong path is off by O(1).
    worst = max(float((got[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref.items())
    row = {"check": f"V2PE tiny model, {S} tokens, {device.type} vs cpu", "loss_err": abs(loss - ref_loss),
           "grad_rel_err": worst, "ok": abs(loss - ref_loss) < 1e-4 * max(1.0, abs(ref_loss)) and worst < 1e-3}
    if device.type == "cpu":
        row["note"] = "no GPU: CPU against CPU (runs the code path; the comparison needs CUDA)"
    print("check", row, flush=True)
    return row


def part_ring(out: dict, sizes: Sizes, smoke: bool) -> None:
    from benchmarks.ring_gpu import D, simulated, single_call
    from parallelism.attention_kernels import supported_kernels

    device, dtype = _device(smoke)
    peer = _ring_flash_attn()
    out["peer"].append({"peer": "per-block merge (ring-flash-attn's update_out_and_lse formula, same kernels)",
                        "ring_flash_attn": peer})
    for kern in supported_kernels(device, dtype, D):
        for S in sizes.ring_totals:
            ceiling = single_call(out, kern, S, device=device, dtype=dtype)
            for W in sizes.ring_worlds:
                simulated(out, kern, S, W, ceiling, device=device, dtype=dtype)


def _ring_flash_attn() -> str:
    """Whether ring-flash-attn itself can run here, and why its own function is not timed
    on one GPU: `zigzag_ring_flash_attn_func` exchanges K/V over a process group of W
    ranks; the simulated schedule is the same work without the group."""
    try:
        import ring_flash_attn  # noqa: F401
    except ImportError:
        return "not installed here: the peer is timed with longview's kernels"
    return ("installed; its ring needs W processes on W GPUs: `torchrun --nproc-per-node W benchmarks/ring_nccl.py "
            "--kernels auto ring_flash_attn` puts its row beside longview's")


def part_capacity(out: dict, sizes: Sizes, smoke: bool) -> None:
    from benchmarks.v2pe_gpu import capacity

    device, _ = _device(smoke)
    report: dict = {"train": out["train"], "eval": out["eval"]}
    # Forward-only rows come from eval_1m, in a fresh process: here they would carry the
    # optimizer state (the H200 run of 2026-12-04 read 13.4 GiB at 16K here, 6.2 at 32K there).
    capacity(report, size=sizes.capacity_size, lengths=list(sizes.capacity_lengths), device=device,
             every=_every(smoke), evals=False)
    out["notes"].append({k: v for k, v in report.items() if k not in ("train", "eval")})
    if smoke:
        out["notes"].append({"note": "CPU: peak is live tensor bytes, MFU is against a GPU's peak (meaningless)"})


def _every(smoke: bool) -> int:
    # One single-tile image per `every` tokens (the tiny model's 448-pixel tile is 256 tokens).
    return 512 if smoke else 4096


def part_eval_1m(out: dict, sizes: Sizes, smoke: bool) -> None:
    from benchmarks._measure import empty_cache
    from benchmarks.v2pe_gpu import _batch, forward_peak, memory_models
    from workloads.v2pe.model import V2PEModel, model_config
    from workloads.v2pe.plan import RunShape

    device, dtype = _device(smoke)
    for size, lengths in sizes.eval_runs:
        torch.manual_seed(0)
        model = V2PEModel(model_config(size)).to(device, dtype).eval()
        rows = []
        for S in lengths:
            batch = _batch(S, model, device, dtype, _every(smoke))
            shape = RunShape(seq_len=S, tiles=batch.num_tiles, sharding="none", bf16=dtype == torch.bfloat16,
                             training=False)
            row = {"size": size, **forward_peak(model, batch, shape, device)}
            rows.append(row)
            out["eval"].append(row)
            print("eval", row, flush=True)
            del batch
            if row.get("oom"):
                break
        fitted = memory_models([], rows).get("eval_memory_model")
        if fitted and max(lengths) < 2**20:
            out["extrapolated"].append({"size": size, **fitted})
        del model
        empty_cache(device)


def part_generate(out: dict, sizes: Sizes, smoke: bool) -> None:
    from benchmarks._measure import empty_cache
    from benchmarks.generate_gpu import decode, prefill

    device, dtype = _device(smoke)
    for S, W in sizes.prefill_runs:
        prefill(out, S, W, device=device, dtype=dtype)
        empty_cache(device)
    for S_local in sizes.decode_locals:
        decode(out, sizes.decode_size, S_local, device=device, dtype=dtype)
        empty_cache(device)


PARTS = {"kernels": part_kernels, "ring": part_ring, "capacity": part_capacity, "eval_1m": part_eval_1m,
         "generate": part_generate}
SECTIONS = {"kernels": ("checks",), "ring": ("peer", "single", "simulated"), "capacity": ("train", "eval", "notes"),
            "eval_1m": ("eval", "extrapolated"), "generate": ("prefill", "decode")}


def run_part(name: str, smoke: bool, rows_path: str) -> None:
    """In the child: run one part, writing its rows to rows_path as they come."""
    out = {section: _Rows(rows_path, section) for section in SECTIONS[name]}
    PARTS[name](out, SMOKE if smoke else GPU, smoke)


def _read_rows(path: str, name: str) -> dict:
    got = {section: [] for section in SECTIONS[name]}
    if os.path.exists(path):
        for line in open(path):
            rec = json.loads(line)
            got[rec["section"]].append(rec["row"])
    return got


def run_all(smoke: bool, parts: list[str], budgets: dict[str, float]) -> dict:
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if not smoke and torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "smoke": smoke, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            path = os.path.join(tmp, f"{name}.jsonl")
            budget = budgets.get(name, SMOKE_BUDGET_S if smoke else BUDGETS[name])
            cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--rows", path] + (["--smoke"] * smoke)
            t0 = time.monotonic()
            print(f"== {name} (budget {budget:.0f} s)", flush=True)
            try:
                proc = subprocess.run(cmd, timeout=budget, capture_output=True, text=True)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
            except subprocess.TimeoutExpired:
                status, tail = f"stopped at its budget of {budget:.0f} s", []
            result = {"status": status, "wall_s": round(time.monotonic() - t0, 1), **_read_rows(path, name)}
            if tail:
                result["error"] = tail[0][-500:]
            failed = [r for r in result.get("checks", []) if not r.get("ok", True)]
            if failed and status == "ok":
                result["status"] = f"{len(failed)} check(s) failed"
            report["parts"][name] = result
            print(f"   {name}: {result['status']} in {result['wall_s']} s", flush=True)
    return report


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _f(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def tables(report: dict) -> str:
    """The report as markdown tables, in BENCHMARKS.md's layout."""
    lines = [f"Device: {report['device']}, torch {report['torch']}, {report['date']}"
             + (" (smoke run on CPU: the figures mean nothing)" if report["smoke"] else ""), ""]
    for name, part in report["parts"].items():
        lines.append(f"{name}: {part['status']} ({part['wall_s']} s)" + (f": {part['error']}" if "error" in part else ""))
    parts = report["parts"]
    checks = parts.get("kernels", {}).get("checks", [])
    if checks:
        lines += ["", "| check | max error | ok |", "|---|---|---|"]
        for r in checks:
            if "kernel" in r and "out_err" in r:
                what = f"{r['kernel']} {'causal' if r['causal'] else 'full'}: out, lse, dq, dk, dv vs float64"
                err = max(r[k] for k in ("out_err", "lse_err", "dq_err", "dk_err", "dv_err"))
            elif "kernel" in r and "max_err" in r:
                what, err = f"{r['kernel']}: {r['check']}", r["max_err"]
            elif "grad_rel_err" in r:
                what, err = r["check"] + (f" ({r['note']})" if "note" in r else ""), max(r["loss_err"], r["grad_rel_err"])
            else:
                what, err = f"{r.get('kernel', '?')}: {r.get('error', '?')}", None
            lines.append(f"| {what} | {_f(err, '.1e')} | {'yes' if r.get('ok') else 'NO'} |")
    ring = parts.get("ring", {})
    if ring.get("simulated"):
        single = {(r["kernel"], r["S"]): r for r in ring["single"]}
        lines += ["", "| kernel | S | W | S_local | single fwd | fwd/rank | vs single | single f+b | f+b/rank | vs single "
                  "| peer fwd/rank | longview / peer |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ring["simulated"]:
            c = single[(r["kernel"], r["S"])]
            lines.append(f"| {r['kernel']} | {_tokens(r['S'])} | {r['W']} | {_tokens(r['S_local'])} | "
                         f"{_f(c['fwd_tflops'], '.0f')} | "
                         f"{_f(r['fwd_tflops_per_rank'], '.0f')} | {_f(100 * r['fwd_vs_single'], '.0f')}% | "
                         f"{_f(c['fwdbwd_tflops'], '.0f')} | {_f(r['fwdbwd_tflops_per_rank'], '.0f')} | "
                         f"{_f(100 * r['fwdbwd_vs_single'], '.0f')}% | {_f(r['peer_fwd_tflops_per_rank'], '.0f')} | "
                         f"{_f(r['fwd_vs_peer'])}x |")
        lines.append("(TFLOP/s; peer: " + "; ".join(p["peer"] + ", ring-flash-attn " + p["ring_flash_attn"]
                                                     for p in ring["peer"]) + ")")
    cap = parts.get("capacity", {})
    if cap.get("train"):
        lines += ["", "| run | S | step s | tokens/s | MFU | peak GiB | planned GiB | plan error |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind in ("train", "eval"):
            for r in cap[kind]:
                if r.get("oom"):
                    lines.append(f"| {kind} | {r['S']} | out of memory | | | | {_f(r['predicted_gib'], '.1f')} | |")
                    continue
                lines.append(f"| {kind} | {r['S']} | {_f(r.get('step_s', r.get('forward_s')))} | "
                             f"{_f(r.get('tokens_per_s'), '.0f')} | {_f(r.get('mfu') and 100 * r['mfu'], '.1f')}"
                             f"{'%' if r.get('mfu') else ''} | {_f(r['peak_gib'])} | {_f(r['predicted_gib'])} | "
                             f"{_f(100 * r['plan_error'], '+.0f')}% |")
    ev = parts.get("eval_1m", {})
    if ev.get("eval"):
        lines += ["", "| model | S | forward s | peak GiB | planned GiB | plan error |", "|---|---|---|---|---|---|"]
        for r in ev["eval"]:
            peak = "out of memory" if r.get("oom") else _f(r["peak_gib"])
            err = "" if r.get("oom") else f"{_f(100 * r['plan_error'], '+.0f')}%"
            lines.append(f"| {r['size']} | {r['S']} | {_f(r.get('forward_s'))} | {peak} | {_f(r['predicted_gib'])} "
                         f"| {err} |")
        for r in ev.get("extrapolated", []):
            per = ", ".join(f"{w} GPUs {r[f'1m_on_{w}_gpus_gib']:.1f}" for w in (1, 4, 8, 16, 32))
            lines.append(f"{r['size']}: 1M tokens from a line through {_tokens(r['longest_evaluated'])} and below: "
                         f"{per} GiB per GPU")
    gen = parts.get("generate", {})
    if gen.get("prefill"):
        lines += ["", "| prefill S | W | S_local | one layer s/rank | 24 layers s/rank | TFLOP/s per rank |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {_tokens(r['S'])} | {r['W']} | {_tokens(r['S_local'])} | {_f(r['layer_s'], '.3f')} | "
                  f"{_f(r['prefill_attention_s'], '.2f')} | {_f(r['tflops_per_rank'], '.0f')} |" for r in gen["prefill"]]
    if gen.get("decode"):
        lines += ["", "| decode model | cache tokens per rank | ms per token | cache GiB |", "|---|---|---|---|"]
        lines += [f"| {r['size']} | {_tokens(r['S_local'])} | {_f(r['ms_per_token'], '.2f')} | "
                  f"{_f(r['cache_gib'], '.2f')} |" for r in gen["decode"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths in seconds")
    ap.add_argument("--out", default=None, help="the JSON report")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                    help="another time budget for a part (repeatable)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # the child's side
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        run_part(args.part, args.smoke, args.rows)
        return 0
    budgets = {}
    for spec in args.budget:
        name, _, secs = spec.partition("=")
        if name not in PARTS or not secs.replace(".", "", 1).isdigit():
            ap.error(f"--budget {spec!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(secs)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --smoke for the CPU run")
    report = run_all(args.smoke, args.parts, budgets)
    print(tables(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
