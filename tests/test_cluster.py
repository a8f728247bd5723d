"""Cluster definitions: offline validation, job fit checks, and autoscaling on one machine."""

import copy
import glob
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from orchestrator.cluster import check_job_fits, check_kuberay, load_cluster_yaml
from orchestrator.config import ConfigError, load_config

RAY_YAMLS = ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/local-fake-multinode.yaml"]


@pytest.mark.parametrize("path", RAY_YAMLS)
def test_ray_cluster_yamls_pass_rays_own_validation(path):
    cfg = load_cluster_yaml(path)
    assert cfg["available_node_types"][cfg["head_node_type"]]


@pytest.mark.parametrize("path", RAY_YAMLS)
def test_a_misspelled_key_fails_with_rays_message(path, tmp_path):
    cfg = yaml.safe_load(open(path))
    cfg["idle_timeout_minutez"] = cfg.pop("idle_timeout_minutes")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"'idle_timeout_minutez' was unexpected"):
        load_cluster_yaml(str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob("cluster/kuberay-*.yaml")))
def test_kuberay_manifests_have_what_kuberay_requires(path):
    manifest = yaml.safe_load(open(path))
    check_kuberay(manifest, path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["enableInTreeAutoscaling"] is True
    broken = copy.deepcopy(manifest)
    group = broken["spec"].get("rayClusterSpec", broken["spec"])["workerGroupSpecs"][0]
    del group["groupName"]
    with pytest.raises(ConfigError, match=r"workerGroupSpecs\[0\].groupName is missing"):
        check_kuberay(broken, path)


def test_jobs_that_no_node_type_can_hold_are_refused():
    aws = load_cluster_yaml("cluster/aws.yaml")
    ok = load_config("configs/v2pe-256k.yaml")  # 32 workers x 1 GPU: 8 nodes of 8 GPUs hold 64
    check_job_fits(ok, aws)
    big = load_config("configs/v2pe-256k.yaml", overrides={"resources.gpus_per_worker": 16})
    with pytest.raises(ConfigError, match=r"missing: GPU \(needs 16"):
        check_job_fits(big, aws)
    custom = load_config("configs/v2pe-256k.yaml", overrides={"resources.custom": {"tpu_v5": 1}})
    with pytest.raises(ConfigError, match=r"tpu_v5"):
        check_job_fits(custom, aws)
    many = load_config("configs/v2pe-256k.yaml", overrides={"resources.workers": 200, "parallelism.cp": 8})
    with pytest.raises(ConfigError, match=r"at most 96 workers"):  # 8 x 8 H100 + 4 x 8 A100
        check_job_fits(many, aws)


def test_submit_refuses_before_contacting_any_cluster(tmp_path):
    env = dict(os.environ, LONGVIEW_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", "configs/v2pe-demo.yaml",
                           "--cluster-yaml", "cluster/local-fake-multinode.yaml", "--set", "resources.gpus_per_worker=1",
                           "--address", "http://127.0.0.1:9"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "refused: cluster/local-fake-multinode.yaml: no node type can hold one worker" in proc.stderr
    assert "GPU (needs 1" in proc.stderr


def _ray_nodes(address: str) -> list[dict]:
    # The autoscaler's own messages reach a driver's stdout too: mark our line.
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
            "print('NODES ' + json.dumps([{'alive': n['Alive'], 'res': n['Resources']} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    import json

    line = next(line for line in out.splitlines() if line.startswith("NODES "))
    return json.loads(line[len("NODES "):])


def test_autoscaler_adds_worker_nodes_for_a_job_and_removes_them_when_idle(tmp_path):
    from orchestrator.services import (
        LOCAL_CREDENTIALS,
        start_mlflow,
        start_ray,
        start_s3,
        stop_pid,
        stop_processes_under,
    )

    s3 = start_s3(tmp_path, ["lvscale"])
    started = [s3]
    head = None
    try:
        started.append(start_mlflow(tmp_path, s3, "lvscale"))
        head = start_ray(tmp_path, num_cpus=1, autoscaling_yaml="cluster/local-fake-multinode.yaml")
        address = head.extra["address"]
        assert [n["alive"] for n in _ray_nodes(address)] == [True]  # just the head
        env = dict(os.environ, LONGVIEW_HOME=str(tmp_path / "home"), AWS_ENDPOINT_URL_S3=s3.url, **LOCAL_CREDENTIALS)
        name = f"scale-{uuid.uuid4().hex[:8]}"
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml", "--address", address,
             "--cluster-yaml", "cluster/local-fake-multinode.yaml", "--set", f"name={name}",
             "--set", "storage.uri=s3://lvscale/runs", "--set", f"tracking.uri={started[1].url}",
             "--set", "training.steps=2", "--set", "training.checkpoint_every=2", "--set", "data.synthetic.samples=2",
             "--set", "resources.custom={longview_worker: 1}"],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"s3://lvscale/runs/{name}/step-0000002" in proc.stdout
        nodes = _ray_nodes(address)
        workers = [n for n in nodes if n["res"].get("longview_worker")]
        assert len(workers) >= 2, nodes  # the autoscaler added one node per training worker
        # idle_timeout_minutes: 0.2 -> the worker nodes go away once the job has finished.
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = [n for n in _ray_nodes(address) if n["alive"] and n["res"].get("longview_worker")]
            if not alive:
                break
            time.sleep(5)
        assert not alive, alive
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(started[1].url).get_experiment_by_name("longview-v2pe")
        runs = MlflowClient(started[1].url).search_runs([exp.experiment_id])
        assert [r.info.status for r in runs if r.info.run_name == name] == ["FINISHED"]
    finally:
        if head is not None:
            stop_pid(head.pid)
            stop_processes_under(head.extra["temp_dir"])  # simulated nodes live outside its group
        for s in reversed(started):
            stop_pid(s.pid)
