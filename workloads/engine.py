"""Optimizer, schedule and parameter/optimizer-state sharding for both workloads.

`build_engine` returns an `Engine` with one interface whatever shards the state:

- `sharding="deepspeed"`: DeepSpeed ZeRO with the configured stage (V2PE's reference
  trains with ZeRO-3, PIIP's with ZeRO-1). All ranks, context-parallel ones included,
  form DeepSpeed's data-parallel world: every rank holds a full model replica's worth
  of parameters logically, so ZeRO shards optimizer state (1), gradients (2) and
  parameters (3) over all of them.
- `sharding="fsdp"`: PyTorch's FSDP2 (`fully_shard`) over all ranks: parameters,
  gradients and optimizer state sharded (ZeRO-3's layout) as DTensors, which
  `torch.distributed.checkpoint` saves per rank and reshards on load, so a checkpoint
  resumes on any number of workers. The workload names the units to wrap (one
  all-gather each: a decoder layer, a vision block).
- `sharding="none"`: plain torch optimizer, gradients summed with all-reduce (for one
  process, tests and debugging).

Gradient accumulation weights each micro-step by its supervised tokens (the workload
passes them to `backward`), so the step's gradient is that of the mean over every token
of the global batch however the batch was split into micro-steps and replicas: the
loss curve does not depend on the worker count. DeepSpeed averages micro-steps instead
(equal weights), which is the same only when micro-steps carry equal token counts.

Loss convention (workloads/v2pe/train.py): each rank's loss is its share of the
global token mean, so gradients must be *summed* over ranks. DeepSpeed averages over
its world, so the engine multiplies the loss by the world size first.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist

from parallelism.dims import named_collectives

from .fields import APPLY, NEW_RUN, REFUSE, FieldError, bounded


@dataclass(kw_only=True, frozen=True)
class TrainingConfig:
    """The job's `training:` section, used as it is by the engine and the training loop.

    Bounds sit on the fields; the config loader checks them and names the key."""

    # On resume: the schedule, the optimizer's settings and the run's safety nets follow
    # the new config from the resumed step (the schedule is recomputed at that step, so a
    # new `steps` or `lr` moves the learning rate there). What fixes the data order
    # (samples per step, seed) or the stored tensors (sharding, precision) is the run's.
    RESUME: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("steps", "lr", "weight_decay", "beta1", "beta2", "eps", "warmup_steps", "min_lr_ratio",
                         "grad_clip", "checkpoint_every", "keep_checkpoints", "max_failures", "on_nonfinite",
                         "max_nonfinite_steps", "loss_chunk_tokens", "activation_checkpointing",
                         "checkpoint_format"), APPLY),
        **dict.fromkeys(("grad_accum", "global_batch", "seed", "bf16"), NEW_RUN),
        **dict.fromkeys(("sharding", "zero_stage"), REFUSE),
    }

    steps: int = bounded(10, gt=0)  # optimizer steps; also the schedule's length
    lr: float = bounded(1e-4, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    beta1: float = bounded(0.9, ge=0, le=1)
    beta2: float = bounded(0.95, ge=0, le=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # cosine decay ends at min_lr_ratio * lr
    grad_accum: int = bounded(1, gt=0)  # micro-steps per optimizer step (when global_batch is unset)
    # Samples per optimizer step across all replicas; when set, grad_accum follows from
    # the data-parallel degree (global_batch / samples per micro-step), so the batch, and
    # with it the loss curve, stays the same when an elastic run changes its worker count.
    global_batch: int | None = bounded(None, gt=0)
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    sharding: Literal["deepspeed", "fsdp", "none"] = "none"
    zero_stage: Literal[0, 1, 2, 3] = 1
    bf16: bool = False
    checkpoint_every: int = bounded(5, gt=0)
    keep_checkpoints: int = bounded(2, gt=0)
    # How checkpoints are written (the orchestrator's checkpoint formats: "dcp",
    # "deepspeed"); "auto": the one that holds this engine's state. Each checkpoint records
    # its format and is read back with it, so a resumed run may change this.
    checkpoint_format: str = "auto"
    max_failures: int = bounded(3, ge=0)  # worker failures Ray Train recovers from (resuming the last checkpoint)
    # A step whose gradient norm (or loss) is not finite is never applied; "stop" ends the
    # run on it, "skip" goes on unless max_nonfinite_steps of them come in a row. Either
    # way no checkpoint holds its result. (DeepSpeed applies its update before the norm is
    # known: with it the run always stops, before any checkpoint of that step.)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_steps: int = bounded(3, gt=0)
    seed: int = bounded(0, ge=0)
    # Used by workloads with a chunked loss and activation checkpointing (V2PE).
    loss_chunk_tokens: int = bounded(4096, gt=0)
    activation_checkpointing: bool = True

    def __post_init__(self):
        if self.sharding != "deepspeed" and self.zero_stage not in (0, 1):
            raise FieldError("zero_stage", "only meaningful with training.sharding='deepspeed'")

    def accumulation(self, samples_per_micro: int, workers: int) -> int:
        """Micro-steps per optimizer step at `samples_per_micro` samples per micro-step."""
        if self.global_batch is None:
            return self.grad_accum
        if self.global_batch % samples_per_micro:
            raise FieldError("global_batch", f"{self.global_batch} is not a multiple of the {samples_per_micro} "
                                             f"samples one micro-step takes on {workers} workers")
        return self.global_batch // samples_per_micro


class DivergenceError(RuntimeError):
    """A step's loss or gradient norm was not finite and the run cannot go on."""


