"""The job config: one typed YAML file; the core sections are here, each workload adds its own.

Core sections (`parallelism`, `training`, `storage`, `tracking`, `resources`) are
dataclasses owned by the code that uses them (`training` is `workloads.engine.TrainingConfig`);
a workload's sections come from its `WorkloadSpec.sections`. `load_config` builds them
from YAML: any unknown key, wrong type, value out of its field's bounds or broken rule is
a `ConfigError` that names the dotted key, the bad value and what is allowed.
Credentials are never part of the config: they come from the environment
(AWS_ACCESS_KEY_ID, ...) or the standard AWS files.

Why dataclasses and not pydantic: the sections live in `workloads/`, which must import
with nothing but torch (GPU machines that run the kernels have no pydantic); bounds ride
on the fields as metadata (`workloads.fields.bounded`) and this module checks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from parallelism.attention_kernels import KERNEL_CHOICES
from workloads import registry
from workloads.engine import TrainingConfig
from workloads.fields import APPLY, NEW_RUN, FieldError, bound_error, bounded, no_credentials
from workloads.scrub import scrub_credentials
from workloads.spec import WorkloadSpec

from .checkpoint_formats import CheckpointError, format_for
from .storage import backend_for


class ConfigError(ValueError):
    """A config that cannot run; its message names the key, with any URI credentials in
    the value scrubbed (`scrub_credentials`): config errors are printed and tagged."""

    def __init__(self, message: str):
        super().__init__(scrub_credentials(str(message)))


@dataclass(kw_only=True, frozen=True)
class ParallelismSection:
    # cp itself may change on resume; a change of the data-parallel degree it brings is
    # checked with the worker count (`orchestrator.resume`).
    RESUME: ClassVar[dict[str, str]] = dict.fromkeys(("cp", "cp_a2a", "timeout_s", "kernel"), APPLY)
    cp: int = bounded(1, gt=0)  # context-parallel degree; dp = workers / cp
    # All-to-all degree inside the context-parallel group (hybrid context parallelism):
    # heads are exchanged all-to-all among cp_a2a adjacent ranks (one node), the ring runs
    # over cp / cp_a2a groups. 1: plain ring; cp_a2a = cp: all-to-all only.
    cp_a2a: int = bounded(1, gt=0)
    timeout_s: float = bounded(600.0, gt=0)  # collective timeout: a stuck peer fails the run after this
    # The attention kernel: a block kernel inside longview's ring
    # (parallelism/attention_kernels.py; "auto" takes the fastest the device supports) or
    # "ring_flash_attn", ring-flash-attn's whole ring (the gpu extra). One the workers'
    # device cannot run fails at their start with KernelUnavailable, naming what can.
    kernel: str = "auto"

    def __post_init__(self):
        if self.kernel not in KERNEL_CHOICES:
            raise FieldError("kernel", f"{self.kernel!r} is unknown; choose one of {', '.join(KERNEL_CHOICES)}")
        if self.cp % self.cp_a2a:
            raise FieldError("cp_a2a", f"{self.cp_a2a} does not divide parallelism.cp={self.cp} "
                                       "(cp = all-to-all degree x ring degree)")


@dataclass(kw_only=True, frozen=True)
class StorageSection:
    # The uri is where the run is (another uri is another run); the endpoint may move.
    RESUME: ClassVar[dict[str, str]] = {"uri": NEW_RUN, "endpoint_url": APPLY, "retries": APPLY}
    uri: str = ""  # s3://bucket/prefix (or a local folder for one-machine runs)
    endpoint_url: str | None = None  # S3-compatible endpoint; None = AWS
    # Attempts per S3 request when the endpoint cannot be reached, waiting 0.1 s x 1.7^i
    # (at most 15 s) between them: 8 ride out ~10 s of outage, 10 ~29 s, 12 ~59 s. A
    # checkpoint whose upload still fails ends the worker group (training.max_failures).
    retries: int = bounded(10, gt=0)

    def __post_init__(self):
        no_credentials("endpoint_url", self.endpoint_url)
        no_credentials("uri", self.uri)
        try:  # each storage backend checks the form of its own URIs
            why = backend_for(self.uri).check_uri(self.uri) if self.uri else None
        except ValueError as e:
            why = str(e)
        if why:
            raise FieldError("uri", why)


@dataclass(kw_only=True, frozen=True)
class TrackingSection:
    # The server may move (its address changes with `longview up`); the run stays in the
    # experiment it was created in.
    RESUME: ClassVar[dict[str, str]] = {"uri": APPLY, "experiment": NEW_RUN, "wait_s": APPLY, "on_unreachable": APPLY}
    uri: str | None = None  # MLflow tracking server; None = no tracking
    experiment: str | None = None  # default: longview-<workload>
    # How long the end of a run waits for a server that does not answer; what it has not
    # taken then is kept in the run's storage and sent by the next start or `longview runs`.
    wait_s: float = bounded(120.0, ge=0)
    # A server that does not answer when a run starts: "fail" ends the command in one line
    # before anything starts (a run whose results silently miss MLflow is worse); "keep"
    # starts anyway and keeps its records in the run's storage until the server answers.
    on_unreachable: str = "fail"

    def __post_init__(self):
        no_credentials("uri", self.uri)
        if self.on_unreachable not in ("fail", "keep"):
            raise FieldError("on_unreachable", f"{self.on_unreachable!r}: choose 'fail' or 'keep'")


MAX_WORKERS = 100_000  # a bound for sanity checks: layouts are searched up to it


@dataclass(kw_only=True, frozen=True)
class ResourcesSection:
    # Checkpoints reshard to any worker count (DeepSpeed's excepted: `orchestrator.resume`).
    RESUME: ClassVar[dict[str, str]] = dict.fromkeys(("workers", "resize_interval_s", "gpus_per_worker",
                                                      "cpus_per_worker", "custom", "placement_timeout_s"), APPLY)
    # A count, or [min, max] for an elastic run: Ray Train starts with what the cluster
    # holds (at least min) and grows or shrinks the group as nodes come and go.
    workers: int | list[int] = bounded(1, gt=0, le=MAX_WORKERS)
    resize_interval_s: float = bounded(60.0, gt=0)  # how often an elastic run looks for a new size
    gpus_per_worker: float = bounded(0, ge=0)
    cpus_per_worker: float = bounded(1, ge=0)
    custom: dict = field(default_factory=dict)  # custom Ray resources per worker, e.g. {accelerator_h100: 1}
    # How long a run waits for the cluster to place its workers (busy nodes, an autoscaler
    # adding some) before it ends with one line; a line every 15 s says what it waits for.
    # GPU nodes of a cloud autoscaler take minutes to boot.
    placement_timeout_s: float = bounded(900.0, gt=0)

    def __post_init__(self):
        if isinstance(self.workers, list) and (len(self.workers) != 2 or self.workers[0] > self.workers[1]):
            raise FieldError("workers", f"{self.workers!r}: give a count or [min, max] with min <= max")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list) and self.workers[0] < self.workers[1]

    @property
    def max_workers(self) -> int:
        return self.workers[-1] if isinstance(self.workers, list) else self.workers

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers


@dataclass(kw_only=True, frozen=True)
class JobConfig:
    """The core of every job; `load_config` returns a subclass that adds the sections
    of the job's workload (`WorkloadSpec.sections`)."""

    name: str
    workload: str
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.name):
            raise FieldError("name", f"{self.name!r} must be 1-100 letters, digits, '.', '_' or '-'")
        for n in sorted({self.resources.min_workers, self.resources.max_workers}):
            if n % self.parallelism.cp:
                raise FieldError("parallelism.cp", f"{self.parallelism.cp} does not divide {n} workers "
                                                   f"(resources.workers={self.resources.workers}; workers = "
                                                   "data-parallel x context-parallel)")
        if self.resources.elastic and self.training.global_batch is None:
            raise FieldError("training.global_batch", "an elastic run (resources.workers: [min, max]) needs a "
                                                      "fixed global batch: samples per optimizer step")
        if self.resources.elastic:
            # Ray Train may start any count in the range the cluster holds.
            degrees = sorted({n // self.parallelism.cp for n in range(self.resources.min_workers,
                                                                      self.resources.max_workers + 1)
                              if n % self.parallelism.cp == 0})
            bad = [d for d in degrees if self.training.global_batch % d]
            if bad:
                lcm = math.lcm(*degrees)
                raise FieldError("training.global_batch", f"{self.training.global_batch} is not a multiple of "
                                 f"data-parallel degree {bad[0]} (one of {degrees} that resources.workers="
                                 f"{self.resources.workers} allows); use a multiple of {lcm}")
        try:  # the format must hold this engine's state (engine kind = training.sharding)
            format_for(self.training.sharding, self.training.checkpoint_format)
        except CheckpointError as e:
            raise FieldError("training.checkpoint_format", str(e)) from None
        if self.resources.elastic and self.training.sharding == "deepspeed":
            raise FieldError("training.sharding", "'deepspeed' checkpoints resume only on as many workers as "
                                                  "wrote them; an elastic run needs 'fsdp' or 'none'")

    @property
    def dp(self) -> int:
        """Data-parallel degree at the largest worker count."""
        return self.resources.max_workers // self.parallelism.cp

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"longview-{self.workload}"

    @property
    def spec(self) -> WorkloadSpec:
        return workload_spec(self.workload)


