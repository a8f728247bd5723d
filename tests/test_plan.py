"""The planner: its counts against the real modules, its choices, and `longview plan`."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from orchestrator.config import load_config
from workloads.memory import TensorMemoryPeak
from workloads.piip.flops import detector_head_macs
from workloads.spec import Budget
from workloads.v2pe.model import AttentionSpec, DecoderLayer, V2PEModel, model_config
from workloads.v2pe.plan import (
    Hardware,
    PlanError,
    RunShape,
    _decoder_layer_saved,
    best_a2a,
    estimate_memory,
    job_shape,
    parameter_counts,
    recommend,
    step_estimate,
)
from workloads.v2pe.renting import (
    MEASURED_DECODE_MS,
    MEASURED_PEAK_TFLOPS,
    MEASURED_TRAIN,
    decode_ms,
    measured_efficiency,
    renting,
)

SMALL = model_config("tiny", llm_hidden_size=256, llm_num_heads=8, llm_num_kv_heads=4, llm_intermediate_size=768)


@pytest.mark.parametrize("size", ["tiny", "internvl2-2b", "internvl2-8b"])
def test_parameter_counts_match_the_modules(size):
    with torch.device("meta"):
        model = V2PEModel(model_config(size))
    got = parameter_counts(model.cfg)
    assert got == {"vision": sum(p.numel() for p in model.vision.parameters()),
                   "projector": sum(p.numel() for p in model.projector.parameters()),
                   "decoder": sum(p.numel() for p in model.decoder.parameters())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_per_layer_match_what_autograd_keeps(dtype):
    """The per-token count of one decoder layer's saved tensors, against the bytes of
    live tensors after its forward (counted by the dispatch-mode tracker). The slope
    between two lengths is compared: the attention kernel also keeps a few MB that do
    not grow with the sequence."""
    a = 4 if dtype == torch.float32 else 2
    torch.manual_seed(0)
    model = V2PEModel(SMALL).to(dtype)
    layer = model.decoder.layers[0]
    assert isinstance(layer, DecoderLayer)

    def saved_bytes(T):
        x = torch.randn(1, T, SMALL.llm.hidden_size, dtype=dtype, requires_grad=True)
        cos, sin = model.decoder.rotary(torch.arange(T, dtype=torch.float64)[None], dtype)
        mode = TensorMemoryPeak()
        with mode:
            y = layer(x, cos, sin, AttentionSpec())
            return mode.current - y.numel() * a  # the output itself is not a saved tensor

    per_token = (saved_bytes(4096) - saved_bytes(2048)) / 2048
    # The count leaves out per-token scalars (norm variances, the log-sum-exp's padding):
    # under 2% of the total here; 5% covers them.
    torch.testing.assert_close(per_token, float(_decoder_layer_saved(SMALL, a)), rtol=0.05, atol=0)


def test_memory_follows_sharding_and_sequence():
    m = model_config("internvl2-2b")
    base = RunShape(seq_len=65536, tiles=64, cp=4, dp=2, zero_stage=1)
    mem = estimate_memory(m, base)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    z3 = estimate_memory(m, replace(base, zero_stage=3))
    assert z3["parameters"] == pytest.approx(mem["parameters"] / 8)  # ZeRO-3 shards weights over all 8 ranks
    assert z3["optimizer"] == mem["optimizer"]
    # FSDP: fp32 weights and gradients and both moments, all sharded: ZeRO-3's 16 bytes
    # per parameter over the 8 ranks, split differently.
    fsdp = estimate_memory(m, replace(base, sharding="fsdp"))
    states = ("parameters", "gradients", "optimizer")
    assert sum(fsdp[k] for k in states) == pytest.approx(sum(z3[k] for k in states))
    assert fsdp["parameters"] == pytest.approx(2 * z3["parameters"])
    wider = estimate_memory(m, replace(base, cp=8, dp=1))
    assert wider["activations"] < 0.55 * mem["activations"]  # half the tokens per rank
    ev = estimate_memory(m, replace(base, training=False))
    assert ev["gradients"] == ev["optimizer"] == 0 and ev["activations"] < mem["activations"]
    no_ckpt = estimate_memory(m, replace(base, activation_checkpointing=False))
    assert no_ckpt["activations"] > 5 * mem["activations"]


def test_recommendation_fits_and_respects_the_constraints():
    m = model_config("internvl2-8b")
    shape = RunShape(seq_len=262144, tiles=256, zero_stage=3)
    hw = Hardware(gpus=64, gpu_memory_gib=80)
    p = recommend(m, shape, hw)
    assert p.fits and p.gpus == 64 and 64 % p.cp == 0 and p.dp == 64 // p.cp
    assert 8 % p.cp_a2a == 0 and p.cp_a2a <= hw.gpus_per_node
    assert p.memory_gib["total"] <= 80 * 0.9
    # the next smaller context-parallel degree would not fit
    smaller = best_a2a(m, replace(shape, cp=p.cp // 2, dp=64 // (p.cp // 2)), hw)
    assert not smaller.fits
    with pytest.raises(PlanError, match=r"no layout fits 1 GiB per GPU on 2 GPUs; the smallest needs"):
        recommend(m, shape, Hardware(gpus=2, gpu_memory_gib=1))


def test_hybrid_wins_when_the_ring_crosses_slow_links():
    """Many ranks, few tokens each, a slow inter-node link: the ring cannot hide its
    transfers, and all-to-all inside the node shortens the ring and enlarges its blocks."""
    m = model_config("internvl2-2b")
    shape = RunShape(seq_len=131072, tiles=64, cp=64, dp=1)
    hw = Hardware(gpus=64, inter_node_gbps=12.5)
    plain = best_a2a(m, replace(shape, cp=64), replace(hw, gpus_per_node=1))  # a2a=1 forced
    assert plain.cp_a2a == 1 and not plain.step["ring_hidden"]
    best = best_a2a(m, shape, hw)
    assert best.cp_a2a > 1 and best.step["step_s"] < plain.step["step_s"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("size", ["internvl2-2b", "internvl2-8b"])
@pytest.mark.parametrize("config", ["configs/v2pe-256k.yaml", "configs/v2pe-eval-1m.yaml"])
def test_plan_json_for_the_long_configs(config, size):
    proc = _cli("plan", config, "--set", f"model.size={size}", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    cfg = load_config(config, overrides={"model.size": size})
    train = plan["training"]
    assert train["seq_len"] == cfg.data.max_tokens
    assert train["configured"]["cp"] == cfg.parallelism.cp and train["configured"]["gpus"] == cfg.resources.workers
    rec = train["recommended"]
    if "256k" in config:
        assert rec["fits"] and rec["gpus"] == cfg.resources.workers
        mem = rec["memory_gib"]
        assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    elif rec is None:  # the evaluation config's own training section (no ZeRO) need not fit
        assert train["error"].startswith("no layout fits 80 GiB per GPU on 16 GPUs")
    ev = plan["evaluation"]
    assert ev["seq_len"] == max(cfg.evaluation.lengths or [cfg.data.max_tokens]) and ev["recommended"]["fits"]
    if cfg.evaluation.benchmark == "mm-niah":  # answers generated: the KV cache is planned
        assert ev["configured"]["memory_gib"]["kv_cache"] > 0
        # V2PE's teacher-forced check: one forward pass, the KV cache not kept; its time
        # is a second pass over each sample
        forced = ev["teacher_forced"]["memory_gib"]
        assert "kv_cache" not in forced and forced["total"] < ev["configured"]["memory_gib"]["total"]
        plain = json.loads(_cli("plan", config, "--set", f"model.size={size}", "--set",
                                "evaluation.teacher_forced=false", "--json").stdout)["evaluation"]
        assert "teacher_forced" not in plain
        for a, b in zip(ev["renting"]["rows"], plain["renting"]["rows"]):
            assert (a["gpus"], a["cp"]) == (b["gpus"], b["cp"]) and a["step_s"] > b["step_s"]


def test_plan_text_and_piip_and_errors():
    proc = _cli("plan", "configs/v2pe-256k.yaml", "--gpus", "64", "--gpu-memory", "40")
    assert proc.returncode == 0, proc.stderr
    assert "recommended: cp" in proc.stdout and "x dp" in proc.stdout and "to use it: --set parallelism.cp=" in proc.stdout
    proc = _cli("plan", "configs/piip-tsb.yaml", "--json")
    cfg = load_config("configs/piip-tsb.yaml")
    assert json.loads(proc.stdout)["recommended_ranks_per_branch"] == list(_layout(cfg))
    assert "head_gflops" not in json.loads(proc.stdout)  # classification: no detector
    # detection: the detector's heads beside the backbone, at COCO's 80 classes and the most RoIs it keeps
    proc = _cli("plan", "configs/piip-tsb-maskrcnn.yaml", "--json")
    plan, det = json.loads(proc.stdout), load_config("configs/piip-tsb-maskrcnn.yaml").piip
    expected = detector_head_macs(det.model_config(), det.detection_config(80))
    assert plan["head_gflops"]["total"] == pytest.approx(expected["total"] / 1e9)
    assert plan["head_assumes"] == {"classes": 80, "rois": det.rpn_proposals[1], "masks": 100}
    assert "detector heads:" in _cli("plan", "configs/piip-tsb-maskrcnn.yaml").stdout
    proc = _cli("plan", "configs/v2pe-256k.yaml", "--gpus", "0")
    assert proc.returncode != 0 and "plan: --gpus must be positive, got 0" in proc.stderr
    proc = _cli("plan", "configs/v2pe-256k.yaml", "--set", "parallelism.cp_a2a=3")
    assert proc.returncode != 0 and "parallelism.cp_a2a: 3 does not divide parallelism.cp=8" in proc.stderr
    assert "Traceback" not in proc.stderr


def _layout(cfg):
    return cfg.piip.layout(cfg.resources.workers)


def test_the_kv_cache_term_is_what_a_prefill_keeps():
    """Generation's KV cache as planned equals the bytes the prefill leaves in `KVCache`
    (tiny model, one process: every token of the prompt is this rank's)."""
    from tests.v2pe_helpers import tiny_model
    from workloads.v2pe.model import AttentionSpec, KVCache

    model = tiny_model()
    m, S = model.cfg, 300
    cache = KVCache(m.llm.num_layers)
    ids = torch.randint(0, 256, (1, S))
    with torch.no_grad():
        model.forward_hidden(ids, torch.arange(S, dtype=torch.float64)[None], torch.zeros(0, m.llm.hidden_size),
                             torch.full((1, S), -1), AttentionSpec(cache=cache))
    kept = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
               for k, v in (cache.get(i) for i in range(m.llm.num_layers)))
    planned = estimate_memory(m, RunShape(seq_len=S, tiles=0, training=False, bf16=False, kv_cache=True))
    assert planned["kv_cache"] == kept
    assert "kv_cache" not in estimate_memory(m, RunShape(seq_len=S, tiles=0, training=False, bf16=False))
    # over a context-parallel group of 8, each rank plans an eighth
    eighth = estimate_memory(m, RunShape(seq_len=8 * S, tiles=0, training=False, bf16=False, kv_cache=True, cp=8))
    assert eighth["kv_cache"] == kept