def lr_lambda(cfg: TrainingConfig):
    """Linear warm-up to lr, then cosine decay to min_lr_ratio * lr at total_steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _adamw(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


class Engine:
    """backward / step / state for one model, sharded or not."""

    def __init__(self, model, optimizer, scheduler, ds_engine=None, *, grad_clip: float, grad_accum: int,
                 owned: dict[str, object] | None = None, kind: str = "none"):
        # owned: parameter name -> process group that shares it. Set for models whose
        # ranks hold different parts (PIIP branches): each gradient is summed within its
        # group only, and parameters this rank does not own are never stepped here.
        self.owned = owned
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._configured_lrs = list(scheduler.base_lrs)  # this job's training.lr, whatever a restore loads
        self.ds = ds_engine
        self.kind = kind  # TrainingConfig.sharding
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._micro = 0
        self._weight = 0.0  # sum of the micro-steps' weights since the last optimizer step
        self.last_grad_norm = float("nan")
        self.last_applied = True  # whether the last optimizer step changed the weights

    def set_grad_accum(self, n: int) -> None:
        """Micro-steps per optimizer step (an elastic run derives it from its data-parallel degree)."""
        if self.ds is not None and n != self.grad_accum:
            # DeepSpeed checks train_batch = micro x accumulation x its data-parallel world.
            self.ds.set_train_batch_size(n * self.ds.train_micro_batch_size_per_gpu() * self.ds.dp_world_size)
        self.grad_accum = n

    @property
    def module(self):
        return self.ds.module if self.ds is not None else self.model

    def backward(self, loss: torch.Tensor, weight: float | None = None) -> None:
        """loss: this rank's share of the micro-step's global mean. weight: the micro-step's
        share of the optimizer step, known up to a common factor (its supervised tokens
        over all ranks); None weighs every micro-step alike."""
        if self.ds is not None:
            # DeepSpeed averages over ranks and divides by grad_accum: undo both, since
            # our rank losses are already shares of the global mean per micro-step.
            self.ds.backward(loss * self.world * self.grad_accum)
        else:
            (loss if weight is None else loss * weight).backward()
            self._weight += 1.0 if weight is None else weight
        self._micro += 1

    def step(self) -> bool:
        """Optimizer step once every grad_accum micro-steps; True when it stepped."""
        if self.ds is not None:
            boundary = self.ds.is_gradient_accumulation_boundary()
            self.ds.step()
            self.last_applied = True  # DeepSpeed steps on whatever the norm is
            if boundary:
                norm = self.ds.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else float("nan")
            return boundary
        if self._micro % self.grad_accum:
            return False
        if self.owned is not None:
            params = self._reduce_owned()
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.world > 1 and self.kind == "none":  # FSDP reduce-scatters in the backward
                with named_collectives(None, "gradient all-reduce"):
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)  # sum: rank losses are shares of the global mean
        if self._weight not in (0.0, 1.0):
            # Gradients summed weight x micro-step mean: divide by the weights' sum.
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self._weight)
        self._weight = 0.0
        if self.owned is not None:
            norm = self._global_norm(params)
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in params:
                    p.grad.mul_(self.grad_clip / (norm + 1e-6))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor over the shards
                norm = norm.full_tensor()
        self.last_grad_norm = float(norm)
        # The norm is global (summed gradients, or reduced over the shards), so every rank
        # takes the same branch. A non-finite one would write NaN into every weight and
        # into Adam's moments for good: the update is dropped, the schedule holds.
        self.last_applied = math.isfinite(self.last_grad_norm)
        if self.last_applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _reduce_owned(self) -> list:
        params = []
        for name, p in self.model.named_parameters():
            group = self.owned.get(name)
            if group is None or not p.requires_grad:
                p.grad = None  # not ours: the optimizer skips it
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                with named_collectives(group, f"gradient all-reduce of {name}"):
                    dist.all_reduce(p.grad, group=group)
            params.append(p)
        return params

    def _global_norm(self, params) -> float:
        """L2 norm of the whole model's gradient, each parameter counted once."""
        # Summed where the gradients live, one transfer at the end (not one per parameter).
        sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
        for name, p in self.model.named_parameters():
            group = self.owned.get(name)
            if group is not None and p.grad is not None:
                # Every rank of the group holds the same reduced gradient: count 1/size each.
                sq += p.grad.double().pow(2).sum() / dist.get_world_size(group)
        if dist.is_initialized() and dist.get_world_size() > 1:
            with named_collectives(None, "gradient norm"):
                dist.all_reduce(sq)
        return float(sq.sqrt())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- state as flat tensors, for torch.distributed.checkpoint --------------------------
    # Keys: "model/<state_dict key>" and "optim/<parameter name>/<state key>". Parameter
    # names, not positions, key the optimizer state, so a checkpoint loads into a model
    # sharded differently; under FSDP the values are DTensors, which DCP reshards.

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if self.owned is None or n in self.owned}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's model and optimizer tensors (not copies). Parameters this rank does
        not own (PIIP: other branches) are left out: their owners save them."""
        if self.ds is not None:
            raise ValueError("DeepSpeed saves its own state (engine.ds.save_checkpoint)")
        all_params = dict(self.module.named_parameters())
        mine = self._params()
        out = {f"model/{k}": v for k, v in self.module.state_dict().items() if k not in all_params or k in mine}
        for name, p in mine.items():
            for k, v in self.optimizer.state.get(p, {}).items():
                out[f"optim/{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return out

    def state_templates(self, keys) -> dict[str, torch.Tensor]:
        """Tensors to load a checkpoint holding `keys` into: the model's own, and fresh
        optimizer state for each of this rank's parameters the checkpoint has state of."""
        out = {k: v for k, v in self.state_tensors().items() if k.startswith("model/")}
        params = self._params()
        for key in keys:
            name, _, field = key.removeprefix("optim/").rpartition("/")
            if key.startswith("optim/") and name in params:
                # AdamW keeps its step count as a float32 scalar, its moments like the parameter.
                out[key] = torch.zeros((), dtype=torch.float32) if field == "step" else torch.zeros_like(params[name])
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], scheduler: dict) -> None:
        self.module.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
                                    strict=self.owned is None)
        params = self._params()
        self.optimizer.state.clear()
        for key, v in tensors.items():
            name, _, field = key.removeprefix("optim/").rpartition("/")
            if key.startswith("optim/"):
                self.optimizer.state[params[name]][field] = v
        self.follow_schedule(scheduler)

    def follow_schedule(self, scheduler: dict | None = None) -> None:
        """Puts the schedule at the restored step (`scheduler`: its saved state; None: as
        loaded already, DeepSpeed's case) on this job's curve: LambdaLR's saved state holds
        the learning rate it was built with, which would win over a changed training.lr,
        so the configured one is kept and the optimizer's lr recomputed at that step."""
        configured = self._configured_lrs
        if scheduler is not None:
            self.scheduler.load_state_dict(scheduler)
        self.scheduler.base_lrs = list(configured)
        step = self.scheduler.last_epoch
        for group, base, f in zip(self.optimizer.param_groups, configured, self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * f(step)  # the optimizer's lr is set by the schedule's next step otherwise
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def shard_model(model: torch.nn.Module, mesh, units=(), forward_methods=(), bf16: bool = False) -> None:
    """FSDP2 over `mesh`: each of `units` its own all-gather, the rest with the root.

    forward_methods: methods of `model` called instead of `forward` (FSDP hooks `forward`
    only). Gradients are summed, not averaged, over the mesh (our rank losses are shares
    of the global mean), with a plain sum collective, which gloo also has."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # The forward methods return views (flattened visual tokens); nothing modifies them in
    # place, which is what FSDP's warning about views is for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def build_engine(model: torch.nn.Module, cfg: TrainingConfig, owned: dict[str, object] | None = None, *,
                 mesh=None, units=(), forward_methods=()) -> Engine:
    """mesh, units, forward_methods: for sharding='fsdp' (see `shard_model`)."""
    if cfg.sharding in ("none", "fsdp"):
        if cfg.sharding == "fsdp":
            if owned is not None:
                raise ValueError("training.sharding='fsdp' shards one model over all ranks; PIIP's branch groups "
                                 "hold different parts: use 'none'")
            shard_model(model, mesh, units, forward_methods, bf16=cfg.bf16)
        opt = _adamw(model.parameters(), cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        return Engine(model, opt, sched, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum, owned=owned,
                      kind=cfg.sharding)
    if owned is not None:
        raise ValueError("per-group ownership (PIIP branches) needs sharding='none' for now")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("sharding='deepspeed' needs deepspeed: pip install longview (core dependency)") from e
    opt = _adamw(model.parameters(), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds_engine, ds_opt, _, ds_sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                          config=ds_config)
    return Engine(model, ds_opt, ds_sched, ds_engine, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum,
                  kind="deepspeed")
