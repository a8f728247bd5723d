"""Memory, compute and communication estimates for a V2PE run, and a layout recommendation.

Everything here is arithmetic on the model's dimensions, so `longview plan` answers on
a laptop. The activation counts follow the tensors this code base's modules actually
keep for the backward (not a generic transformer rule of thumb); the estimates are
checked against measured peaks by `benchmarks/plan_vs_measured.py` (BENCHMARKS.md).

Per GPU, training (bytes; T = tokens per rank = sequence / cp, a = activation bytes):
- model states: parameters, gradients and AdamW states under the ZeRO stage, sharded
  over all ranks (every rank is in DeepSpeed's data-parallel world);
- decoder activations: with checkpointing one (T, C) input per layer plus one layer's
  saved tensors while it is recomputed; without it, every layer's saved tensors;
- loss: float32 logits of one cross-entropy chunk (logits, log-softmax, gradient);
- ring: K/V receive buffers (two channels, double-buffered), the float32 output /
  dq / travelling dK,dV accumulators and the batched merge (capped by its budget);
- vision: this rank's share of the tiles through the ViT, and every rank's copy of the
  gathered visual tokens.

Evaluation has no model states beyond the weights and no graph; answering by generation
(MM-NIAH) adds the KV cache: K and V of every layer for the rank's T tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from parallelism.ring_attention import MERGE_BUDGET_BYTES

from ..spec import Hardware
from .mmniah import TASKS
from .mmniah_protocol import PROTOCOLS
from .model import V2PEModelConfig

GIB = 1 << 30
# Memory headroom left to the allocator's fragmentation, NCCL and the CUDA context.
USABLE_FRACTION = 0.9


@dataclass(kw_only=True, frozen=True)
class RunShape:
    """What the planner needs of a job: sizes, not services."""

    seq_len: int
    tiles: int  # image tiles per sample
    training: bool = True
    cp: int = 1
    cp_a2a: int = 1
    dp: int = 1
    sharding: str = "deepspeed"  # "deepspeed" | "fsdp" | "none"
    zero_stage: int = 3
    bf16: bool = True
    activation_checkpointing: bool = True
    loss_chunk_tokens: int = 4096
    supervised_fraction: float = 1.0  # share of tokens with a loss (an upper bound by default)
    # Evaluation by generation: the prefill keeps every layer's K/V of the rank's tokens
    # (its KV cache shard) for the decoding that follows.
    kv_cache: bool = False

    @property
    def world(self) -> int:
        return self.cp * self.dp


def parameter_counts(m: V2PEModelConfig) -> dict[str, int]:
    """Parameters of each part, as built by workloads.v2pe.model (tested against it)."""
    v, llm = m.vision, m.llm
    cv, iv = v.hidden_size, v.intermediate_size
    block = (2 * cv) + (3 * cv * cv + 3 * cv) + (cv * cv + cv) + cv + (2 * cv) + (cv * iv + iv) + (iv * cv + cv) + cv
    vision = 3 * cv * v.patch_size**2 + cv + cv + (1 + v.grid**2) * cv + v.num_layers * block
    c4 = 4 * cv
    projector = 2 * c4 + (c4 * llm.hidden_size + llm.hidden_size) + (llm.hidden_size**2 + llm.hidden_size)
    c, i, d = llm.hidden_size, llm.intermediate_size, llm.head_dim
    layer = c + c * (llm.num_heads + 2 * llm.num_kv_heads) * d + llm.num_heads * d * c + c + 3 * c * i
    decoder = llm.vocab_size * c + llm.num_layers * layer + c + c * llm.vocab_size
    return {"vision": vision, "projector": projector, "decoder": decoder}


def _model_states(n_params: int, r: RunShape) -> dict[str, float]:
    """Parameters, gradients and optimizer states per rank (ZeRO paper accounting)."""
    n = r.world
    if not r.training:
        return {"parameters": n_params * (2 if r.bf16 else 4), "gradients": 0.0, "optimizer": 0.0}
    if r.sharding == "none":  # plain AdamW on the model's own dtype: m and v in that dtype
        b = 2 if r.bf16 else 4
        return {"parameters": n_params * b, "gradients": n_params * b, "optimizer": 2 * n_params * b}
    if r.sharding == "fsdp":
        # FSDP2 keeps the fp32 parameters and their fp32 gradients sharded (bf16 is a
        # compute copy of the unit being gathered), and AdamW's m and v with them.
        return {"parameters": n_params * 4.0 / n, "gradients": n_params * 4.0 / n, "optimizer": n_params * 8.0 / n}
    if r.bf16:  # bf16 weights and gradients, fp32 master copy + m + v in the optimizer
        p, g, o = 2.0, 2.0, 12.0
    else:
        p, g, o = 4.0, 4.0, 8.0
    z = r.zero_stage
    return {
        "parameters": n_params * p / (n if z >= 3 else 1),
        "gradients": n_params * g / (n if z >= 2 else 1),
        "optimizer": n_params * o / (n if z >= 1 else 1),
    }


def _decoder_layer_saved(m: V2PEModelConfig, a: int) -> float:
    """Bytes per token one decoder layer keeps for its backward (see DecoderLayer)."""
    llm = m.llm
    c, i, d, h, hkv = llm.hidden_size, llm.intermediate_size, llm.head_dim, llm.num_heads, llm.num_kv_heads
    # RMSNorm: the float32 input (two separate copies in bf16: one for the variance, one
    # for the product; the input itself in float32), the normalised value before the
    # weight, and the output the next Linear keeps.
    norm = (8 * c if a != 4 else 0) + a * c + a * c
    qkv = a * (h + 2 * hkv) * d  # kept whole: V is a view of it and attention saves V
    rotated = a * h * d + a * hkv * d  # rotated q and k (attention inputs)
    attn_out = a * h * d + 4 * h  # output (also wo's input) and the float32 log-sum-exp
    ffn = 4 * a * i  # w1 out (silu input), silu out, w3 out, their product (w2 input)
    return 2 * norm + qkv + rotated + attn_out + ffn + a * c  # + the residual between the halves


def _decoder_layer_backward(m: V2PEModelConfig, a: int) -> float:
    """Bytes per token of gradients alive at once inside one layer's backward: the
    (T, intermediate) gradients of the two FFN branches dominate."""
    return 2 * a * m.llm.intermediate_size


def _decoder_layer_inference(m: V2PEModelConfig, a: int) -> float:
    """Bytes per token alive at once inside one layer without a graph: the largest of the
    RMSNorm's float32 temporaries, the attention half (qkv, the q copy, the rotation's
    temporaries, the output) and the FFN half (silu(w1 h), w3 h, their product), beside
    the normalised input the half works on."""
    llm = m.llm
    c, i, d, h, hkv = llm.hidden_size, llm.intermediate_size, llm.head_dim, llm.num_heads, llm.num_kv_heads
    attn = a * (h + 2 * hkv) * d + 3 * a * h * d + a * hkv * d
    ffn = 3 * a * i
    return max(8 * c, attn, ffn) + a * c


def _vision_tokens(m: V2PEModelConfig) -> int:
    return 1 + m.vision.grid**2


def _vision_block_saved(m: V2PEModelConfig, a: int) -> float:
    cv, iv, heads = m.vision.hidden_size, m.vision.intermediate_size, m.vision.num_heads
    # norm1 in/out, qkv out, attention out (+lse), its re-laid copy, proj out, x1,
    # norm2 out, fc1 out, gelu out, fc2 out; LayerNorm mean/rstd are per token.
    return a * (2 * cv + 3 * cv + cv + cv + cv + cv + cv + cv) + 4 * heads + 2 * a * iv + 16


def estimate_memory(m: V2PEModelConfig, r: RunShape) -> dict[str, float]:
    """Bytes per GPU by component (the largest rank: the one with the most tiles)."""
    a = 2 if r.bf16 else 4
    llm = m.llm
    c, d, hkv, h, L = llm.hidden_size, llm.head_dim, llm.num_kv_heads, llm.num_heads, llm.num_layers
    t = math.ceil(r.seq_len / r.cp)  # tokens per rank
    n_params = sum(parameter_counts(m).values())
    out = dict(_model_states(n_params, r))

    layer_saved = _decoder_layer_saved(m, a) * t
    if r.training and r.activation_checkpointing:
        act = L * a * c * t + layer_saved + _decoder_layer_backward(m, a) * t
    elif r.training:
        act = L * layer_saved + _decoder_layer_backward(m, a) * t
    else:  # no graph: one layer's transient tensors, plus the residual stream
        act = _decoder_layer_inference(m, a) * t + 2 * a * c * t
    # rotary cos/sin, and the gradient of the residual stream travelling down the layers
    # (the final norm's and the loss's tensors are gone before the peak in the backward).
    act += 2 * a * d * t + a * c * t
    out["activations"] = act

    supervised = max(1, int(t * r.supervised_fraction))
    chunk = min(r.loss_chunk_tokens, supervised)
    out["logits"] = chunk * llm.vocab_size * 4 * (3 if r.training else 2)

    ring = 0.0
    if r.cp > 1:
        u = r.cp_a2a
        kv = 2 * t * hkv * d * a  # one K and one V piece (the same after the all-to-all)
        ring = 2 * kv  # the next step's K/V while the current one computes
        ring += 4 * t * h * d + 4 * t * h  # float32 output accumulator and its lse
        blocks = max(1, r.cp // u - 1)
        ring += min(blocks * 4 * t * h * d, MERGE_BUDGET_BYTES)  # pending blocks of the merge
        if r.training:
            ring += 4 * t * h * d + 4 * (kv * 2)  # float32 dq, travelling dK/dV (two buffers)
        if u > 1:
            ring += 2 * a * t * (h + 2 * hkv) * d  # all-to-all send/receive copies
    out["ring_buffers"] = ring

    tiles = math.ceil(r.tiles / r.cp)
    vt = _vision_tokens(m) * tiles
    cv = m.vision.hidden_size
    if r.training and r.activation_checkpointing:
        vision = m.vision.num_layers * a * cv * vt + _vision_block_saved(m, a) * vt
    elif r.training:
        vision = m.vision.num_layers * _vision_block_saved(m, a) * vt
    else:  # one block's temporaries: fc1 and GELU outputs, q/k/v and the residuals
        vision = (2 * a * m.vision.intermediate_size + 6 * a * cv) * vt
    # every rank's copy of the gathered visual tokens (and their gradient in training)
    vision += r.tiles * m.tokens_per_tile * c * a * (2 if r.training else 1)
    out["vision"] = vision
    if r.kv_cache:  # K and V of every layer for the rank's tokens, after rotary
        out["kv_cache"] = L * 2 * t * hkv * d * a
    out["total"] = sum(out.values())
    return out


# A flash-attention backward costs about 2.5 forwards (the recomputed scores, dQ, dK, dV).
BACKWARD_ATTENTION = 2.5


def attention_flops(m: V2PEModelConfig, seq: int, causal: bool = True) -> float:
    """Forward FLOPs of the decoder's attention scores and weighted sum for one sample."""
    llm = m.llm
    full = 4 * seq * seq * llm.num_heads * llm.head_dim * llm.num_layers
    return full / 2 if causal else full


