"""Cluster definitions: offline validation, job fit checks, and autoscaling on one machine."""

import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from orchestrator import placement
from orchestrator.cluster import check_job_fits, check_kuberay, load_cluster_yaml
from orchestrator.config import ConfigError, load_config
from orchestrator.placement import NodeKind, PlacementRefused, check_fits

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
    with pytest.raises(ConfigError, match=r"missing: GPU \(a worker needs 16"):
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
    assert "refused: cluster/local-fake-multinode.yaml: no node can hold one worker" in proc.stderr
    assert "GPU (a worker needs 1" in proc.stderr


def test_an_autoscaler_is_told_from_the_read_only_monitor_every_head_runs(monkeypatch):
    """Ray's monitor status on a plain head names each node's type `node_<id>`; with an
    autoscaling config the types are the config's: only then may a node be added, and a
    job the live nodes cannot hold is not refused."""
    import ray.experimental.internal_kv as kv

    def status(mapping):
        return json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode()

    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: status({"abc": "node_abc"}))
    assert placement._autoscaler_without_node_types(0) is False
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: status({"abc": "ray.head.default"}))
    assert placement._autoscaler_without_node_types(0) is True
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: None)  # no monitor record within the grace
    assert placement._autoscaler_without_node_types(0) is False


def test_a_live_cluster_is_checked_with_the_same_rule_as_a_yaml():
    cfg = load_config("configs/v2pe-demo.yaml")  # 2 workers of 1 CPU
    check_fits(cfg, [NodeKind("node a", {"CPU": 2.0}, 1)], "the cluster")
    with pytest.raises(PlacementRefused, match=r"at most 1 workers .* resources.workers=2"):
        check_fits(cfg, [NodeKind("node a", {"CPU": 1.0}, 1)], "the cluster")
    gpu = load_config("configs/v2pe-demo.yaml", overrides={"resources.gpus_per_worker": 1})
    with pytest.raises(PlacementRefused, match=r"missing: GPU \(a worker needs 1, node a has 0\)"):
        check_fits(gpu, [NodeKind("node a", {"CPU": 8.0}, 1)], "the cluster")
    check_fits(gpu, [NodeKind("node a", {"CPU": 8.0}, 1), NodeKind("node type gpu", {"CPU": 8.0, "GPU": 8.0}, 2)],
               "the cluster")