@functools.cache
def job_class(workload: str) -> type:
    """JobConfig with the sections of `workload`'s spec."""
    spec = workload_spec(workload)
    clash = set(spec.sections) & {f.name for f in dataclasses.fields(JobConfig)}
    if clash:
        raise ConfigError(f"workload {workload!r} declares sections that are core sections: {sorted(clash)}")
    fields = [(name, tp, field(default_factory=tp)) for name, tp in spec.sections.items()]
    return dataclasses.make_dataclass(f"JobConfig_{workload}", fields, bases=(JobConfig,),
                                      kw_only=True, frozen=True)


def workload_spec(name: str) -> WorkloadSpec:
    try:
        return registry.get(name)
    except ValueError as e:  # a plug-in module that cannot be imported
        raise ConfigError(f"workload: {e}") from None
    except KeyError:
        raise ConfigError(f"workload: {name!r} is not allowed; choose one of "
                          f"{' | '.join(repr(n) for n in registry.names())}") from None


# --- building dataclasses from plain data, with errors that name the key ---------------------


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any, tp, key: str):
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
        if not math.isfinite(value):  # NaN passes every comparison of a bound
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in the schema, not in the input


def _convert(value: Any, tp, key: str, bounds: dict):
    origin = typing.get_origin(tp)
    if origin is Literal:
        # `type(a) is type(value)`: YAML's true must not pass for the integer 1
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _convert(value, real[0], key, bounds)
        for a in real:
            try:
                return _convert(value, a, key, bounds)
            except ConfigError as e:
                if not str(e).startswith(f"{key}: expected"):
                    raise  # the value has this type but breaks its bounds: say so
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, key)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (None,)
        if item_tp is None:
            return value
        for item in value:
            try:
                _scalar(item, item_tp, key)
            except ConfigError:
                raise ConfigError(f"{key}: {item!r} is not {_item_name(item_tp, bounds)}") from None
            if bound_error(item, bounds):
                raise ConfigError(f"{key}: {item!r} is not {_item_name(item_tp, bounds)}")
        return value
    value = _scalar(value, tp, key)
    why = bound_error(value, bounds)
    if why:
        raise ConfigError(f"{key}: {why}")
    return value