def step_estimate(m: V2PEModelConfig, r: RunShape, hw: Hardware) -> dict[str, float]:
    """Compute and communication per step for one rank, and whether transfers hide."""
    p = parameter_counts(m)
    llm = m.llm
    # Passes over the sequence: the forward, its recomputation under activation
    # checkpointing, and the backward (twice a forward's matmul FLOPs, BACKWARD_ATTENTION
    # times its attention FLOPs). Ring and all-to-all traffic follow the same passes.
    fwd = (2 if r.activation_checkpointing else 1) if r.training else 1
    bwd = 1 if r.training else 0
    non_embed = p["decoder"] - 2 * llm.vocab_size * llm.hidden_size
    dense = 2 * non_embed * r.seq_len * (fwd + 2 * bwd)
    dense += 2 * llm.vocab_size * llm.hidden_size * r.seq_len * r.supervised_fraction * (1 + 2 * bwd)  # logits once
    vis = 2 * (p["vision"] + p["projector"]) * r.tiles * _vision_tokens(m) * (fwd + 2 * bwd)
    attn = attention_flops(m, r.seq_len) * (fwd + BACKWARD_ATTENTION * bwd)
    flops_rank = (dense + vis + attn) / r.cp
    rate = hw.tflops * 1e12 * hw.efficiency
    compute_s = flops_rank / rate

    a = 2 if r.bf16 else 4
    u, ring = r.cp_a2a, r.cp // r.cp_a2a
    t = r.seq_len / r.cp
    d, h, hkv, L = llm.head_dim, llm.num_heads, llm.num_kv_heads, llm.num_layers
    per_node = hw.gpus_per_node
    # The ring's neighbours are U ranks apart: inside a node while cp fits in one.
    ring_bw = hw.intra_node_gbps if r.cp <= per_node else hw.inter_node_gbps
    a2a_bw = hw.intra_node_gbps if u <= per_node else hw.inter_node_gbps
    # Ring step: K/V of one ring shard (all U pieces, H_kv/U heads) vs. one block's
    # attention. The backward sends K/V again and the float32 dK/dV beside them.
    kv_bytes = 2 * (t * u) * (hkv / u) * d * a
    bwd_bytes = kv_bytes * (1 + 4 / a)
    block_flops = 4 * (t * u) ** 2 * (h / u) * d  # one off-diagonal block, full (zigzag halves)
    ring_xfer_s = kv_bytes / (ring_bw * 1e9)
    block_s = block_flops / rate
    steps = (ring - 1) * L  # ring steps per pass
    ring_bytes = steps * (fwd * kv_bytes + bwd * bwd_bytes)
    exposed_ring = steps * (fwd * max(0.0, ring_xfer_s - block_s)
                            + bwd * max(0.0, bwd_bytes / (ring_bw * 1e9) - BACKWARD_ATTENTION * block_s))
    # All-to-all: q, k, v there and the output back, each (U-1)/U of the piece, per layer
    # and pass (the backward's four go the other way).
    a2a_bytes = 0.0
    if u > 1:
        piece = t * (2 * h + 2 * hkv) * d * a * (u - 1) / u
        a2a_bytes = piece * L * (fwd + bwd)
    a2a_s = a2a_bytes / (a2a_bw * 1e9)  # synchronous: not hidden
    return {
        "flops_per_rank": flops_rank,
        "compute_s": compute_s,
        "ring_bytes": ring_bytes,
        "ring_step_transfer_s": ring_xfer_s,
        "ring_step_compute_s": block_s,
        "ring_hidden": exposed_ring == 0.0,
        "ring_exposed_s": exposed_ring,
        "a2a_bytes": a2a_bytes,
        "a2a_s": a2a_s,
        "step_s": compute_s + exposed_ring + a2a_s,
    }


