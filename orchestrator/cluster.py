"""Cluster definitions: offline validation and "can this cluster ever run the job?".

Ray cluster YAMLs are checked with Ray's own schema and checks
(`validate_config(prepare_config(...))`; the fake_multinode provider ships no defaults
file in the wheel, so a complete YAML of that provider is checked with the schema
alone). KubeRay manifests are checked for the fields KubeRay requires.
"""

from __future__ import annotations

import yaml

from .config import ConfigError, JobConfig
from .placement import NodeKind, check_fits


def load_cluster_yaml(path: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(path) as f:
        cfg = yaml.safe_load(f)
    try:
        if cfg.get("provider", {}).get("type") == "fake_multinode":
            validate_config(cfg)
        else:
            validate_config(prepare_config(cfg))
    except Exception as e:  # noqa: BLE001 - Ray raises jsonschema and ValueError alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: {first}") from None
    return cfg


def check_kuberay(manifest: dict, source: str = "manifest") -> None:
    """Raises ConfigError naming the first missing field KubeRay needs."""
    def need(obj, path):
        cur = obj
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise ConfigError(f"{source}: {path} is missing")
            cur = cur[part]
        return cur

    if need(manifest, "apiVersion") not in ("ray.io/v1", "ray.io/v1alpha1"):
        raise ConfigError(f"{source}: apiVersion {manifest['apiVersion']!r} is not ray.io/v1")
    kind = need(manifest, "kind")
    need(manifest, "metadata.name")
    if kind == "RayJob":
        need(manifest, "spec.entrypoint")
        spec = need(manifest, "spec.rayClusterSpec")
    elif kind == "RayCluster":
        spec = need(manifest, "spec")
    else:
        raise ConfigError(f"{source}: kind {kind!r} is not RayCluster or RayJob")
    containers = need(spec, "headGroupSpec.template.spec.containers")
    if not containers or not all("image" in c and "name" in c for c in containers):
        raise ConfigError(f"{source}: every head container needs a name and an image")
    need(spec, "headGroupSpec.rayStartParams")
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        for key in ("groupName", "rayStartParams", "template"):
            if key not in g:
                raise ConfigError(f"{source}: workerGroupSpecs[{i}].{key} is missing")
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31)
        if lo > hi:
            raise ConfigError(f"{source}: workerGroupSpecs[{i}] minReplicas {lo} > maxReplicas {hi}")
        if not g["template"].get("spec", {}).get("containers"):
            raise ConfigError(f"{source}: workerGroupSpecs[{i}].template.spec.containers is missing")


def yaml_node_kinds(cluster: dict) -> list[NodeKind]:
    """A cluster YAML's node types, each with the most nodes the autoscaler may start."""
    head = cluster.get("head_node_type")
    return [NodeKind(f"node type {name}", t.get("resources", {}),
                     1 if name == head else t.get("max_workers", cluster.get("max_workers", 0)))
            for name, t in cluster.get("available_node_types", {}).items()]


def check_job_fits(cfg: JobConfig, cluster: dict, source: str = "cluster") -> None:
    """Refuses a job no node type of `cluster` can ever hold, naming what is missing."""
    check_fits(cfg, yaml_node_kinds(cluster), source)
