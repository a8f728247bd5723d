"""V2PE registered as a workload: its config sections, runner, data, plan and evaluation."""

from __future__ import annotations

from ..fields import FieldError
from ..registry import lazy, register
from ..spec import WorkloadSpec
from .config import SECTIONS


def validate(cfg, model_cfg=None) -> None:
    """Rules that join V2PE's sections with the core ones. `model_cfg`: the model the job
    trains when known (a checkpoint's config.json), else the named size's."""
    mc = model_cfg or cfg.model.config()
    llm = mc.llm
    cfg.data.positions(mc)  # a v2pe_fix without a stride from the config or the checkpoint
    model = cfg.model.pretrained if model_cfg is not None else f"model.size {cfg.model.size!r}"
    a2a = cfg.parallelism.cp_a2a
    for heads, n in (("num_heads", llm.num_heads), ("num_kv_heads", llm.num_kv_heads)):
        if n % a2a:
            raise FieldError("parallelism.cp_a2a", f"{a2a} does not divide the model's {heads}={n} "
                                                   f"({model}); the all-to-all splits heads")


def layout(cfg) -> str:
    p = cfg.parallelism
    hybrid = f" (all-to-all {p.cp_a2a} x ring {p.cp // p.cp_a2a})" if p.cp_a2a > 1 else ""
    return f"dp {cfg.dp} x cp {p.cp}{hybrid}"


SPEC = register(WorkloadSpec(
    name="v2pe", sections=SECTIONS, validate=validate, prepare_data=lazy("workloads.v2pe.inputs:prepare_data"),
    check_inputs=lazy("workloads.v2pe.inputs:check_inputs"),
    layout=layout,
    build_runner=lazy("workloads.v2pe.runner:V2PERunner"), data_source=lazy("workloads.v2pe.inputs:train_path"),
    plan=lazy("workloads.v2pe.plan:plan_job"), format_plan=lazy("workloads.v2pe.plan:format_plan"),
    evaluation=lazy("workloads.v2pe.evaluate:V2PEEvaluation"),
))
