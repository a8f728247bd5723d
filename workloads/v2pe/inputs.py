"""What a V2PE job reads before any worker starts: its model's config, its tokenizer
(checked against the model's vocabulary), its training data (written once when
synthetic, indexed once on the driver)."""

from __future__ import annotations

from ..data_errors import DataError
from .hf_checkpoint import read_config
from .spec import validate
from .stream import prepare_sources
from .synth import SynthConfig, write_dataset
from .tokenizer import check_fits, resolve_tokenizer


def train_path(cfg, run_root: str) -> str:
    """The training JSONL: the configured one, or the synthetic set `prepare_data` wrote."""
    if cfg.data.train != "synthetic":
        return cfg.data.train
    return f"{run_root.rstrip('/')}/data/train/data.jsonl"


def job_tokenizer(cfg, checkpoint: str | None = None, model_cfg=None):
    """The tokenizer of `data.tokenizer` for the job's model (or `checkpoint`), checked to
    fit the model's vocabulary."""
    checkpoint = checkpoint or cfg.model.pretrained
    if model_cfg is None:
        model_cfg = read_config(checkpoint) if checkpoint else cfg.model.config()
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, checkpoint)
    check_fits(tokenizer, model_cfg.llm.vocab_size, checkpoint or f"size {cfg.model.size!r}")
    return tokenizer


def check_inputs(cfg):
    """What the job reads before it writes anything, checked in seconds: the pretrained
    checkpoint's config.json (and the heads it implies), the tokenizer against the
    model's vocabulary, the training file. Returns (model config, tokenizer)."""
    import fsspec

    mc = job_model_config(cfg)
    if cfg.model.pretrained:  # the checkpoint's own heads, now that its config.json is read
        validate(cfg, mc)
    tokenizer = job_tokenizer(cfg, model_cfg=mc)
    if cfg.data.train != "synthetic":
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

    path = train_path(cfg, run_root)
    if cfg.data.train == "synthetic":
        fs, key = fsspec.core.url_to_fs(path)
        if not fs.exists(key):
            s = cfg.data.synthetic
            synth = SynthConfig(tokens=s.tokens, images=s.images, min_images=s.min_images, task=s.task, tile=mc.vision.image_size,
                                tokens_per_tile=mc.tokens_per_tile, seed=s.seed)
            write_dataset(path.rsplit("/", 1)[0], synth, s.samples, tokenizer)
    # Once, here on the driver: the workers read the indexes, not the whole files.
    prepare_sources(path, run_root, tokenizer=tokenizer, cfg=cfg.data.loader(mc))


def job_model_config(cfg):
    """The model's config: the pretrained checkpoint's config.json, else the named size."""
    if cfg.model.pretrained:
        return read_config(cfg.model.pretrained)
    return cfg.model.config()
