"""Functions run on every rank of a LocalWorld for tests/test_checkpoint.py: a small
model trained and checkpointed through the production checkpointer, in a local store."""

import fsspec
import torch
import torch.distributed as dist

from orchestrator.checkpoint import Checkpointer, CheckpointStore, TrainState
from parallelism.dims import checkpoint_group
from workloads.engine import TrainingConfig, build_engine


def _engine(sharding="none"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    return build_engine(model, TrainingConfig(lr=1e-2, steps=10, sharding=sharding))


def _step(engine, step):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
    loss = engine.module(x).pow(2).mean() / dist.get_world_size()
    engine.backward(loss)
    engine.step()


def _store(folder):
    return CheckpointStore(fsspec.filesystem("file"), folder, folder)


def save_steps(folder, steps, fail_at=()):
    """Trains `steps` steps, saving after each; the upload of the steps in `fail_at`
    fails. Returns (each saved step's first weight row, the upload errors seen)."""
    engine = _engine()
    group = checkpoint_group(60)

    def hook(step, rank):
        if step in fail_at:
            raise OSError(f"injected upload failure at step {step}")

    saver = Checkpointer(_store(folder), rank=dist.get_rank(), world=dist.get_world_size(), group=group,
                         engine=engine, keep=3, layout={}, upload_hook=hook)
    weights, errors = {}, []
    for step in range(1, steps + 1):
        _step(engine, step)
        weights[step] = engine.module[0].weight[0].tolist()
        try:
            saver.save(TrainState(step=step))
            saver.wait()
        except Exception as e:  # noqa: BLE001 - the test looks at the type and message
            errors.append(f"{type(e).__name__}: {e}")
    return weights, errors


def restore(folder, sharding="none"):
    """(step, name, skipped, first weight row) of the newest usable checkpoint."""
    engine = _engine(sharding)
    got = _store(folder).restore_latest(rank=dist.get_rank(), world=dist.get_world_size(), engine=engine,
                                        group=checkpoint_group(60))
    state, name, skipped = got
    return state.step, name, skipped, engine.module[0].weight[0].tolist()


def save_on_a_full_disk(folder, tmp_base):
    """Saves step 1, then step 2 with rank 1's local temp disk full: its RNG file's write
    fails as torch's zip writer fails on a full disk. Returns (the errors seen, the temp
    folders left behind)."""
    import os
    import tempfile
    from collections import namedtuple
    from unittest import mock

    from orchestrator import checkpoint

    tmp = os.path.join(tmp_base, f"rank{dist.get_rank()}")
    os.makedirs(tmp)
    tempfile.tempdir = tmp  # this rank's own temp folder, so leftovers can be counted
    engine = _engine()
    saver = Checkpointer(_store(folder), rank=dist.get_rank(), world=dist.get_world_size(),
                         group=checkpoint_group(60), engine=engine, keep=3, layout={})
    _step(engine, 1)
    saver.save(TrainState(step=1))
    saver.wait()
    _step(engine, 2)
    errors = []
    real_save = torch.save
    usage = namedtuple("usage", "total used free")

    def full(obj, path, *a, **k):
        if str(path).startswith(tmp):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)

    patches = [mock.patch.object(checkpoint.torch, "save", full),
               mock.patch.object(checkpoint.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))] \
        if dist.get_rank() == 1 else []
    for p in patches:
        p.start()
    try:
        saver.save(TrainState(step=2))
        saver.wait()
    except Exception as e:  # noqa: BLE001 - the test looks at the type and message
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        for p in patches:
            p.stop()
    return errors, os.listdir(tmp)
