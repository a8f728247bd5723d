"""Can the cluster a job is sent to ever hold its workers, and what does it wait for?

Two questions, asked of the cluster itself once the driver is connected to it:

- **Before anything starts** (`check_placement`): the node kinds the cluster has or can
  have — its live nodes (their total resources, not what is free now) and, on an
  autoscaling cluster, the node types its autoscaler reported to the GCS — must hold at
  least `resources.workers` (the minimum of an elastic range) workers of the job's
  resources. Ray's v1 autoscaler (a head started with `--autoscaling-config`) publishes
  no node types: on such a cluster a job the live nodes cannot hold is not refused, and
  waits as below. A job no node can ever hold is refused in one line naming the resource it
  lacks; it would otherwise wait for ever while only the run's log repeats Ray's
  "no node can hold it". `--cluster-yaml` asks the same question of a cluster YAML's
  node types (`cluster.check_job_fits`).
- **While the workers are being placed** (`PlacementWatch`): Ray Train's controller
  asks for a placement group of the workers' bundles and waits. The watch reads the
  cluster's placement-group table (this job's groups only: a group's id ends with the
  job id that created it), says every `REPORT_S` seconds what the run waits for and
  what the cluster has free, and after `resources.placement_timeout_s` stops the run
  as SIGTERM does, so the driver ends it with one line, `PlacementTimeout: ...`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass

from .config import ConfigError, JobConfig
from .ray_output import ROUTER

log = logging.getLogger(__name__)

REPORT_S = 15.0  # a line at least this often while a run waits for its workers
AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # Ray's monitor writes its status there each round
AUTOSCALER_GRACE_S = 20.0  # a monitor started with the head has reported by then (a round is 5 s)
POLL_S = 1.0
# Set while a run's workers are not placed: a stop then needs no graceful abort (nothing
# runs, no save is in flight) and must not wait for one (Ray Train's controller takes its
# abort only after its placement wait, up to 60 s); `ray_job.stop_on_sigterm` reads it.
UNPLACED = threading.Event()


class PlacementRefused(ConfigError):
    """No node the cluster has or can have holds the job's workers."""


class PlacementTimeout(RuntimeError):
    """The workers were not placed within resources.placement_timeout_s."""


@dataclass(frozen=True)
class NodeKind:
    """Nodes of one kind: their resources each, and how many of them there are or can be."""

    name: str
    resources: dict
    count: int


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """One worker's Ray resources, as `ray_job.build_trainer` asks for them."""
    r = {"CPU": cfg.resources.cpus_per_worker, **cfg.resources.custom}
    if cfg.resources.gpus_per_worker:
        r["GPU"] = cfg.resources.gpus_per_worker
    return {k: v for k, v in r.items() if v}


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def check_fits(cfg: JobConfig, kinds: list[NodeKind], source: str) -> None:
    """Raises PlacementRefused unless `kinds` can hold resources.workers (the minimum of an
    elastic range) workers of the job, naming what is missing."""
    need = worker_resources(cfg)
    capacity, missing_first = 0, None
    for kind in kinds:
        missing = [f"{k} (a worker needs {v:g}, {kind.name} has {kind.resources.get(k, 0):g})"
                   for k, v in need.items() if kind.resources.get(k, 0) < v]
        if missing:
            missing_first = missing_first or missing
            continue
        per_node = min(math.floor(kind.resources[k] / v) for k, v in need.items()) if need else 1
        capacity += per_node * kind.count
    if capacity == 0:
        raise PlacementRefused(f"{source}: no node can hold one worker of job {cfg.name} ({_fmt(need)}); "
                               f"missing: {', '.join(missing_first or ['no node types'])}")
    if capacity < cfg.resources.min_workers:
        raise PlacementRefused(f"{source}: at most {capacity} workers of job {cfg.name} fit ({_fmt(need)} each), "
                               f"it asks for resources.workers={cfg.resources.workers}")