def test_renting_prices_steps_at_the_measured_rate_and_adds_up_the_hours():
    """The planner's time for the measured shape is the measured time (its calibration);
    every row's hours are its steps for the budget at its step time, GPU-hours its hours
    times its GPUs; the smallest GPU count fits and half of it does not."""
    m = model_config("internvl2-2b")
    seq, seconds = MEASURED_TRAIN
    hw = Hardware(tflops=MEASURED_PEAK_TFLOPS, efficiency=measured_efficiency(True))
    shape = RunShape(seq_len=seq, tiles=0, sharding="none", activation_checkpointing=True)
    assert step_estimate(m, shape, hw)["compute_s"] == pytest.approx(seconds, rel=1e-9)
    assert [decode_ms(n) for n, _ in MEASURED_DECODE_MS] == [ms for _, ms in MEASURED_DECODE_MS]

    shape = job_shape(load_config("configs/v2pe-256k.yaml"))
    r = renting(m, shape, Hardware(), Budget(samples=1000, epochs=2), samples=1000, gpus=32)
    assert r["rows"] and r["smallest_gpus"] == r["rows"][0]["gpus"]
    for row in r["rows"]:
        assert row["fits"]
        steps = -(-2000 // row["dp"])
        assert row["hours"] == pytest.approx(steps * row["step_s"] / 3600)
        assert row["gpu_hours"] == pytest.approx(row["hours"] * row["gpus"])
        assert row["tokens_per_s"] == pytest.approx(shape.seq_len * row["dp"] / row["step_s"])
    half = r["smallest_gpus"] // 2
    if half:
        with pytest.raises(PlanError):
            recommend(m, shape, replace(Hardware(), gpus=half))
    assert r["recommended"]["gpus"] == 32 and all(a["cp"] > r["recommended"]["cp"] for a in r["alternatives"])


def test_plan_answers_how_many_gpus_for_how_long():
    proc = _cli("plan", "configs/v2pe-256k.yaml", "--samples", "5000", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "smallest that fits: " in proc.stdout and "budget: 5000 samples x 2 epoch(s)" in proc.stdout
    assert "| GPUs | layout | GiB/GPU | s/step | tokens/s | hours | GPU-hours |" in proc.stdout
    assert "recommended: 32 GPUs as cp " in proc.stdout and "measured on one H200" in proc.stdout
    plan = json.loads(_cli("plan", "configs/v2pe-eval-1m.yaml", "--samples", "100", "--json").stdout)
    rows = plan["evaluation"]["renting"]["rows"]
    assert rows and all(r["hours"] > 0 for r in rows)
    proc = _cli("plan", "configs/v2pe-256k.yaml", "--samples", "0")
    assert proc.returncode != 0 and "plan: --samples must be positive, got 0" in proc.stderr


def test_piip_plan_counts_the_heads_in_the_split_and_every_parameter_once():
    from workloads.piip.plan import owned_parameter_counts, plan_job

    det = load_config("configs/piip-tsb-maskrcnn.yaml")
    owned, total = owned_parameter_counts(det.piip)
    assert sum(owned) == total  # each parameter has exactly one owning branch
    from workloads.piip.detection import PIIPDetector

    with torch.device("meta"):
        model = PIIPDetector(det.piip.model_config(), det.piip.detection_config(80))
    assert total == sum(p.numel() for p in model.parameters())
    # The heads (more FLOPs than the backbone) run on the first branch's ranks: it gets more of them.
    from workloads.piip.flops import propose_layout

    m = det.piip.model_config()
    assert propose_layout(m, 16, first_branch_extra=det.piip.head_macs())[0] > propose_layout(m, 16)[0]
    plan = plan_job(det, Hardware(gpus=16), budget=Budget(samples=1000, epochs=2))
    assert plan["ranks_per_branch"] == list(det.piip.layout(16)) and sum(plan["ranks_per_branch"]) == 16
    assert plan["step_s"] == max(b["step_s"] for b in plan["branches"]) > 0
    assert plan["memory_gib"] == max(b["memory_gib"]["total"] for b in plan["branches"]) and plan["fits"]
    assert plan["hours"] == pytest.approx(-(-2000 // det.piip.batch_size) * plan["step_s"] / 3600)
    assert plan["gpu_hours"] == pytest.approx(plan["hours"] * 16)
    text = _cli("plan", "configs/piip-tsb-maskrcnn.yaml", "--samples", "1000").stdout
    assert "on the fullest GPU: fits" in text and "GPU-hours on 16 GPUs" in text and "heads included" in text
