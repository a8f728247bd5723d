"""V2PE registered as a workload: its config sections, runner, data, plan and evaluation."""

from __future__ import annotations

from ..spec import FieldError, WorkloadSpec, lazy, register
from .config import SECTIONS


def validate(cfg, model_cfg=None) -> None:
    """Rules that join V2PE's sections with the core ones. `model_cfg`: the model the job
    trains when known (a checkpoint's config.json), else the named size's."""
    llm = (model_cfg or cfg.model.config()).llm
    model = cfg.model.pretrained if model_cfg is not None else f"model.size {cfg.model.size!r}"
    a2a = cfg.parallelism.cp_a2a
    for heads, n in (("num_heads", llm.num_heads), ("num_kv_heads", llm.num_kv_heads)):
        if n % a2a:
            raise FieldError("parallelism.cp_a2a", f"{a2a} does not divide the model's {heads}={n} "
                                                   f"({model}); the all-to-all splits heads")


def job_tokenizer(cfg, checkpoint: str | None = None, model_cfg=None):
    """The tokenizer of `data.tokenizer` for the job's model (or `checkpoint`), checked to
    fit the model's vocabulary."""
    from .tokenizer import check_fits, resolve_tokenizer

    checkpoint = checkpoint or cfg.model.pretrained
    if model_cfg is None:
        from .hf_checkpoint import read_config

        model_cfg = read_config(checkpoint) if checkpoint else cfg.model.config()
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, checkpoint)
    check_fits(tokenizer, model_cfg.llm.vocab_size, checkpoint or f"size {cfg.model.size!r}")
    return tokenizer


def check_inputs(cfg):
    """What the job reads before it writes anything, checked in seconds: the pretrained
    checkpoint's config.json (and the heads it implies), the tokenizer against the
    model's vocabulary, the training file. Returns (model config, tokenizer)."""
    import fsspec

    mc = _job_model_config(cfg)
    if cfg.model.pretrained:  # the checkpoint's own heads, now that its config.json is read
        validate(cfg, mc)
    tokenizer = job_tokenizer(cfg, model_cfg=mc)
    if cfg.data.train != "synthetic":
        from .data_errors import DataError

        fs, key = fsspec.core.url_to_fs(cfg.data.train)
        if not fs.isfile(key):
            raise DataError(f"data.train: {cfg.data.train} is not a file", reason="missing_file")
    return mc, tokenizer


def prepare_data(cfg, run_root: str) -> None:
    """Checks the inputs (`check_inputs`); writes the synthetic training set under
    <run>/data/train once (kept if there); indexes the training file once (a configured
    file that is not there, or a bad sample, stops the job before any worker starts)."""
    import fsspec

    mc, tokenizer = check_inputs(cfg)

    from .runner import train_path
    from .stream import prepare_sources

    path = train_path(cfg, run_root)
    if cfg.data.train == "synthetic":
        from .synth import SynthConfig, write_dataset

        fs, key = fsspec.core.url_to_fs(path)
        if not fs.exists(key):
            s = cfg.data.synthetic
            synth = SynthConfig(tokens=s.tokens, images=s.images, min_images=s.min_images, task=s.task, tile=mc.vision.image_size,
                                tokens_per_tile=mc.tokens_per_tile, seed=s.seed)
            write_dataset(path.rsplit("/", 1)[0], synth, s.samples, tokenizer)
    # Once, here on the driver: the workers read the indexes, not the whole files.
    prepare_sources(path, run_root, tokenizer=tokenizer, cfg=cfg.data.loader(mc))


def _job_model_config(cfg):
    """The model's config: the pretrained checkpoint's config.json, else the named size."""
    if cfg.model.pretrained:
        from .hf_checkpoint import read_config

        return read_config(cfg.model.pretrained)
    return cfg.model.config()


def layout(cfg) -> str:
    p = cfg.parallelism
    hybrid = f" (all-to-all {p.cp_a2a} x ring {p.cp // p.cp_a2a})" if p.cp_a2a > 1 else ""
    return f"dp {cfg.dp} x cp {p.cp}{hybrid}"


SPEC = register(WorkloadSpec(
    name="v2pe", sections=SECTIONS, validate=validate, prepare_data=prepare_data, check_inputs=check_inputs,
    layout=layout,
    build_runner=lazy("workloads.v2pe.runner:V2PERunner"), data_source=lazy("workloads.v2pe.runner:train_path"),
    plan=lazy("workloads.v2pe.plan:plan_job"), format_plan=lazy("workloads.v2pe.plan:format_plan"),
    evaluation=lazy("workloads.v2pe.evaluate:NeedleEvaluation"),
))
