"""The job config: one typed YAML file for both workloads.

Every section is a narrow `@dataclass(kw_only=True)`; `load_config` builds them from
YAML, and any unknown key, wrong type or contradiction is a `ConfigError` that names
the key, the bad value and what is allowed. Credentials are never part of the config:
they come from the environment (AWS_ACCESS_KEY_ID, ...) or the standard AWS files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    pass


@dataclass(kw_only=True, frozen=True)
class ModelSection:
    size: str = "tiny"
    # Field overrides of the named size, e.g. {"vision_image_size": 56} (see model_config).
    overrides: dict = field(default_factory=dict)
    pretrained: str | None = None  # InternVL2 checkpoint folder, local or s3://


@dataclass(kw_only=True, frozen=True)
class SyntheticSection:
    tokens: int = 2048
    images: int = 2
    task: Literal["marked", "count", "colour"] = "marked"
    samples: int = 16
    seed: int = 0


@dataclass(kw_only=True, frozen=True)
class DataSection:
    train: str = "synthetic"  # "synthetic" or a JSONL path / URL
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    max_tokens: int = 8192
    max_tiles: int = 6
    position_mode: Literal["default", "v2pe_fix", "v2pe_rnd"] = "v2pe_rnd"
    position_stride: int | None = None
    # A sample that cannot be used (unreadable image, '<image>' count that does not match
    # its images, empty conversation, longer than max_tokens, not JSON): "fail" stops the
    # job naming it; "skip" leaves it out, counted by reason in the log and in MLflow.
    on_bad_sample: Literal["fail", "skip"] = "fail"


@dataclass(kw_only=True, frozen=True)
class ParallelismSection:
    cp: int = 1  # context-parallel degree; dp = workers / cp
    # All-to-all degree inside the context-parallel group (hybrid context parallelism):
    # heads are exchanged all-to-all among cp_a2a adjacent ranks (one node), the ring runs
    # over cp / cp_a2a groups. 1: plain ring; cp_a2a = cp: all-to-all only.
    cp_a2a: int = 1
    timeout_s: float = 600.0  # collective timeout: a stuck peer fails the run after this


@dataclass(kw_only=True, frozen=True)
class TrainingSection:
    steps: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker failures Ray Train recovers from (resuming the last checkpoint)
    seed: int = 0
    sharding: Literal["deepspeed", "none"] = "none"
    zero_stage: int = 1
    bf16: bool = False
    loss_chunk_tokens: int = 4096
    activation_checkpointing: bool = True


@dataclass(kw_only=True, frozen=True)
class EvaluationSection:
    lengths: list = field(default_factory=list)  # token lengths of synthetic eval samples
    strides: list = field(default_factory=lambda: [256, 64])  # δ = stride/256
    samples_per_length: int = 4
    images: int = 2
    task: Literal["marked", "count", "colour"] = "marked"


@dataclass(kw_only=True, frozen=True)
class StorageSection:
    uri: str = ""  # s3://bucket/prefix (or a local folder for one-machine runs)
    endpoint_url: str | None = None  # S3-compatible endpoint; None = AWS
    # Attempts per S3 request when the endpoint cannot be reached, waiting 0.1 s x 1.7^i
    # (at most 15 s) between them: 8 ride out ~10 s of outage, 10 ~29 s, 12 ~59 s. A
    # checkpoint whose upload still fails ends the worker group (training.max_failures).
    retries: int = 10


@dataclass(kw_only=True, frozen=True)
class TrackingSection:
    uri: str | None = None  # MLflow tracking server; None = no tracking
    experiment: str | None = None  # default: longview-<workload>


@dataclass(kw_only=True, frozen=True)
class ResourcesSection:
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    custom: dict = field(default_factory=dict)  # custom Ray resources per worker, e.g. {accelerator_h100: 1}


@dataclass(kw_only=True, frozen=True)
class PIIPSection:
    variant: str = "piip-tiny"
    resolutions: list = field(default_factory=lambda: [32, 48, 64])  # one per branch, any order
    interactions: int | None = None  # default: the smallest branch depth
    attn_type: Literal["deform", "plain"] = "deform"
    task: Literal["classification", "segmentation"] = "classification"
    ranks_per_branch: list = field(default_factory=list)  # empty: proposed from the branches' FLOPs
    data: str = "synthetic"  # "synthetic" (procedural shapes) or an image-folder URL
    synthetic_samples: int = 64
    batch_size: int = 4  # global batch; each branch splits it over its ranks


@dataclass(kw_only=True, frozen=True)
class JobConfig:
    name: str
    workload: Literal["v2pe", "piip"]
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    piip: PIIPSection = field(default_factory=PIIPSection)

    @property
    def dp(self) -> int:
        return self.resources.workers // self.parallelism.cp

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"longview-{self.workload}"


# --- building dataclasses from plain data, with errors that name the key ---------------------


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if not isinstance(value, want):
            raise ConfigError(f"{key}: expected a {want.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in the schema, not in the input


def build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key{hint} (allowed: {', '.join(fields)})")
        out[key] = _convert(value, hints[key], path)
    for name, f in fields.items():
        if name not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: required key is missing")
    return cls(**out)


def _positive(key: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


MAX_WORKERS = 100_000  # a bound for sanity checks: layouts are searched up to it


def validate(cfg: JobConfig) -> JobConfig:
    """Cross-field checks: layouts that cannot work are errors before anything starts."""
    import re  # noqa: PLC0415

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", cfg.name):
        raise ConfigError(f"name: {cfg.name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    for key, value in flatten(to_dict(cfg)).items():  # NaN passes every comparison below
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    for key, value in (("training.seed", cfg.training.seed), ("data.synthetic.seed", cfg.data.synthetic.seed),
                       ("training.max_failures", cfg.training.max_failures)):
        _positive(key, value, allow_zero=True)
    if cfg.resources.workers > MAX_WORKERS:
        raise ConfigError(f"resources.workers: {cfg.resources.workers} is more than {MAX_WORKERS}")
    for key, value in [
        ("parallelism.cp", cfg.parallelism.cp), ("parallelism.cp_a2a", cfg.parallelism.cp_a2a),
        ("parallelism.timeout_s", cfg.parallelism.timeout_s),
        ("resources.workers", cfg.resources.workers), ("training.steps", cfg.training.steps),
        ("training.lr", cfg.training.lr), ("training.grad_accum", cfg.training.grad_accum),
        ("training.checkpoint_every", cfg.training.checkpoint_every),
        ("training.keep_checkpoints", cfg.training.keep_checkpoints),
        ("training.loss_chunk_tokens", cfg.training.loss_chunk_tokens), ("data.max_tokens", cfg.data.max_tokens),
        ("data.max_tiles", cfg.data.max_tiles), ("data.synthetic.tokens", cfg.data.synthetic.tokens),
        ("data.synthetic.samples", cfg.data.synthetic.samples), ("data.synthetic.images", cfg.data.synthetic.images),
        ("evaluation.samples_per_length", cfg.evaluation.samples_per_length),
        ("evaluation.images", cfg.evaluation.images), ("storage.retries", cfg.storage.retries),
    ]:
        _positive(key, value)
    for key, value in [("training.weight_decay", cfg.training.weight_decay),
                       ("training.warmup_steps", cfg.training.warmup_steps),
                       ("training.grad_clip", cfg.training.grad_clip),
                       ("resources.gpus_per_worker", cfg.resources.gpus_per_worker),
                       ("resources.cpus_per_worker", cfg.resources.cpus_per_worker)]:
        _positive(key, value, allow_zero=True)
    if cfg.resources.workers % cfg.parallelism.cp:
        raise ConfigError(
            f"parallelism.cp: {cfg.parallelism.cp} does not divide resources.workers={cfg.resources.workers} "
            "(workers = data-parallel x context-parallel)"
        )
    if cfg.parallelism.cp % cfg.parallelism.cp_a2a:
        raise ConfigError(f"parallelism.cp_a2a: {cfg.parallelism.cp_a2a} does not divide parallelism.cp="
                          f"{cfg.parallelism.cp} (cp = all-to-all degree x ring degree)")
    if cfg.training.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"training.zero_stage: {cfg.training.zero_stage!r} is not one of 0, 1, 2, 3")
    if cfg.data.position_mode == "v2pe_fix" and cfg.data.position_stride is None:
        raise ConfigError("data.position_stride: required when data.position_mode is 'v2pe_fix' (δ = stride/256)")
    if cfg.data.position_stride is not None and not 1 <= cfg.data.position_stride <= 256:
        raise ConfigError(f"data.position_stride: {cfg.data.position_stride} is not in 1..256")
    for s in cfg.evaluation.strides:
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 256:
            raise ConfigError(f"evaluation.strides: {s!r} is not an integer in 1..256")
    for n in cfg.evaluation.lengths:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"evaluation.lengths: {n!r} is not a positive integer")
    if cfg.data.train == "synthetic" and cfg.data.synthetic.tokens > cfg.data.max_tokens:
        raise ConfigError(
            f"data.synthetic.tokens: {cfg.data.synthetic.tokens} exceeds data.max_tokens={cfg.data.max_tokens}"
        )
    if cfg.storage.uri.startswith("s3://") and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?",
                                                                cfg.storage.uri):
        raise ConfigError(f"storage.uri: {cfg.storage.uri!r} is not an s3://bucket/prefix URI")
    if cfg.training.sharding == "none" and cfg.training.zero_stage not in (0, 1):
        raise ConfigError("training.zero_stage: only meaningful with training.sharding='deepspeed'")
    if cfg.workload == "piip":
        return _validate_piip(cfg)
    try:
        from workloads.v2pe.model import model_config  # noqa: PLC0415

        llm = model_config(cfg.model.size, **cfg.model.overrides).llm
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    for heads, n in (("num_heads", llm.num_heads), ("num_kv_heads", llm.num_kv_heads)):
        if n % cfg.parallelism.cp_a2a:
            raise ConfigError(f"parallelism.cp_a2a: {cfg.parallelism.cp_a2a} does not divide the model's {heads}={n} "
                              f"(model.size {cfg.model.size!r}); the all-to-all splits heads")
    return cfg


def piip_model_config(cfg: JobConfig):
    from workloads.piip.model import piip_config  # noqa: PLC0415

    p = cfg.piip
    kw = {"attn_type": p.attn_type}
    if p.interactions is not None:
        kw["interactions"] = p.interactions
    return piip_config(p.variant, [int(r) for r in p.resolutions], **kw)


def piip_layout(cfg: JobConfig) -> tuple[int, ...]:
    from workloads.piip.flops import propose_layout  # noqa: PLC0415

    if cfg.piip.ranks_per_branch:
        return tuple(cfg.piip.ranks_per_branch)
    return propose_layout(piip_model_config(cfg), cfg.resources.workers)


def _validate_piip(cfg: JobConfig) -> JobConfig:
    if cfg.parallelism.cp != 1:
        raise ConfigError("parallelism.cp: PIIP places branches on groups instead; it must be 1")
    for key, values in (("piip.resolutions", cfg.piip.resolutions), ("piip.ranks_per_branch", cfg.piip.ranks_per_branch)):
        for r in values:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"{key}: {r!r} is not a positive integer")
    if cfg.piip.interactions is not None:
        _positive("piip.interactions", cfg.piip.interactions)
    _positive("piip.batch_size", cfg.piip.batch_size)
    try:
        model = piip_model_config(cfg)
        layout = piip_layout(cfg)
    except ValueError as e:
        raise ConfigError(f"piip: {e}") from None
    if len(layout) != len(model.branches):
        raise ConfigError(f"piip.ranks_per_branch: {list(layout)} has {len(layout)} entries for "
                          f"{len(model.branches)} branches")
    if sum(layout) != cfg.resources.workers:
        raise ConfigError(f"piip.ranks_per_branch: {list(layout)} adds up to {sum(layout)}, "
                          f"not resources.workers={cfg.resources.workers}")
    if cfg.piip.batch_size < max(layout):
        raise ConfigError(f"piip.batch_size: {cfg.piip.batch_size} is smaller than the largest branch group "
                          f"({max(layout)} ranks): every rank needs at least one sample")
    _positive("piip.synthetic_samples", cfg.piip.synthetic_samples)
    return cfg


def load_config(path_or_text: str, *, overrides: dict | None = None) -> JobConfig:
    """Reads a YAML file (or YAML text) into a validated JobConfig.

    `overrides` are dotted keys ("training.steps": 5) applied on top, as the CLI's
    `--set key=value` does.
    """
    import os  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    text = open(path_or_text).read() if os.path.exists(path_or_text) else path_or_text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {p} is not a section")
        node[parts[-1]] = value
    return validate(build(JobConfig, data))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
