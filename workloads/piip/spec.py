"""PIIP registered as a workload: its config section, runner, data and plan."""

from __future__ import annotations

from ..fields import FieldError
from ..registry import lazy, register
from ..spec import Command, WorkloadSpec
from .config import SECTIONS


def validate(cfg) -> None:
    """Rules that join PIIP's section with the core ones."""
    if cfg.parallelism.cp != 1:
        raise FieldError("parallelism.cp", "PIIP places branches on groups instead; it must be 1")
    if cfg.resources.elastic:
        raise FieldError("resources.workers", f"{cfg.resources.workers}: PIIP's branch groups are laid out for "
                                              "one worker count; give a count, not [min, max]")
    layout = cfg.piip.layout(cfg.resources.max_workers)
    if sum(layout) != cfg.resources.max_workers:
        raise FieldError("piip.ranks_per_branch", f"{list(layout)} adds up to {sum(layout)}, "
                                                  f"not resources.workers={cfg.resources.workers}")
    if cfg.piip.batch_size < max(layout):
        raise FieldError("piip.batch_size", f"{cfg.piip.batch_size} is smaller than the largest branch group "
                                            f"({max(layout)} ranks): every rank needs at least one sample")


def check_inputs(cfg) -> None:
    """The dataset is there (the procedural one is written by prepare_data)."""
    if cfg.piip.data == "synthetic":
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.piip.data)
    if cfg.piip.task == "detection":
        if not fs.isfile(root):
            raise FieldError("piip.data", f"{cfg.piip.data} is not a file (a COCO instances JSON)")
        return
    if not fs.isdir(root):
        raise FieldError("piip.data", f"{cfg.piip.data} is not a folder (an image folder per class is expected)")


def prepare_data(cfg, run_root: str) -> None:
    """Writes the procedural shapes under <run>/data/shapes once (kept if there)."""
    if cfg.piip.data != "synthetic":
        return
    import fsspec

    # the spec registers without importing the workload's data, model or runner
    from .data import write_shapes
    from .runner import data_root

    if cfg.piip.task == "detection":
        from .coco import write_shapes_coco
        from .runner import train_annotations

        fs, path = fsspec.core.url_to_fs(train_annotations(cfg, run_root))
        if not fs.exists(path):
            write_shapes_coco(train_annotations(cfg, run_root).rsplit("/", 1)[0], cfg.piip.synthetic_samples,
                              size=max(int(r) for r in cfg.piip.resolutions), seed=cfg.training.seed)
        return
    url = data_root(cfg, run_root)
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/{cfg.piip.task}"):
        write_shapes(url, cfg.piip.synthetic_samples, size=max(int(r) for r in cfg.piip.resolutions),
                     seed=cfg.training.seed)


def layout(cfg) -> str:
    return f"ranks per branch {list(cfg.piip.layout(cfg.resources.max_workers))}"


SPEC = register(WorkloadSpec(
    name="piip", sections=SECTIONS, validate=validate, prepare_data=prepare_data, check_inputs=check_inputs,
    layout=layout,
    build_runner=lazy("workloads.piip.runner:PIIPRunner"), data_source=lazy("workloads.piip.runner:task_root"),
    evaluation=lazy("workloads.piip.evaluate:PIIPEvaluation"),
    unused_keys=("parallelism.cp", "parallelism.cp_a2a", "training.loss_chunk_tokens",
                 "training.activation_checkpointing"),
    plan=lazy("workloads.piip.plan:plan_job"), format_plan=lazy("workloads.piip.plan:format_plan"),
    commands=(Command("flops", "backbone GFLOPs of a PIIP variant or ViT baseline",
                      lazy("workloads.piip.flops:add_flops_arguments"), lazy("workloads.piip.flops:flops_command")),),
))