@dataclass(kw_only=True, frozen=True)
class Plan:
    cp: int
    cp_a2a: int
    dp: int
    gpus: int
    memory_gib: dict
    fits: bool
    step: dict

    def to_json(self) -> dict:
        return asdict(self)


def plan_for(m: V2PEModelConfig, shape: RunShape, hw: Hardware) -> Plan:
    mem = estimate_memory(m, shape)
    return Plan(cp=shape.cp, cp_a2a=shape.cp_a2a, dp=shape.dp, gpus=shape.world,
                memory_gib={k: v / GIB for k, v in mem.items()},
                fits=mem["total"] <= hw.gpu_memory_gib * GIB * USABLE_FRACTION,
                step=step_estimate(m, shape, hw))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def best_a2a(m: V2PEModelConfig, shape: RunShape, hw: Hardware) -> Plan:
    """For the shape's cp and dp: the all-to-all degree with the shortest estimated step
    (ties: the smaller degree). It stays inside a node and divides both head counts."""
    heads = math.gcd(m.llm.num_heads, m.llm.num_kv_heads)
    options = [plan_for(m, RunShape(**{**asdict(shape), "cp_a2a": u}), hw)
               for u in _divisors(shape.cp) if u <= hw.gpus_per_node and heads % u == 0]
    return min(options, key=lambda p: (round(p.step["step_s"], 6), p.cp_a2a))