def live_node_kinds() -> tuple[list[NodeKind], bool]:
    """(the connected cluster's node kinds, whether an autoscaler reported node types):
    each live node with its total resources, and the autoscaler's node types with the
    most nodes each may have."""
    import ray

    kinds = [NodeKind(f"node {n['NodeManagerAddress']}", dict(n["Resources"]), 1)
             for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - a Ray without it: the live nodes decide
        log.debug("the autoscaler's node types are not readable (%s)", e)
        config = None
    autoscaled = False
    for group in getattr(config, "node_group_configs", []) or []:
        count = group.max_count if group.max_count >= 0 else 1 << 30  # -1: no limit
        if count:
            kinds.append(NodeKind(f"node type {group.name}", dict(group.resources), count))
            autoscaled = True
    return kinds, autoscaled


def _autoscaler_without_node_types(grace_s: float) -> bool:
    """Whether the cluster runs an autoscaler that can add nodes but publishes no node
    types (Ray's v1 monitor with an autoscaling config, as `ray start --autoscaling-config`
    and the fake multi-node cluster start it). Every head runs a monitor that writes a
    status record to the GCS each round; without an autoscaling config its node provider
    is read-only and names each node's type `node_<node id>`, with one its types are the
    config's names. Looked for up to `grace_s` seconds (the first rounds of a new head
    carry no report yet)."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + grace_s
    while True:
        try:
            raw = _internal_kv_get(AUTOSCALER_STATUS_KEY)
            report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        except Exception as e:  # noqa: BLE001 - unreadable: treated as no autoscaler
            log.debug("autoscaler status unreadable (%s)", e)
            return False
        mapping = report.get("node_type_mapping") or {}
        if mapping:
            return any(kind != f"node_{node}" for node, kind in mapping.items())
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def check_placement(cfg: JobConfig, address: str) -> None:
    """`check_fits` against the cluster the driver is connected to: its live nodes and
    the node types its autoscaler publishes. An autoscaler that publishes none (Ray's v1
    monitor) may still add a node that fits: then the run is not refused here, and the
    placement watch says what it waits for."""
    kinds, autoscaled = live_node_kinds()
    what = "the autoscaling cluster" if autoscaled else "the cluster"
    try:
        check_fits(cfg, kinds, f"{what} at {address}")
    except PlacementRefused as e:
        if autoscaled or not _autoscaler_without_node_types(AUTOSCALER_GRACE_S):
            raise
        log.info("no node of the cluster holds a worker now (%s); its autoscaler publishes no node types, so the "
                 "run waits for one it may add (resources.placement_timeout_s=%g)", str(e).split("; ", 1)[-1],
                 cfg.resources.placement_timeout_s)


def _ours(table: dict, job_hex: str) -> list[dict]:
    """This job's placement groups (a group's id ends with its creator's job id)."""
    return [pg for pid, pg in table.items() if pid.endswith(job_hex) and pg.get("state") != "REMOVED"]


def _free() -> str:
    import ray

    free = {k: v for k, v in ray.available_resources().items()
            if not (k.startswith("node:") or k in ("memory", "object_store_memory"))}
    return _fmt(free) if free else "nothing"


class PlacementWatch:
    """While Ray Train places the run's workers: a line every REPORT_S seconds naming what
    it waits for (or, once placed, that they are starting), and after `timeout_s` the run
    stopped as SIGTERM stops it (`timed_out` then holds the reason, for the driver to
    raise PlacementTimeout). Needs `ray_job.stop_on_sigterm` installed."""

    def __init__(self, cfg: JobConfig, what: str, *, timeout_s: float, report_s: float = REPORT_S):
        self.cfg, self.what, self.timeout_s, self.report_s = cfg, what, timeout_s, report_s
        self.timed_out: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longview-placement-watch", daemon=True)

    def __enter__(self):
        UNPLACED.set()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        UNPLACED.clear()
        return False

    def _pending(self, job_hex: str) -> list[dict] | None:
        """This job's placement groups still waiting for nodes; None when none is known yet."""
        from ray.util.placement_group import placement_group_table

        ours = _ours(placement_group_table(), job_hex)
        if not ours:
            return None
        return [pg for pg in ours if pg.get("state") in ("PENDING", "RESCHEDULING")]

    def _run(self) -> None:
        import ray

        try:
            job_hex = ray.get_runtime_context().get_job_id()
        except Exception as e:  # noqa: BLE001 - the watch is a courtesy; the run goes on without it
            log.debug("placement watch off: %s", e)
            return
        need = _fmt(worker_resources(self.cfg))
        started = time.monotonic()
        waiting_since, placed_at, last_said = None, None, started
        while not self._stop.wait(POLL_S):
            try:
                pending = self._pending(job_hex)
            except Exception as e:  # noqa: BLE001 - the GCS is busy or going away: look again
                log.debug("placement watch: %s", e)
                continue
            now = time.monotonic()
            if pending == []:  # placed: quiet until a group waits again (an elastic resize)
                UNPLACED.clear()
                waiting_since = None
                placed_at = placed_at or now
                heard = ROUTER.last_ours is not None and ROUTER.last_ours > started
                if not heard and now - last_said >= self.report_s:  # the workers import, read, build
                    log.info("%s: workers placed %.0f s ago, starting (nothing from them yet)", self.what,
                             now - placed_at)
                    last_said = now
                continue
            UNPLACED.set()
            waiting_since = waiting_since or (started if pending is None else now)
            if pending is not None and now - last_said >= self.report_s:
                workers = sum(len(pg.get("bundles", {})) for pg in pending)
                infeasible = any((pg.get("stats") or {}).get("scheduling_state") == "INFEASIBLE" for pg in pending)
                log.info("%s: waiting %.0f s for %d workers of %s (%s; free now: %s); gives up after "
                         "resources.placement_timeout_s=%g", self.what, now - waiting_since, workers, need,
                         "no node holds them yet" if infeasible else "the cluster is busy", _free(),
                         self.timeout_s)
                last_said = now
            if pending is not None and now - waiting_since >= self.timeout_s:
                self.timed_out = (f"{self.cfg.resources.min_workers} workers of {need} not placed within "
                                  f"resources.placement_timeout_s={self.timeout_s:g} s (free now: {_free()})")
                signal.raise_signal(signal.SIGTERM)  # the driver stops as on SIGTERM (`stop_on_sigterm`)
                return
