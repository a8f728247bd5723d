"""How many GPUs, for how long: `longview plan` as a renting decision for a V2PE job.

The planner's memory model says which layouts fit (`plan.recommend`); this module puts a
time on each. A step's compute is the planner's FLOP count priced at the rate one GPU
was *measured* to reach (BENCHMARKS.md, `benchmarks/gpu_all.py` on one H200): the
internvl2-2b training step at 128K tokens (18.24 s, activation checkpointing on every
layer) and its forward at 128K (4.30 s), each turned into a fraction of peak in the
planner's own counting (recomputation and the attention backward included), so the
planner's time for that measured shape is the measured time. To it are added the ring's
transfers that attention does not hide and the all-to-all (`plan.step_estimate`, at
the given link bandwidths), and the data-parallel gradient synchronisation. Decoding
(evaluation by generation) is priced at the measured milliseconds per token over a
KV-cache shard of the rank's size. These are estimates from one GPU's measurements and
a model of the links; no multi-GPU step has been measured yet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from ..spec import Budget, Hardware
from .model import V2PEModelConfig, model_config
from .plan import PlanError, RunShape, plan_for, recommend, step_estimate

# One H200 (989 TFLOP/s dense bf16), internvl2-2b, bf16 (BENCHMARKS.md):
MEASURED_TRAIN = (131072, 18.24)  # (tokens, seconds per training step)
MEASURED_FORWARD = (131072, 4.30)  # (tokens, seconds per forward, no graph)
MEASURED_DECODE_MS = ((8192, 20.21), (32768, 32.37), (131072, 36.97), (262144, 68.24))  # (cache tokens/rank, ms)
MEASURED_PEAK_TFLOPS = 989.0
MAX_ROWS = 6  # GPU counts shown: the smallest that fits and its doublings


def measured_efficiency(training: bool) -> float:
    """The fraction of peak the measured step reached, in the planner's FLOP counting."""
    seq, seconds = MEASURED_TRAIN if training else MEASURED_FORWARD
    shape = RunShape(seq_len=seq, tiles=0, training=training, sharding="none", activation_checkpointing=True,
                     supervised_fraction=1.0 if training else 0.01)
    flops = step_estimate(model_config("internvl2-2b"), shape, Hardware(tflops=1.0, efficiency=1.0))["flops_per_rank"]
    return flops / seconds / (MEASURED_PEAK_TFLOPS * 1e12)


def decode_ms(cache_tokens_per_rank: float) -> float:
    """Measured ms per generated token over a cache shard this size (linear between the
    measured sizes, the end values beyond them)."""
    pts = MEASURED_DECODE_MS
    if cache_tokens_per_rank <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if cache_tokens_per_rank <= x1:
            return y0 + (y1 - y0) * (cache_tokens_per_rank - x0) / (x1 - x0)
    return pts[-1][1] * cache_tokens_per_rank / pts[-1][0]  # past the last: the cache read grows with it


def _grad_sync_s(m: V2PEModelConfig, shape: RunShape, hw: Hardware) -> float:
    """Data-parallel gradient synchronisation per step, not overlapped (an upper bound):
    ZeRO's reduce-scatter and all-gather move about 3x the bf16 parameters' bytes
    (dp - 1)/dp; across nodes once the job spans more than one."""
    if not shape.training or shape.dp == 1:
        return 0.0
    from .plan import parameter_counts

    n = sum(parameter_counts(m).values())
    bw = hw.intra_node_gbps if shape.world <= hw.gpus_per_node else hw.inter_node_gbps
    return 3 * n * 2 * (shape.dp - 1) / shape.dp / (bw * 1e9)


def _row(m: V2PEModelConfig, shape: RunShape, hw: Hardware, gpus: int, samples: float | None,
         new_tokens: int, passes: int = 1) -> dict | None:
    """The recommended layout on `gpus` GPUs with its time per step and for the budget."""
    try:
        p = recommend(m, shape, replace(hw, gpus=gpus))
    except PlanError:
        return None
    return _timed(m, p, shape, hw, samples, new_tokens, passes)


def _timed(m, p, shape: RunShape, hw: Hardware, samples: float | None, new_tokens: int, passes: int = 1) -> dict:
    """passes: forward passes over the whole sample per step (2 with MM-NIAH's teacher-forced
    check beside the prefill)."""
    run = RunShape(**{**asdict(shape), "cp": p.cp, "cp_a2a": p.cp_a2a, "dp": p.dp})
    step_s = p.step["step_s"] * passes + _grad_sync_s(m, run, hw)
    if not shape.training:  # one sample: its prefill, then each new token over the rank's cache shard
        step_s += new_tokens * decode_ms(shape.seq_len / p.cp) / 1e3
    per_step = p.dp  # one sample per data-parallel replica per step (a packed row of seq_len tokens)
    row = {"gpus": p.gpus, "cp": p.cp, "cp_a2a": p.cp_a2a, "dp": p.dp, "memory_gib": p.memory_gib["total"],
           "fits": p.fits, "step_s": step_s, "tokens_per_s": shape.seq_len * per_step / step_s,
           "ring_hidden": p.step["ring_hidden"]}
    if samples:
        hours = math.ceil(samples / per_step) * step_s / 3600
        row.update(hours=hours, gpu_hours=hours * p.gpus)
    return row