def recommend(m: V2PEModelConfig, shape: RunShape, hw: Hardware) -> Plan:
    """The layout to run: the smallest context-parallel degree that fits memory (the
    rest of the GPUs become data-parallel replicas: the least communication for the
    same throughput), with the best all-to-all degree for it (`best_a2a`).

    With hw.gpus set, cp must divide it; otherwise dp = 1 and gpus = cp.
    """
    cps = _divisors(hw.gpus) if hw.gpus else [2**k for k in range(13)]
    # A cp that leaves under 512 tokens per rank is never useful.
    cps = [c for c in cps if shape.seq_len // c >= 512 or c == 1]
    smallest = None
    for cp in cps:
        dp = hw.gpus // cp if hw.gpus else 1
        p = best_a2a(m, RunShape(**{**asdict(shape), "cp": cp, "dp": dp}), hw)
        if p.fits:
            return p
        if smallest is None or p.memory_gib["total"] < smallest.memory_gib["total"]:
            smallest = p
    raise PlanError(
        f"no layout fits {hw.gpu_memory_gib:g} GiB per GPU"
        + (f" on {hw.gpus} GPUs" if hw.gpus else "")
        + (f"; the smallest needs {smallest.memory_gib['total']:.1f} GiB (cp={smallest.cp}, "
           f"cp_a2a={smallest.cp_a2a})" if smallest else "")
    )


class PlanError(ValueError):
    pass


__all__ = ["GIB", "Hardware", "Plan", "PlanError", "RunShape", "best_a2a", "estimate_memory", "parameter_counts", "plan_for",
           "recommend", "step_estimate"]


# --- a job config's plan (`longview plan`) ---------------------------------------------------


def job_shape(cfg, *, evaluation: bool = False, tiles: int | None = None,
               visual_fraction: float = 0.5):
    """The planner's view of a V2PE job. Tiles per sample: --tiles, else the synthetic
    data's image count, else `visual_fraction` of the tokens as visual tokens."""
    m = cfg.model.config()
    t, p = cfg.training, cfg.parallelism
    # evaluation: the needle task's longest length, else (MM-NIAH) the longest sample accepted
    seq = max(cfg.evaluation.lengths) if evaluation and cfg.evaluation.lengths else cfg.data.max_tokens
    if tiles is None:
        if evaluation and cfg.evaluation.benchmark == "needle":
            tiles = cfg.evaluation.images_at(seq)
        elif cfg.data.train == "synthetic" and not evaluation:
            tiles = cfg.data.synthetic.images
        else:
            tiles = int(seq * visual_fraction) // m.tokens_per_tile
    if evaluation:
        shape = RunShape(seq_len=seq, tiles=tiles, training=False, cp=cfg.resources.max_workers, cp_a2a=p.cp_a2a,
                         dp=1, sharding="none", bf16=t.bf16, loss_chunk_tokens=t.loss_chunk_tokens,
                         supervised_fraction=0.01, kv_cache=cfg.evaluation.benchmark == "mm-niah")
    else:
        shape = RunShape(seq_len=seq, tiles=tiles, training=True, cp=p.cp, cp_a2a=p.cp_a2a, dp=cfg.dp,
                         sharding=t.sharding, zero_stage=t.zero_stage if t.sharding == "deepspeed" else 0,
                         bf16=t.bf16, activation_checkpointing=t.activation_checkpointing,
                         loss_chunk_tokens=t.loss_chunk_tokens)
    return shape


def _budget_samples(cfg, evaluation: bool, budget) -> int | None:
    """Samples the hours are for: --samples, else what the config says (the synthetic
    set's size; MM-NIAH's max_samples per task)."""
    if budget.samples:
        return budget.samples
    if evaluation:
        return cfg.evaluation.max_samples if cfg.evaluation.benchmark == "mm-niah" else None
    return cfg.data.synthetic.samples if cfg.data.train == "synthetic" else None


def plan_job(cfg, hw, tiles: int | None = None, budget=None) -> dict:
    """The whole answer as plain data (what --json prints)."""
    from ..spec import Budget
    from .renting import renting

    budget = budget or Budget()
    out = {"workload": "v2pe", "model": cfg.model.size, "hardware": asdict(hw)}
    for part, evaluation in (("training", False), ("evaluation", True)):
        if evaluation and not cfg.evaluation.lengths and cfg.evaluation.benchmark == "needle":
            continue
        m, shape = cfg.model.config(), job_shape(cfg, evaluation=evaluation, tiles=tiles)
        entry = {"seq_len": shape.seq_len, "tiles": shape.tiles, "configured": plan_for(m, shape, hw).to_json(),
                 "configured_cp_best_a2a": best_a2a(m, shape, hw).to_json()}
        # Training keeps its GPU count (--gpus, else the config's workers): data-parallel
        # replicas absorb what cp does not use. Evaluation is one sample at a time: as
        # few GPUs as fit (more would not be replicas).
        gpus = None if evaluation else (hw.gpus or cfg.resources.max_workers)
        try:
            entry["recommended"] = recommend(m, shape, replace(hw, gpus=gpus)).to_json()
        except PlanError as e:
            entry["recommended"] = None
            entry["error"] = str(e)
        # Generation (MM-NIAH) decodes each answer after the prefill, at most the protocol's
        # budget of the tasks evaluated (an upper bound); the needle task is teacher-forced.
        e = cfg.evaluation
        new_tokens = (e.max_new_tokens or max(PROTOCOLS[e.protocol].budget(t) for t in e.tasks or TASKS)
                      if evaluation and shape.kv_cache else 0)
        forced = evaluation and cfg.evaluation.teacher_forced  # a second pass over each sample
        entry["renting"] = renting(m, shape, hw, budget, samples=_budget_samples(cfg, evaluation, budget), gpus=gpus,
                                   new_tokens=new_tokens, passes=2 if forced else 1)
        if forced:
            # V2PE's check: the prompt and its answer through the model once, no KV cache kept
            # (it runs after each greedy answer, whose cache is freed by then).
            entry["teacher_forced"] = plan_for(m, replace(shape, kv_cache=False), hw).to_json()
        out[part] = entry
    return out


def format_plan(plan: dict) -> str:
    """`plan_job`'s answer as the text `longview plan` prints."""
    from .renting import format_renting

    hw = plan["hardware"]
    lines = [f"V2PE {plan['model']}; GPUs of {hw['gpu_memory_gib']:g} GiB, {hw['gpus_per_node']} per node, "
             f"{hw['intra_node_gbps']:g} GB/s inside a node, {hw['inter_node_gbps']:g} GB/s across"]
    for part in ("training", "evaluation"):
        if part not in plan:
            continue
        e = plan[part]
        lines.append(f"\n{part}: {e['seq_len']} tokens, {e['tiles']} tiles per sample")
        labels = ["configured", "recommended"]
        if e["configured_cp_best_a2a"]["cp_a2a"] != e["configured"]["cp_a2a"]:
            labels.insert(1, "configured_cp_best_a2a")
        for label in labels:
            p = e.get(label)
            if p is None:
                lines.append(f"  {label}: {e.get('error', 'none')}")
                continue
            lines.append(_format_layout(label, p))
        rec = e.get("recommended")
        if rec and part == "training":
            lines.append(f"  to use it: --set parallelism.cp={rec['cp']} --set parallelism.cp_a2a={rec['cp_a2a']} "
                         f"--set resources.workers={rec['gpus']}")
        elif rec:
            lines.append(f"  to use it: longview eval ... --set resources.workers={rec['gpus']} "
                         f"--set parallelism.cp_a2a={rec['cp_a2a']}")
        if "teacher_forced" in e:
            t = e["teacher_forced"]
            lines.append(f"  teacher-forced check (one forward pass, no KV cache) on the configured layout: "
                         f"{t['memory_gib']['total']:.1f} GiB per GPU{'' if t['fits'] else ' (DOES NOT FIT)'}")
        lines += format_renting(part, e["renting"])
    return "\n".join(lines)


def _format_layout(label: str, p: dict) -> str:
    mem, s = p["memory_gib"], p["step"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")
    ring = "hidden" if s["ring_hidden"] else f"exposed {s['ring_exposed_s']:.2f} s"
    label = {"configured_cp_best_a2a": "same cp, best all-to-all"}.get(label, label)
    return (f"  {label}: cp {p['cp']} (all-to-all {p['cp_a2a']} x ring {p['cp'] // p['cp_a2a']}) x dp {p['dp']} "
            f"= {p['gpus']} GPUs; {mem['total']:.1f} GiB per GPU{'' if p['fits'] else ' (DOES NOT FIT)'}\n"
            f"    memory GiB: {parts}\n"
            f"    step: {s['compute_s']:.2f} s compute, ring {s['ring_bytes'] / 2**30:.1f} GiB per rank ({ring}), "
            f"all-to-all {s['a2a_bytes'] / 2**30:.1f} GiB ({s['a2a_s']:.2f} s) -> ~{s['step_s']:.2f} s")