def _item_name(tp, bounds: dict) -> str:
    kind = "an integer" if tp is int else "a number"
    if "ge" in bounds and "le" in bounds:
        return f"{kind} in {bounds['ge']:g}..{bounds['le']:g}"
    if bounds.get("ge") == 1 or bounds.get("gt") == 0:
        return f"a positive {kind.split()[-1]}"
    return kind


def build(cls, data: dict, prefix: str = ""):
    """`cls` (a config dataclass) from plain data: unknown keys (with a did-you-mean
    hint), wrong types, broken bounds and the section's own rules are ConfigErrors that
    name the dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key{hint} (allowed: {', '.join(fields)})")
        out[key] = _convert(value, hints[key], path, dict(fields[key].metadata))
    for name, f in fields.items():
        if name not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: required key is missing")
    try:
        return cls(**out)
    except FieldError as e:
        where = ".".join(p for p in (prefix, e.key) if p)
        raise ConfigError(f"{where}: {e.message}" if where else e.message) from None


def validate(cfg: JobConfig) -> JobConfig:
    """The workload's rules that join sections (its spec's `validate`)."""
    try:
        cfg.spec.validate(cfg)
    except FieldError as e:
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path_or_text: str, *, overrides: dict | None = None) -> JobConfig:
    """Reads a YAML file (or YAML text) into a validated job config of its workload.

    `overrides` are dotted keys ("training.steps": 5) applied on top, as the CLI's
    `--set key=value` does.
    """
    import os

    if os.path.isdir(path_or_text):
        raise ConfigError(f"{path_or_text}: is a folder, not a config file")
    if "\n" not in path_or_text and path_or_text.endswith((".yaml", ".yml", ".json")) \
            and not os.path.exists(path_or_text):
        raise ConfigError(f"{path_or_text}: no such config file")
    if os.path.exists(path_or_text):
        size = os.path.getsize(path_or_text)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path_or_text}: {size / 2**20:.1f} MiB is not a job config (at most "
                              f"{MAX_CONFIG_BYTES >> 10} KiB; a config is a few KiB)")
        with open(path_or_text, "rb") as f:
            try:
                text = f.read().decode()
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path_or_text}: not UTF-8 text (byte {e.start})") from None
    else:
        text = path_or_text
    return from_dict(_parse_yaml(text, "config"), overrides=overrides)


MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 100  # a real config uses a handful
MAX_NODES = 100_000  # values in the document once aliases are expanded (an alias bomb: billions)


def _parse_yaml(text: str, what: str):
    """YAML with longview's loader: safe tags only, YAML 1.2 numbers, aliases bounded.
    Any error is a ConfigError saying where."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: {len(text) / 2**20:.1f} MiB of YAML is not a job config")
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    if _expanded_size(data) > MAX_NODES:
        raise ConfigError(f"{what} is not valid YAML: its aliases expand to more than {MAX_NODES} values (an alias "
                          "bomb?): not a job config")
    return data