def renting(m: V2PEModelConfig, shape: RunShape, hw: Hardware, budget: Budget, *, samples: int | None,
            gpus: int | None, new_tokens: int = 0, passes: int = 1) -> dict:
    """GPU counts from the smallest that fits, each with its layout, memory per GPU, step
    time, tokens/s, hours and GPU-hours for `samples` x budget.epochs; the recommendation
    at `gpus` (the count asked for) with the other layouts of that count beside it."""
    eff = measured_efficiency(shape.training)
    hw = replace(hw, tflops=MEASURED_PEAK_TFLOPS, efficiency=eff)
    total = samples * budget.epochs if samples else None
    out = {"efficiency": eff, "basis": "measured on one H200 (BENCHMARKS.md) + the ring's transfer model",
           "samples": samples, "epochs": budget.epochs, "rows": [], "smallest_gpus": None}
    try:
        smallest = recommend(m, shape, replace(hw, gpus=None))  # dp = 1: as few GPUs as fit
    except PlanError as e:
        out["error"] = str(e)
        return out
    out["smallest_gpus"] = smallest.gpus
    counts = [smallest.gpus * 2**k for k in range(MAX_ROWS)]
    if shape.training:
        counts = sorted({c for c in counts if c <= max(gpus or 0, smallest.gpus) * 4} | ({gpus} if gpus else set()))
    else:
        counts = counts[:3]  # one sample at a time: more GPUs only shorten the prefill
    for c in counts:
        row = _row(m, shape, hw, c, total, new_tokens, passes)
        if row:
            out["rows"].append(row)
    target = gpus if shape.training and gpus else smallest.gpus
    rec = next((r for r in out["rows"] if r["gpus"] == target), None)
    if rec:
        others = []
        for cp in (c for c in range(1, target + 1) if target % c == 0 and c > rec["cp"]):
            p = plan_for(m, RunShape(**{**asdict(shape), "cp": cp, "dp": target // cp, "cp_a2a": 1}), hw)
            if p.fits:
                others.append(_timed(m, p, shape, hw, total, new_tokens, passes))
        out["recommended"] = rec
        out["alternatives"] = others[:3]
    return out


def format_renting(part: str, r: dict) -> list[str]:
    """The renting table `longview plan` prints under a part (training or evaluation)."""
    if r.get("error"):
        return [f"  GPUs and hours: {r['error']}"]
    what = "step" if part == "training" else "sample"
    lines = [f"  GPUs and hours ({r['basis']}: compute at {100 * r['efficiency']:.1f} % of "
             f"{MEASURED_PEAK_TFLOPS:g} TFLOP/s in the planner's counting):"]
    budget = (f"{r['samples']} samples x {r['epochs']:g} epoch(s)" if r["samples"] else
              "pass --samples N (and --epochs) for hours")
    lines.append(f"    smallest that fits: {r['smallest_gpus']} GPUs; budget: {budget}")
    lines.append(f"    | GPUs | layout | GiB/GPU | s/{what} | tokens/s | hours | GPU-hours |")
    for row in r["rows"]:
        lines.append(f"    | {row['gpus']} | {_layout(row)} | {row['memory_gib']:.1f} | {row['step_s']:.2f} | "
                     f"{row['tokens_per_s']:,.0f} | {_h(row.get('hours'))} | {_h(row.get('gpu_hours'))} |")
    rec = r.get("recommended")
    if rec:
        why = (f"cp {rec['cp']} is the smallest context-parallel degree that fits: the least ring traffic per token "
               f"({'hidden under attention' if rec['ring_hidden'] else 'partly exposed'}) and the most tokens per "
               "rank (the ring's measured per-rank efficiency falls below 16K tokens per rank, which this estimate "
               "does not model)")
        if part == "training" and rec["dp"] > 1:
            why += f"; the other {rec['gpus'] - rec['cp']} GPUs are data-parallel replicas"
        lines.append(f"    recommended: {rec['gpus']} GPUs as {_layout(rec)}: {why}")
        for alt in r.get("alternatives", []):
            more = (alt["gpu_hours"] / rec["gpu_hours"] - 1) if rec.get("gpu_hours") else \
                (rec["tokens_per_s"] / alt["tokens_per_s"] - 1)
            lines.append(f"      vs {_layout(alt)}: {alt['step_s']:.2f} s/{what}, {alt['tokens_per_s']:,.0f} tokens/s "
                         f"({100 * more:+.0f} % {'GPU-hours' if rec.get('gpu_hours') else 'time per token'})")
    return lines


def _layout(row: dict) -> str:
    a2a = f" (a2a {row['cp_a2a']})" if row["cp_a2a"] > 1 else ""
    return f"cp {row['cp']}{a2a} x dp {row['dp']}"


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"
