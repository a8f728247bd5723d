"""The one GPU command keeps working: its CPU smoke run goes through every part's code."""

import json
import subprocess
import sys

SCRIPT = "benchmarks/gpu_all.py"


def _run(tmp_path, *args, timeout=600):
    out = tmp_path / "gpu_all.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout)
    return proc, json.loads(out.read_text())


def test_smoke_runs_every_part_and_checks_the_kernels(tmp_path):
    proc, report = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == ["kernels", "ring", "capacity", "eval_1m", "generate"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["status"] for n, p in parts.items()}
    checks = parts["kernels"]["checks"]
    # Every CPU kernel against float64 (causal and full), the simulated ring, the model.
    assert any("out_err" in c for c in checks) and any("simulated ring" in c.get("check", "") for c in checks)
    model = [c for c in checks if "grad_rel_err" in c]
    assert model and model[0]["ok"] and "comparison needs CUDA" in model[0]["note"]  # said, not skipped
    sim = parts["ring"]["simulated"]
    assert {(r["S"], r["W"]) for r in sim} == {(512, 2), (512, 4)}
    # The peer computes the same attention (float32: summation order only).
    assert all(r["peer_max_err"] < 1e-4 and r["fwd_vs_peer"] > 0 for r in sim)
    assert [r["S"] for r in parts["capacity"]["train"]] == [512, 1024]
    assert all(r["peak_gib"] > 0 and "plan_error" in r for r in parts["capacity"]["train"])
    assert [r["S"] for r in parts["eval_1m"]["eval"]] == [1024, 2048]
    assert all(r["peak_gib"] > 0 for r in parts["eval_1m"]["eval"])
    assert parts["eval_1m"]["extrapolated"][0]["1m_on_16_gpus_gib"] > 0  # the line through them, at 1M
    gen = parts["generate"]
    assert [(r["S"], r["W"]) for r in gen["prefill"]] == [(512, 2), (1024, 4)] and all(r["layer_s"] > 0 for r in gen["prefill"])
    assert [r["S_local"] for r in gen["decode"]] == [256, 1024] and all(r["ms_per_token"] > 0 for r in gen["decode"])
    # The tables come out in BENCHMARKS.md's layout.
    assert "| kernel | S | W | S_local |" in proc.stdout and "longview / peer" in proc.stdout
    assert "| run | S | step s | tokens/s |" in proc.stdout
    assert "| prefill S | W |" in proc.stdout and "| decode model |" in proc.stdout


def test_a_part_over_its_budget_costs_only_its_budget(tmp_path):
    proc, report = _run(tmp_path, "--parts", "ring", "eval_1m", "--budget", "ring=0.5")
    assert proc.returncode == 1  # not every part finished
    assert report["parts"]["ring"]["status"].startswith("stopped at its budget")
    assert report["parts"]["eval_1m"]["status"] == "ok"  # the next part still ran


def test_a_bad_budget_is_refused_by_name():
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--budget", "rings=5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--budget 'rings=5'" in proc.stderr and "Traceback" not in proc.stderr