def _expanded_size(data) -> int:
    """How many values `data` holds with every alias expanded, counted without expanding
    them (an alias is the same object each time it appears)."""
    sizes: dict[int, int] = {}

    def size(x) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if id(x) not in sizes:
            sizes[id(x)] = 0  # a cycle counts once
            items = list(x.keys()) + list(x.values()) if isinstance(x, dict) else x
            sizes[id(x)] = min(1 + sum(size(v) for v in items), MAX_NODES + 1)
        return sizes[id(x)]

    return size(data)


def from_dict(data: dict, *, overrides: dict | None = None) -> JobConfig:
    """A validated job config from plain data (a parsed YAML file, or `to_dict` output),
    with `overrides` (dotted keys) applied on top."""
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
    if "workload" not in data:
        raise ConfigError("workload: required key is missing")
    if not isinstance(data["workload"], str):
        raise ConfigError(f"workload: expected a string, got {data['workload']!r}")
    return validate(build(job_class(data["workload"]), data))


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1's safe loader reading numbers as YAML 1.2 does: `1e-3` and `3e6` are
        floats (1.1 wants `1.0e-3`, and would hand the config a string); at most
        MAX_ALIASES aliases (nested aliases grow a document exponentially)."""

        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name): not a job config")
            return super().compose_node(parent, index)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return Loader


def yaml_value(text: str):
    """One value as YAML reads it with longview's loader (`--set key=value`)."""
    return _parse_yaml(text, "the value")


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
