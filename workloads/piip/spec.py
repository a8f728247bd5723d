"""PIIP registered as a workload: its config section, runner, data and plan."""

from __future__ import annotations

from ..spec import FieldError, RunContext, WorkloadSpec, register
from .config import SECTIONS


def validate(cfg) -> None:
    """Rules that join PIIP's section with the core ones."""
    if cfg.parallelism.cp != 1:
        raise FieldError("parallelism.cp", "PIIP places branches on groups instead; it must be 1")
    layout = cfg.piip.layout(cfg.resources.workers)
    if sum(layout) != cfg.resources.workers:
        raise FieldError("piip.ranks_per_branch", f"{list(layout)} adds up to {sum(layout)}, "
                                                  f"not resources.workers={cfg.resources.workers}")
    if cfg.piip.batch_size < max(layout):
        raise FieldError("piip.batch_size", f"{cfg.piip.batch_size} is smaller than the largest branch group "
                                            f"({max(layout)} ranks): every rank needs at least one sample")


def prepare_data(cfg, run_root: str) -> None:
    """Writes the procedural shapes under <run>/data/shapes once (kept if there)."""
    if cfg.piip.data != "synthetic":
        return
    import fsspec

    from .data import write_shapes
    from .runner import data_root

    url = data_root(cfg, run_root)
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/{cfg.piip.task}"):
        write_shapes(url, cfg.piip.synthetic_samples, size=max(int(r) for r in cfg.piip.resolutions),
                     seed=cfg.training.seed)


def layout(cfg) -> str:
    return f"ranks per branch {list(cfg.piip.layout(cfg.resources.workers))}"


def build_runner(cfg, ctx: RunContext):
    from .runner import PIIPRunner

    return PIIPRunner(cfg, ctx)


def plan(cfg, hw, tiles):
    from .flops import plan_job

    return plan_job(cfg, hw, tiles)


def format_plan(answer: dict) -> str:
    from .flops import format_plan as fmt

    return fmt(answer)


SPEC = register(WorkloadSpec(name="piip", sections=SECTIONS, build_runner=build_runner, validate=validate,
                             prepare_data=prepare_data, layout=layout, plan=plan, format_plan=format_plan))
