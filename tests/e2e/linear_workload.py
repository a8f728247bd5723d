"""A third workload, defined outside longview's packages: linear regression on random
data, data parallel over every worker. Registered when this module is imported (the
tests list it in LONGVIEW_WORKLOADS), it runs through `longview train` like V2PE and
PIIP: the proof that the orchestrator knows no workload by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workloads.engine import build_engine
from workloads.fields import FieldError, bounded
from workloads.registry import register
from workloads.spec import RunContext, Runner, StepResult, WorkloadSpec


@dataclass(kw_only=True, frozen=True)
class LinearSection:
    features: int = bounded(8, gt=0)
    batch_size: int = bounded(32, gt=0)  # global batch; split over the workers
    noise: float = bounded(0.01, ge=0)


class LinearRunner(Runner):
    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.rank, self.world = cfg, ctx.rank, ctx.world_size
        torch.manual_seed(cfg.training.seed)  # same initial weights on every rank
        self.true_w = torch.randn(cfg.linear.features, 1, generator=torch.Generator().manual_seed(1234))
        self.engine = build_engine(torch.nn.Linear(cfg.linear.features, 1), cfg.training)

    @property
    def samples_per_micro(self) -> int:
        return self.cfg.linear.batch_size

    def step(self, micro: int) -> StepResult:
        c = self.cfg.linear
        g = torch.Generator().manual_seed(self.cfg.training.seed * 1_000_003 + micro)  # the batch of this micro-step
        x = torch.randn(c.batch_size, c.features, generator=g)  # (B, F)
        y = x @ self.true_w + c.noise * torch.randn(c.batch_size, 1, generator=g)  # (B, 1)
        mine = slice(self.rank, None, self.world)  # this rank's rows
        # this rank's share of the global mean: the engine sums gradients over ranks
        loss = ((self.engine.module(x[mine]) - y[mine]) ** 2).sum() / c.batch_size
        self.engine.backward(loss)
        stepped = self.engine.step()
        total = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(total)
        return StepResult(loss=float(total), stepped=stepped, lr=self.engine.lr if stepped else None,
                          grad_norm=self.engine.last_grad_norm if stepped else None)


def _validate(cfg) -> None:
    if cfg.linear.batch_size < cfg.resources.workers:
        raise FieldError("linear.batch_size", f"{cfg.linear.batch_size} is smaller than resources.workers")


SPEC = register(WorkloadSpec(name="linear", sections={"linear": LinearSection}, build_runner=LinearRunner,
                             validate=_validate))
