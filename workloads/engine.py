"""Optimizer, schedule and parameter/optimizer-state sharding for both workloads.

`build_engine` returns an `Engine` with one interface whatever shards the state:

- `sharding="deepspeed"`: DeepSpeed ZeRO with the configured stage (V2PE's reference
  trains with ZeRO-3, PIIP's with ZeRO-1). All ranks, context-parallel ones included,
  form DeepSpeed's data-parallel world: every rank holds a full model replica's worth
  of parameters logically, so ZeRO shards optimizer state (1), gradients (2) and
  parameters (3) over all of them.
- `sharding="none"`: plain torch optimizer, gradients summed with all-reduce (for one
  process, tests and debugging).

Loss convention (workloads/v2pe/train.py): each rank's loss is its share of the
global token mean, so gradients must be *summed* over ranks. DeepSpeed averages over
its world, so the engine multiplies the loss by the world size first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from parallelism.dims import named_collectives

from .spec import FieldError, bounded


@dataclass(kw_only=True, frozen=True)
class TrainingConfig:
    """The job's `training:` section, used as it is by the engine and the training loop.

    Bounds sit on the fields; the config loader checks them and names the key."""

    steps: int = bounded(10, gt=0)  # optimizer steps; also the schedule's length
    lr: float = bounded(1e-4, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    beta1: float = bounded(0.9, ge=0, le=1)
    beta2: float = bounded(0.95, ge=0, le=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # cosine decay ends at min_lr_ratio * lr
    grad_accum: int = bounded(1, gt=0)
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    sharding: Literal["deepspeed", "none"] = "none"
    zero_stage: Literal[0, 1, 2, 3] = 1
    bf16: bool = False
    checkpoint_every: int = bounded(5, gt=0)
    keep_checkpoints: int = bounded(2, gt=0)
    max_failures: int = bounded(3, ge=0)  # worker failures Ray Train recovers from (resuming the last checkpoint)
    seed: int = bounded(0, ge=0)
    # Used by workloads with a chunked loss and activation checkpointing (V2PE).
    loss_chunk_tokens: int = bounded(4096, gt=0)
    activation_checkpointing: bool = True

    def __post_init__(self):
        if self.sharding == "none" and self.zero_stage not in (0, 1):
            raise FieldError("zero_stage", "only meaningful with training.sharding='deepspeed'")


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
                 owned: dict[str, object] | None = None):
        # owned: parameter name -> process group that shares it. Set for models whose
        # ranks hold different parts (PIIP branches): each gradient is summed within its
        # group only, and parameters this rank does not own are never stepped here.
        self.owned = owned
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ds = ds_engine
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._micro = 0
        self.last_grad_norm = float("nan")

    @property
    def module(self):
        return self.ds.module if self.ds is not None else self.model

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            # DeepSpeed averages over ranks and divides by grad_accum: undo both, since
            # our rank losses are already shares of the global mean per micro-step.
            self.ds.backward(loss * self.world * self.grad_accum)
        else:
            loss.backward()
        self._micro += 1

    def step(self) -> bool:
        """Optimizer step once every grad_accum micro-steps; True when it stepped."""
        if self.ds is not None:
            boundary = self.ds.is_gradient_accumulation_boundary()
            self.ds.step()
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
            if self.world > 1:
                with named_collectives(None, "gradient all-reduce"):
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)  # sum: rank losses are shares of the global mean
        if self.grad_accum > 1:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.grad_accum)
        if self.owned is not None:
            norm = self._global_norm(params)
            if self.grad_clip > 0 and norm > self.grad_clip:
                for p in params:
                    p.grad.mul_(self.grad_clip / (norm + 1e-6))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.last_grad_norm = float(norm)
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


def build_engine(model: torch.nn.Module, cfg: TrainingConfig, owned: dict[str, object] | None = None) -> Engine:
    if cfg.sharding == "none":
        opt = _adamw(model.parameters(), cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        return Engine(model, opt, sched, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum, owned=owned)
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
    return Engine(model, ds_opt, ds_sched, ds_engine, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum)
