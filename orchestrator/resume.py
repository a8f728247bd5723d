"""What a resumed run may change: the config its newest checkpoint was written with
against the one it is started with, checked on the driver before any worker starts.

Every checkpoint's manifest records the job config that wrote it. A changed key is
classified by the rule its config section declares (`workloads.spec`: APPLY, NEW_RUN,
REFUSE): APPLY keys take effect from the resumed step and are put on the run's record;
NEW_RUN and REFUSE keys end the start with `ResumeRefused`, naming every such key with
its old and new value. Two rules join keys: a data-parallel degree that changes (workers
or cp) changes the samples per step unless `training.global_batch` fixes them, and
DeepSpeed's ZeRO shards resume only on as many workers as wrote them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from workloads.fields import APPLY, NEW_RUN, REFUSE

from .config import ConfigError, to_dict

log = logging.getLogger(__name__)


class ResumeRefused(ConfigError):
    """The job's config differs from its checkpoint's in a way the run cannot take."""


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object
    rule: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def changes(old: dict, cfg) -> list[Change]:
    """Every config field whose value differs between the recorded config `old` and
    `cfg`, with its rule: the field's own in its section's RESUME; a field of a nested
    section that declares none has its section's (data.synthetic.* that of
    data.synthetic). Fields the record does not have (a newer longview added them) are
    not compared."""
    out: list[Change] = []

    def walk(node, before: dict, prefix: str, inherited: str) -> None:
        rules = getattr(type(node), "RESUME", None)
        for f in dataclasses.fields(node):
            key = f"{prefix}{f.name}"
            if f.name not in before:
                continue
            own = inherited if rules is None else rules.get(f.name, NEW_RUN)
            if prefix == "" and f.name in ("name", "workload"):
                own = REFUSE
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value) and isinstance(before[f.name], dict):
                walk(value, before[f.name], f"{key}.", own)
                continue
            plain = to_dict(value) if dataclasses.is_dataclass(value) else value
            if before[f.name] != plain:
                out.append(Change(key, before[f.name], plain, own))

    walk(cfg, old, "", NEW_RUN)
    return out


def _dp(job: dict) -> int:
    workers = job["resources"]["workers"]
    return (workers[-1] if isinstance(workers, list) else workers) // job["parallelism"]["cp"]


def check(old: dict, cfg, *, checkpoint: str, world_size: int, engine: str) -> list[Change]:
    """The changes a resume from `checkpoint` (written by `world_size` workers with
    `engine`, by the job config `old`) applies; raises ResumeRefused naming every change
    it cannot take, and what to do instead."""
    found = changes(old, cfg)
    refused = [c for c in found if c.rule != APPLY]
    why = {c.key: ("incompatible with the checkpoint" if c.rule == REFUSE else "can change only in a new run")
           for c in refused}
    new = to_dict(cfg)
    if _dp(old) != _dp(new) and old["training"]["global_batch"] is None and new["training"]["global_batch"] is None:
        for key in ("resources.workers", "parallelism.cp"):
            c = next((c for c in found if c.key == key), None)
            if c is not None and c not in refused:
                refused.append(c)
                why[key] = (f"the data-parallel degree {_dp(old)} -> {_dp(new)} changes the samples per step "
                            "without training.global_batch")
    if engine == "deepspeed" and cfg.resources.max_workers != world_size:
        c = next((c for c in found if c.key == "resources.workers"), Change("resources.workers", world_size,
                                                                             cfg.resources.workers, REFUSE))
        if c not in refused:
            refused.append(c)
        why[c.key] = (f"DeepSpeed's ZeRO shards resume only on as many workers as wrote them ({world_size}); "
                      "training.sharding=fsdp reshards")
    if refused:
        listed = "; ".join(f"{c} ({why[c.key]})" for c in refused)
        raise ResumeRefused(f"run {cfg.name} cannot resume from {checkpoint} with this config: {listed}. Set these "
                            "keys back to the checkpoint's values, or start a new run under another name")
    return found


def describe(applied: list[Change]) -> str:
    """The applied changes as one line for the run's record ("" when none)."""
    return "; ".join(str(c) for c in applied)
