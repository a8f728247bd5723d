"""V2PE as the training loop sees it (`workloads.spec.Runner`).

One runner per worker: it builds the process groups (`ParallelDims`: dp x cp, the
all-to-all split for hybrid context parallelism), the model (named size or an InternVL2
checkpoint), the engine, and the packed training rows; `step(micro)` trains one packed
row per data-parallel replica, sharded over the context-parallel group.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.distributed as dist

from parallelism.attention_kernels import check_kernel
from parallelism.dims import ParallelDims, shard_mesh

from ..engine import build_engine
from ..sampling import sample_at
from ..spec import RunContext, Runner, StepResult
from .hf_checkpoint import load_pretrained, save_pretrained
from .inputs import job_tokenizer, train_path
from .model import V2PEModel
from .plan import estimate_memory, job_shape
from .stream import StreamingDataset, open_sources
from .tokenizer import copy_tokenizer
from .train import TrainStepConfig, fsdp_units, parallelize, train_step

log = logging.getLogger(__name__)


class V2PERunner(Runner):
    def __init__(self, cfg, ctx: RunContext):
        p, t = cfg.parallelism, cfg.training
        self.cfg, self.device = cfg, ctx.device
        self.groups = ParallelDims.infer(world_size=ctx.world_size, cp=p.cp, cp_a2a=p.cp_a2a).build(p.timeout_s)
        torch.manual_seed(t.seed)  # same initial weights on every rank
        if cfg.model.pretrained:
            model = load_pretrained(cfg.model.pretrained)
        else:
            model = V2PEModel(cfg.model.config())
        self.tokenizer = job_tokenizer(cfg, model_cfg=model.cfg)
        # DeepSpeed and FSDP keep fp32 master weights themselves (bf16 compute in their
        # configs); otherwise bf16 here.
        model.to(ctx.device, torch.bfloat16 if t.bf16 and t.sharding == "none" else torch.float32)
        # The kernel is resolved here, once: one the device cannot run fails at the start,
        # naming what can (not retried: a restart meets the same device).
        check_kernel(p.kernel, ctx.device, torch.bfloat16 if t.bf16 else torch.float32, model.cfg.llm.head_dim)
        self.step_cfg = TrainStepConfig(loss_chunk_tokens=t.loss_chunk_tokens,
                                        activation_checkpointing=t.activation_checkpointing, kernel=p.kernel)
        parallelize(model, self.step_cfg)
        units, methods = fsdp_units(model)
        self.engine = build_engine(model, t, mesh=shard_mesh(ctx.device) if t.sharding == "fsdp" else None,
                                   units=units, forward_methods=methods)
        self.data_cfg = cfg.data.loader(model.cfg)
        self.positions = cfg.data.positions(model.cfg)
        if ctx.rank == 0:
            log.info("positions: %s", self.positions)
        # prepare_data indexed the file(s) on the driver; a worker only reads the indexes.
        sources, order, self.report = open_sources(train_path(cfg, ctx.run_root), ctx.run_root,
                                                   tokenizer=self.tokenizer, cfg=self.data_cfg, seed=t.seed)
        dims = self.groups.dims
        self.data = StreamingDataset(sources, order=order, tokenizer=self.tokenizer, cp=dims.cp,
                                     cp_rank=self.groups.cp_rank, a2a=dims.cp_a2a, budget=cfg.data.max_tokens)
        self.last_row = None  # RowStats of the last batch, for the planner

    def tags(self) -> dict[str, str]:
        return {"positions": str(self.positions)}

    def batch(self, micro: int):
        """The packed row of micro-step `micro` for this data-parallel replica, CP-sharded;
        the next micro-step's row is read in the background meanwhile."""
        dims, seed = self.groups.dims, self.cfg.training.seed

        def key(m: int) -> tuple[int, int]:
            i = m * dims.dp + self.groups.dp_rank
            # the row, and the seed of its δ draws
            return sample_at(i, len(self.data.rows), seed), seed * 1_000_003 + i

        batch, self.last_row = self.data.batch(*key(micro), next_key=key(micro + 1))
        return batch.to(self.device, next(self.engine.module.parameters()).dtype)

    def step(self, micro: int) -> StepResult:
        cp_group = self.groups.cp_group if self.groups.dims.cp > 1 else None
        loss_group = dist.group.WORLD if self.groups.dims.world_size > 1 else None
        return train_step(self.engine, self.batch(micro), cp_group=cp_group, loss_group=loss_group,
                          hybrid=self.groups.hybrid, cfg=self.step_cfg)

    @property
    def samples_per_micro(self) -> int:
        return self.groups.dims.dp

    def layout(self) -> dict[str, int]:
        d = self.groups.dims
        return {"dp": d.dp, "cp": d.cp, "cp_a2a": d.cp_a2a}

    def data_report(self) -> dict[str, float]:
        r = self.report
        return {"data_samples_loaded": r.loaded, "data_samples_skipped": r.total_skipped,
                **{f"data_skipped_{reason}": n for reason, n in r.skipped.items()}}

    def data_report_lines(self) -> list[str]:
        return [f"data: {self.report.summary()}", *(f"  skipped: {e}" for e in self.report.examples)]

    def predicted_memory(self) -> dict[str, float]:
        """The planner's bytes per GPU for the last row this rank trained on."""
        r = self.last_row
        shape = replace(job_shape(self.cfg), seq_len=r.tokens, tiles=r.tiles,
                        supervised_fraction=max(r.supervised, 1) / r.tokens)
        return estimate_memory(self.engine.module.cfg, shape)

    def export(self, rank: int, url: str) -> str:
        """The trained model in InternVL2 Hugging Face format at `url` (rank 0 writes);
        its config.json records the positions it was trained with (V2PE's keys)."""
        module = self.engine.module
        module.cfg = replace(module.cfg, position_mode=self.positions.mode, position_stride=self.positions.stride)
        if self.engine.kind == "fsdp":
            # Gathered to full tensors (collective), rank 0 writes.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                save_pretrained(module, url, state=full)
        elif self.engine.ds is not None and self.cfg.training.zero_stage == 3:
            import deepspeed

            # ZeRO-3 holds shards: gather the full parameters (collective), rank 0 writes.
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                if rank == 0:
                    save_pretrained(module, url)
        elif rank == 0:
            save_pretrained(module, url)
        if rank == 0:  # a complete checkpoint folder: the tokenizer travels with the weights
            copy_tokenizer(self.tokenizer, url)
        return url
