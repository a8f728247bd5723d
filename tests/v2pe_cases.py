"""Functions run on every rank of a LocalWorld for the V2PE tests."""

import torch
import torch.distributed as dist

from tests.v2pe_helpers import tiny_config
from workloads.v2pe.model import V2PEModel
from workloads.v2pe.packing import shard_batch
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
                         cp_group=groups.cp_group, hybrid=groups.hybrid, argmax=True) for s in samples]


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
    """Three steps straight vs. one step, checkpoint (written in the background to a
    local store), restore into a fresh engine, two more steps."""
    import fsspec

    from orchestrator.checkpoint import Checkpointer, CheckpointStore, TrainState
    from parallelism.dims import checkpoint_group
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
    store = CheckpointStore(fsspec.filesystem("file"), folder, folder)
    ckpt_group = checkpoint_group(60)
    saver = Checkpointer(store, rank=r, world=W, group=ckpt_group, engine=engine, keep=2, layout={})
    saver.save(TrainState(step=1, losses=[[1, first]]))
    saver.wait()
    resumed = fresh()
    st, _, skipped = store.restore_latest(rank=r, world=W, engine=resumed, group=ckpt_group)
    assert not skipped, skipped
    # Step 2 checks the restored weights, step 3 the restored Adam moments and schedule.
    later = [step(resumed), step(resumed)]
    return want, [first, *later], st.step, resumed.lr, straight.lr


def resharded_run(state, rows, sharding, storage, endpoint, steps, global_batch, resume, save_at, cp=2):
    """Trains the tiny model on the world as dp x cp with the production pieces (engine,
    `Checkpointer`, `CheckpointStore`), drawing sample s*B + m*dp + dp_rank at micro-step
    m of step s as the V2PE runner does. Resumes from `storage` when `resume`; saves after
    the steps in `save_at`. Returns (step losses, bytes this rank read on restore, the
    step it resumed at)."""
    import os

    from orchestrator.checkpoint import Checkpointer, CheckpointStore, TrainState
    from orchestrator.services import LOCAL_CREDENTIALS
    from orchestrator.storage import BYTES_READ, filesystem
    from parallelism.dims import ParallelDims, checkpoint_group, shard_mesh
    from workloads.engine import TrainingConfig, build_engine
    from workloads.v2pe.train import fsdp_units, train_step

    os.environ.update(LOCAL_CREDENTIALS)
    W, r = dist.get_world_size(), dist.get_rank()
    groups = ParallelDims.infer(world_size=W, cp=cp).build()
    dims = groups.dims
    model = V2PEModel(tiny_config())
    model.load_state_dict(state)
    step_cfg = TrainStepConfig(loss_chunk_tokens=16)
    parallelize(model, step_cfg)
    # eps 1e-3: see test_deepspeed_zero_with_context_parallel_matches_one_process.
    cfg = TrainingConfig(lr=1e-2, eps=1e-3, steps=steps, warmup_steps=1, sharding=sharding, global_batch=global_batch)
    units, methods = fsdp_units(model)
    engine = build_engine(model, cfg, mesh=shard_mesh(torch.device("cpu")) if sharding == "fsdp" else None,
                          units=units, forward_methods=methods)
    accum = cfg.accumulation(dims.dp, W)
    engine.set_grad_accum(accum)
    fs, root = filesystem(storage, endpoint_url=endpoint)
    store = CheckpointStore(fs, root, storage)
    group = checkpoint_group(60)
    before = BYTES_READ[0]
    restored = store.restore_latest(rank=r, world=W, engine=engine, group=group) if resume else None
    read = BYTES_READ[0] - before
    st = restored[0] if restored else TrainState()
    start = st.step
    saver = Checkpointer(store, rank=r, world=W, group=group, engine=engine, keep=2,
                         layout={"dp": dims.dp, "cp": dims.cp})
    losses = []
    while st.step < steps:
        results = []
        for m in range(accum):
            i = st.step * global_batch + m * dims.dp + groups.dp_rank
            batch = shard_batch(rows[i % len(rows)], dims.cp, groups.cp_rank)
            results.append(train_step(engine, batch, cp_group=groups.cp_group, loss_group=dist.group.WORLD,
                                      cfg=step_cfg))
        st.step += 1
        losses.append(sum(x.loss * x.tokens for x in results) / sum(x.tokens for x in results))
        if st.step in save_at:
            saver.save(st)
    saver.wait()
    return losses, read, start


def replicated_table(state, samples, strides, cp):
    """accuracy_table with the world split into groups of `cp` ranks scoring different samples."""
    from parallelism.dims import ParallelDims
    from workloads.v2pe.evaluate import accuracy_table, share_of
    from workloads.v2pe.tokenizer import ByteTokenizer

    model = V2PEModel(tiny_config())
    model.load_state_dict(state)
    W = dist.get_world_size()
    groups = ParallelDims.infer(world_size=W, cp=cp).build()
    replicas = (groups.dp_rank, W // cp)
    return accuracy_table(model, share_of(samples, replicas), tokenizer=ByteTokenizer(), strides=strides,
                          cp_group=groups.cp_group if cp > 1 else None, replicas=replicas)


def cp_generate(state, prompts, mode, stride, a2a=1, max_new_tokens=10, dtype=torch.float32, logits=False):
    """Greedy answers with each prompt spread over the whole world; every rank's result."""
    from workloads.v2pe.generate import generate
    from workloads.v2pe.tokenizer import ByteTokenizer

    model = V2PEModel(tiny_config())
    model.load_state_dict(state)
    model.to(dtype)
    groups = _cp_groups(a2a)
    return [generate(model, p, tokenizer=ByteTokenizer(), mode=mode, stride=stride, max_new_tokens=max_new_tokens,
                     cp_group=groups.cp_group, hybrid=groups.hybrid, return_prompt_logits=logits) for p in prompts]


def mmniah_run(root, sets, model_url, prepared, run_root):
    """`MMNIAHEvaluation.run` on every rank of the world (one context-parallel group)."""
    from orchestrator.config import load_config
    from workloads.spec import RunContext
    from workloads.v2pe.mmniah_eval import MMNIAHEvaluation

    cfg = load_config("name: mm\nworkload: v2pe\n", overrides={
        "evaluation.benchmark": "mm-niah", "evaluation.data": root, "data.max_tokens": 20000,
        "model.overrides": {"vision_image_size": 56}, **sets})
    ctx = RunContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch.device("cpu"),
                     run_root=run_root)
    return MMNIAHEvaluation().run(cfg, ctx, model_url, prepared)
