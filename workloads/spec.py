"""The workload interface: what the orchestrator may ask of a workload, and nothing more.

A workload (V2PE, PIIP, or one of yours) is a `WorkloadSpec` in the registry
(`workloads/registry.py`). The
orchestrator looks a job's `workload:` name up here and from then on speaks only this
interface: it never imports a workload's model or data code, and never branches on a
workload's name.

- `WorkloadSpec.sections`: the config sections the workload owns (typed dataclasses; the
  orchestrator's config loader builds and checks them with the core sections).
- `WorkloadSpec.prepare_data`: runs once on the driver before the workers start (writes
  synthetic data to the run's storage, say).
- `WorkloadSpec.build_runner`: runs on every worker; returns a `Runner`.
- A `Runner` owns its process groups, engine and data, and does one micro-step at a time,
  returning a `StepResult`. Its optional parts have defaults in `Runner` itself, so the
  orchestrator calls them unconditionally; `None` means "this workload has none".

Beside it: `workloads/fields.py` (config field helpers, `FieldError`, resume rules),
`workloads/scrub.py` (the credential scrub), `workloads/sampling.py` (sample order).

This module imports nothing but the standard library and torch: workloads run on GPU
machines that have only PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .fields import FieldError


@dataclass
class StepResult:
    """One micro-step's outcome, as the training loop logs it.

    `loss` is this micro-step's global loss (the same on every rank); `tokens` the
    tokens it trained on across all ranks (0 when the workload does not count tokens);
    `lr` and `grad_norm` are set on the micro-step that stepped the optimizer; `metrics`
    holds anything else the workload wants logged (PIIP: each branch's step time)."""

    loss: float
    stepped: bool
    tokens: float = 0.0
    lr: float | None = None
    grad_norm: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """What a worker's runner gets from the orchestrator besides its config."""

    rank: int
    world_size: int
    device: torch.device
    run_root: str  # the run's storage prefix (s3://bucket/prefix/<name> or a folder)

    def uri(self, *parts: str) -> str:
        return "/".join([self.run_root.rstrip("/"), *parts])


class Runner:
    """A workload as the training loop sees it. Subclasses set `engine`
    (`workloads.engine.Engine`) and implement `step` and `samples_per_micro`; the
    optional parts below default to "none"."""

    engine: Any

    def step(self, micro: int) -> StepResult:
        """Runs micro-step `micro` (global index: step * grad_accum + m), forward and
        backward, and steps the optimizer when the engine's accumulation is complete."""
        raise NotImplementedError

    @property
    def samples_per_micro(self) -> int:
        """Samples one micro-step trains on across all ranks."""
        raise NotImplementedError

    def layout(self) -> dict[str, int]:
        """The parallel degrees this runner uses ({"dp": 2, "cp": 4}), recorded with each
        checkpoint."""
        return {}

    def export(self, rank: int, url: str) -> str | None:
        """Writes the trained model in the workload's published format under `url`
        (collective: every rank calls it); returns what was written, or None."""
        return None

    def data_report(self) -> dict[str, float] | None:
        """Counts of the data as loaded (samples loaded, skipped by reason) for the
        record, or None."""
        return None

    def data_report_lines(self) -> list[str]:
        return []

    def predicted_memory(self) -> dict[str, float] | None:
        """The planner's bytes per GPU for the last step, by part ("total" among them),
        or None when the workload has no planner."""
        return None

    def tags(self) -> dict[str, str]:
        """What the run resolved that its config left open (e.g. a setting taken from the
        checkpoint), as MLflow tags of the run, set once by rank 0."""
        return {}


@dataclass(kw_only=True, frozen=True)
class Hardware:
    """The GPUs a planner plans for (`longview plan`'s flags)."""

    gpus: int | None = None  # None: the fewest that fit
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    intra_node_gbps: float = 450.0  # GB/s per GPU one way (NVLink 4 on H100)
    inter_node_gbps: float = 50.0  # GB/s per GPU one way (400 Gb/s InfiniBand)
    tflops: float = 989.0  # dense bf16 peak per GPU (H100 SXM)
    efficiency: float = 0.45  # achieved fraction of peak for matmuls and attention


@dataclass(frozen=True)
class Budget:
    """How much a run is to do, for the planner's hours (`longview plan --samples --epochs`):
    samples per epoch (None: what the job's config says, if it says), epochs."""

    samples: int | None = None
    epochs: float = 1.0


@dataclass(frozen=True)
class Command:
    """A subcommand of `longview` that a workload brings (PIIP: `longview flops`).
    `run(args)` returns the text to print; a ValueError is shown as one line."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]  # argparse parser -> None
    run: Callable[[Any], str]


@dataclass
class EvalResult:
    """What an evaluation reports: a Markdown table for people, records for programs,
    and metrics for MLflow: `metrics` as single values, `curves` as {name: {x: value}},
    logged with the step set to x (V2PE: the context length), so MLflow's charts draw
    them against x and compare runs."""

    table: str
    records: list[dict]
    metrics: dict[str, float]
    curves: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass
class Comparison:
    """`longview experiment`: runs trained and evaluated alike that differ only in a few
    config keys. The orchestrator trains and evaluates each arm as `<name>-<label>`, in
    order, then asks the workload's `Evaluation.compare` for the joint table and figure."""

    name: str  # the report's file stem: <name>.md, <name>.png
    arms: dict[str, dict[str, Any]]  # label -> config overrides ({"data.position_mode": "default"})
    description: str  # one sentence for the experiment's MLflow run
    params: dict[str, str] = field(default_factory=dict)  # MLflow params of the experiment run


class Evaluation:
    """`longview eval` for a workload: `prepare` on the driver, `run` on every worker;
    `longview experiment` through `comparison` and `compare` (driver)."""

    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        """Writes what evaluation of the model at `model_url` reads (once); returns plain
        data handed to `run`."""
        raise NotImplementedError

    def run(self, cfg, ctx: RunContext, model_url: str, prepared: dict[str, str]) -> EvalResult:
        """Evaluates the model exported at `model_url` (collective over all workers)."""
        raise NotImplementedError

    def params(self, cfg) -> dict[str, str]:
        """What the evaluation was asked to do, as MLflow params of its run."""
        return {}

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        """A PNG of the result (None: no figure)."""
        return None

    def figure_name(self, cfg) -> str:
        """The figure's artifact name in the evaluation's MLflow run: says what it shows."""
        return "result.png"

    def comparison(self, cfg) -> Comparison:
        """The arms of the workload's experiment for this job; raises FieldError naming the
        key when the job cannot be compared (the base: the workload has no experiment)."""
        raise FieldError("workload", f"{cfg.workload!r} has no experiment")

    def compare(self, cfg, results: dict[str, dict]) -> tuple[str, bytes | None]:
        """The joint Markdown table and figure (PNG or None) of the arms' results
        ({label: result dict with "records", "metrics", "curves"})."""
        raise NotImplementedError


class EvaluationByConfig(Evaluation):
    """A workload with several evaluations, chosen by its config (`pick`): every call
    goes to the one the job's config names."""

    def pick(self, cfg) -> Evaluation:
        raise NotImplementedError

    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        return self.pick(cfg).prepare(cfg, run_root, model_url)

    def run(self, cfg, ctx: RunContext, model_url: str, prepared: dict[str, str]) -> EvalResult:
        return self.pick(cfg).run(cfg, ctx, model_url, prepared)

    def params(self, cfg) -> dict[str, str]:
        return self.pick(cfg).params(cfg)

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        return self.pick(cfg).figure(cfg, records)

    def figure_name(self, cfg) -> str:
        return self.pick(cfg).figure_name(cfg)

    def comparison(self, cfg) -> Comparison:
        return self.pick(cfg).comparison(cfg)

    def compare(self, cfg, results: dict[str, dict]) -> tuple[str, bytes | None]:
        return self.pick(cfg).compare(cfg, results)


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: its name, the config sections it owns and what it can do.

    Callables receive the whole job config (`cfg`); they read the core sections
    (`cfg.training`, `cfg.parallelism`, `cfg.resources`) and their own."""

    name: str
    sections: dict[str, type]  # config section name -> dataclass type (defaults must exist)
    build_runner: Callable[[Any, RunContext], Runner]
    # cfg -> None; raises FieldError("dotted.key", "what is wrong") for a job that cannot run
    validate: Callable[[Any], None] = lambda cfg: None
    # (cfg, run_root) -> None: data written once, on the driver, before the workers start
    prepare_data: Callable[[Any, str], None] = lambda cfg, run_root: None
    # cfg -> anything: the job's inputs (data files, a pretrained checkpoint, the tokenizer)
    # checked in seconds before a job is started or submitted; raises naming what is wrong
    check_inputs: Callable[[Any], Any] = lambda cfg: None
    # Core config keys the workload never reads (PIIP: context parallelism, the chunked
    # loss): left out of its MLflow params, so a run shows what shaped it.
    unused_keys: tuple[str, ...] = ()
    # (cfg, run_root) -> where the training data is (logged as the run's MLflow dataset)
    data_source: Callable[[Any, str], str] | None = None
    # cfg -> "dp 2 x cp 4": the job's layout as the CLI prints it
    layout: Callable[[Any], str] = lambda cfg: f"dp {cfg.resources.max_workers}"
    # (cfg, hardware, tiles) -> plain data for `longview plan --json`, and its text form
    plan: Callable[[Any, Any, int | None, Any], dict] | None = None  # (cfg, Hardware, tiles, Budget)
    format_plan: Callable[[dict], str] | None = None
    # `longview eval`: a function returning the workload's `Evaluation` (imported lazily), or None
    evaluation: Callable[[], Evaluation] | None = None
    commands: tuple[Command, ...] = ()  # extra `longview` subcommands
