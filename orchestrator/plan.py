"""`longview plan`: what a job config needs per GPU, and the layout to run it with.

For V2PE: the configured layout (parallelism.cp / cp_a2a over resources.workers) and a
recommended one, for training at data.max_tokens and for evaluation at the longest
evaluation length (every worker one context-parallel group, as `longview eval` runs).
For PIIP: the branches' FLOPs and the ranks per branch the job will use.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from .config import JobConfig


def v2pe_shape(cfg: JobConfig, *, evaluation: bool = False, tiles: int | None = None,
               visual_fraction: float = 0.5):
    """The planner's view of a V2PE job. Tiles per sample: --tiles, else the synthetic
    data's image count, else `visual_fraction` of the tokens as visual tokens."""
    from workloads.v2pe.model import model_config  # noqa: PLC0415
    from workloads.v2pe.plan import RunShape  # noqa: PLC0415

    m = model_config(cfg.model.size, **cfg.model.overrides)
    t, p = cfg.training, cfg.parallelism
    seq = max(cfg.evaluation.lengths) if evaluation and cfg.evaluation.lengths else cfg.data.max_tokens
    if tiles is None:
        if evaluation:
            tiles = cfg.evaluation.images
        elif cfg.data.train == "synthetic":
            tiles = cfg.data.synthetic.images
        else:
            tiles = int(seq * visual_fraction) // m.tokens_per_tile
    if evaluation:
        shape = RunShape(seq_len=seq, tiles=tiles, training=False, cp=cfg.resources.workers, cp_a2a=p.cp_a2a,
                         dp=1, sharding="none", bf16=t.bf16, loss_chunk_tokens=t.loss_chunk_tokens,
                         supervised_fraction=0.01)
    else:
        shape = RunShape(seq_len=seq, tiles=tiles, training=True, cp=p.cp, cp_a2a=p.cp_a2a, dp=cfg.dp,
                         sharding=t.sharding, zero_stage=t.zero_stage if t.sharding == "deepspeed" else 0,
                         bf16=t.bf16, activation_checkpointing=t.activation_checkpointing,
                         loss_chunk_tokens=t.loss_chunk_tokens)
    return m, shape


def plan_job(cfg: JobConfig, hw, *, tiles: int | None = None) -> dict:
    """The whole answer as plain data (what --json prints)."""
    if cfg.workload == "piip":
        return _plan_piip(cfg, hw)
    from workloads.v2pe.plan import PlanError, best_a2a, plan_for, recommend  # noqa: PLC0415

    out = {"workload": "v2pe", "model": cfg.model.size, "hardware": asdict(hw)}
    for part, evaluation in (("training", False), ("evaluation", True)):
        if evaluation and not cfg.evaluation.lengths:
            continue
        m, shape = v2pe_shape(cfg, evaluation=evaluation, tiles=tiles)
        entry = {"seq_len": shape.seq_len, "tiles": shape.tiles, "configured": plan_for(m, shape, hw).to_json(),
                 "configured_cp_best_a2a": best_a2a(m, shape, hw).to_json()}
        # Training keeps its GPU count (--gpus, else the config's workers): data-parallel
        # replicas absorb what cp does not use. Evaluation is one sample at a time: as
        # few GPUs as fit (more would not be replicas).
        gpus = None if evaluation else (hw.gpus or cfg.resources.workers)
        try:
            entry["recommended"] = recommend(m, shape, replace(hw, gpus=gpus)).to_json()
        except PlanError as e:
            entry["recommended"] = None
            entry["error"] = str(e)
        out[part] = entry
    return out


def _plan_piip(cfg: JobConfig, hw) -> dict:
    from workloads.piip.flops import backbone_flops, propose_layout  # noqa: PLC0415

    from .config import piip_model_config  # noqa: PLC0415

    m = piip_model_config(cfg)
    gpus = hw.gpus or cfg.resources.workers
    f = backbone_flops(m)
    return {"workload": "piip", "variant": cfg.piip.variant, "resolutions": list(cfg.piip.resolutions),
            "gflops": f["total"] / 1e9, "branch_gflops": [b / 1e9 for b in f["branches"]],
            "configured_ranks_per_branch": list(cfg.piip.ranks_per_branch) or None,
            "recommended_ranks_per_branch": list(propose_layout(m, gpus)), "gpus": gpus}


def format_plan(plan: dict) -> str:
    if plan["workload"] == "piip":
        lines = [f"PIIP {plan['variant']} @ {'/'.join(map(str, plan['resolutions']))}: "
                 f"{plan['gflops']:.1f} GFLOPs per image"]
        lines.append("branch GFLOPs: " + ", ".join(f"{g:.1f}" for g in plan["branch_gflops"]))
        lines.append(f"ranks per branch on {plan['gpus']} GPUs: {plan['recommended_ranks_per_branch']} "
                     "(proportional to each branch's FLOPs)")
        if plan["configured_ranks_per_branch"]:
            lines.append(f"configured: {plan['configured_ranks_per_branch']}")
        return "\n".join(lines)
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
