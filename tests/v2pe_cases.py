"""Functions run on every rank of a LocalWorld for the V2PE tests."""

import torch
import torch.distributed as dist

from tests.v2pe_helpers import tiny_config
from workloads.v2pe.data import shard_batch
from workloads.v2pe.model import V2PEModel
from workloads.v2pe.train import TrainStepConfig, forward_loss, parallelize


def _cp_groups(a2a):
    """The whole world as one context-parallel group, split a2a x ring when a2a > 1."""
    from parallelism.dims import ParallelDims

    W = dist.get_world_size()
    return ParallelDims(world_size=W, cp=W, cp_a2a=a2a).build()


def cp_loss_and_grads(state, batch, checkpointing, a2a=1, config=None):
    """Whole world = one context-parallel group. Returns (summed loss, summed grads) on rank 0."""
    W, r = dist.get_world_size(), dist.get_rank()
    model = V2PEModel(config or tiny_config())
    model.load_state_dict(state)
    cfg = TrainStepConfig(loss_chunk_tokens=16, activation_checkpointing=checkpointing)
    parallelize(model, cfg)
    groups = _cp_groups(a2a)
    group = groups.cp_group
    loss, _ = forward_loss(model, shard_batch(batch, W, r, a2a=a2a), cp_group=group, loss_group=group,
                           hybrid=groups.hybrid, cfg=cfg)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g
    return (total, grads) if r == 0 else None


def cp_score(state, samples, stride, a2a=1):
    from workloads.v2pe.evaluate import score_sample
    from workloads.v2pe.tokenizer import ByteTokenizer

    model = V2PEModel(tiny_config())
    model.load_state_dict(state)
    groups = _cp_groups(a2a)
    return [score_sample(model, s, tokenizer=ByteTokenizer(), mode="v2pe_fix", stride=stride,
                         cp_group=groups.cp_group, hybrid=groups.hybrid) for s in samples]


def cp_engine_step(state, batch, zero_stage, steps):
    """CP over the whole world; DeepSpeed ZeRO shards over the same ranks. Returns rank 0's params."""
    from workloads.engine import TrainingConfig, build_engine

    W, r = dist.get_world_size(), dist.get_rank()
    model = V2PEModel(tiny_config())
    model.load_state_dict(state)
    engine = build_engine(model, TrainingConfig(lr=1e-2, eps=1e-3, grad_clip=0.0, steps=10, sharding="deepspeed",
                                                zero_stage=zero_stage))
    group = dist.group.WORLD
    losses = []
    for _ in range(steps):
        loss, _ = forward_loss(engine.module, shard_batch(batch, W, r), cp_group=group, loss_group=group)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return (losses, params) if r == 0 else None


def checkpoint_roundtrip(state, batch, sharding, zero_stage, folder):
    """Three steps straight vs. one step, checkpoint (each rank in its own folder, then
    merged as Ray Train does), restore into a fresh engine, one more step."""
    import shutil

    from orchestrator.checkpoint import TrainState, restore_checkpoint, save_checkpoint
    from workloads.engine import TrainingConfig, build_engine

    W, r = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD

    def fresh():
        model = V2PEModel(tiny_config())
        model.load_state_dict(state)
        return build_engine(model, TrainingConfig(lr=1e-2, steps=10, warmup_steps=1, sharding=sharding, zero_stage=zero_stage))

    def step(engine):
        loss, _ = forward_loss(engine.module, shard_batch(batch, W, r), cp_group=group, loss_group=group)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total)

    straight = fresh()
    want = [step(straight), step(straight), step(straight)]
    engine = fresh()
    first = step(engine)
    mine = f"{folder}/rank{r}"
    save_checkpoint(mine, rank=r, state=TrainState(step=1, losses=[[1, first]]), engine=engine)
    dist.barrier()
    merged = f"{folder}/merged"
    if r == 0:
        for k in range(W):
            shutil.copytree(f"{folder}/rank{k}", merged, dirs_exist_ok=True)
    dist.barrier()
    resumed = fresh()
    st = restore_checkpoint(merged, rank=r, world_size=W, engine=resumed)
    # Step 2 checks the restored weights, step 3 the restored Adam moments and schedule.
    later = [step(resumed), step(resumed)]
    return want, [first, *later], st.step, resumed.lr, straight.lr
