"""Checkpoint save and restore against S3: how long a save holds training up, how long it
takes to be complete, and how many bytes each rank reads on restore — for the previous
path (rank 0 writes everything, the upload blocks, every rank downloads every file) and
the current one (DCP: each rank writes its share in the background, reads by range).

    .venv/bin/python benchmarks/checkpoint_speed.py --workers 2 4 --width 2048 --layers 6

Starts its own S3-protocol endpoint (rclone) on 127.0.0.1. The model is a stack of
width x width linear layers (AdamW: the checkpoint is 3x the weights), the same on
every engine; ranks are local processes over gloo (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(width: int, layers: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))


def _trained_engine(width: int, layers: int, sharding: str):
    import torch
    import torch.distributed as dist

    from parallelism.dims import shard_mesh
    from workloads.engine import TrainingConfig, build_engine

    model = _model(width, layers)
    engine = build_engine(model, TrainingConfig(lr=1e-3, steps=10, sharding=sharding),
                          mesh=shard_mesh(torch.device("cpu")) if sharding == "fsdp" else None, units=list(model))
    loss = engine.module(torch.randn(4, width)).pow(2).mean() / dist.get_world_size()
    engine.backward(loss)
    engine.step()  # Adam's moments exist: the checkpoint holds weights and two moments
    return engine


def previous_path(url: str, endpoint: str, width: int, layers: int) -> dict:
    """What longview did before DCP: rank 0 torch.saves model, optimizer and schedule;
    every rank its RNG state and a SHA-256 manifest; each rank uploads its folder (Ray
    Train's per-rank upload) before training goes on; a restore downloads the whole
    checkpoint on every rank."""
    import hashlib
    import shutil

    import torch
    import torch.distributed as dist

    from orchestrator.storage import filesystem

    rank = dist.get_rank()
    engine = _trained_engine(width, layers, "none")
    fs, root = filesystem(url, endpoint_url=endpoint)
    dist.barrier()
    t0 = time.perf_counter()
    local = Path(tempfile.mkdtemp())
    torch.save({"rng": torch.get_rng_state()}, local / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(engine.module.state_dict(), local / "model.pt")
        torch.save(engine.optimizer.state_dict(), local / "optimizer.pt")
        torch.save(engine.scheduler.state_dict(), local / "scheduler.pt")
    manifest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in local.iterdir()}
    (local / f"manifest-rank{rank}.json").write_text(json.dumps(manifest))
    for p in local.iterdir():
        fs.put_file(str(p), f"{root}/step/{p.name}")
    dist.barrier()  # Ray registers the checkpoint once every rank has reported
    blocked = time.perf_counter() - t0
    shutil.rmtree(local)
    fresh = _trained_engine(width, layers, "none")
    dist.barrier()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(f"{root}/step", f"{tmp}/step", recursive=True)
        read = sum(p.stat().st_size for p in Path(tmp, "step").iterdir())
        for p in Path(tmp, "step").glob("manifest-rank*.json"):  # verify every manifest
            for name, digest in json.loads(p.read_text()).items():
                assert hashlib.sha256(Path(tmp, "step", name).read_bytes()).hexdigest() == digest
        fresh.module.load_state_dict(torch.load(Path(tmp, "step", "model.pt"), weights_only=True))
        fresh.optimizer.load_state_dict(torch.load(Path(tmp, "step", "optimizer.pt"), weights_only=True))
    restore = time.perf_counter() - t0
    return {"blocked_s": blocked, "total_s": blocked, "restore_s": restore, "read_bytes": read}


def current_path(url: str, endpoint: str, width: int, layers: int, sharding: str) -> dict:
    import torch.distributed as dist

    from orchestrator.checkpoint import Checkpointer, CheckpointStore, TrainState
    from orchestrator.storage import BYTES_READ, filesystem
    from parallelism.dims import checkpoint_group

    rank, world = dist.get_rank(), dist.get_world_size()
    engine = _trained_engine(width, layers, sharding)
    fs, root = filesystem(url, endpoint_url=endpoint)
    store = CheckpointStore(fs, root, url)
    group = checkpoint_group(600)
    saver = Checkpointer(store, rank=rank, world=world, group=group, engine=engine, keep=2, layout={})
    dist.barrier()
    t0 = time.perf_counter()
    saver.save(TrainState(step=1))
    saver.wait()
    timings = saver.timings()
    fresh = _trained_engine(width, layers, sharding)
    dist.barrier()
    before = BYTES_READ[0]
    t0 = time.perf_counter()
    store.restore_latest(rank=rank, world=world, engine=fresh, group=group)
    return {"blocked_s": timings["checkpoint_blocked_s"], "total_s": timings["checkpoint_total_s"],
            "restore_s": time.perf_counter() - t0,
            "read_bytes": BYTES_READ[0] - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args()

    from orchestrator.services import LOCAL_CREDENTIALS, start_s3, stop_pid
    from parallelism.local_world import LocalWorld

    os.environ.update(LOCAL_CREDENTIALS)
    params = args.width * args.width * args.layers
    print(f"model: {params / 1e6:.1f}M parameters; checkpoint ~{3 * 4 * params / 2**20:.0f} MiB "
          "(fp32 weights and two Adam moments)")
    tmp = Path(tempfile.mkdtemp())
    s3 = start_s3(tmp, ["bench"])
    rows = []
    try:
        for workers in args.workers:
            with LocalWorld(workers, timeout_s=600) as world:
                for path, fn, extra in (("previous (rank 0 writes, blocking)", previous_path, ()),
                                        ("DCP, replicated model (none)", current_path, ("none",)),
                                        ("DCP, FSDP shards (fsdp)", current_path, ("fsdp",))):
                    url = f"s3://bench/w{workers}-{fn.__name__}-{'-'.join(extra) or 'base'}"
                    got = world.run(fn, url, s3.url, args.width, args.layers, *extra)
                    rows.append({"workers": workers, "path": path,
                                 "blocked_s": max(g["blocked_s"] for g in got),
                                 "total_s": max(g["total_s"] for g in got),
                                 "restore_s": max(g["restore_s"] for g in got),
                                 "read_mib_per_rank": [round(g["read_bytes"] / 2**20, 1) for g in got]})
                    print(rows[-1], flush=True)
    finally:
        stop_pid(s3.pid)
    print("\n| workers | path | save blocks training (s) | save complete (s) | restore (s) | MiB read per rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['path']} | {r['blocked_s']:.2f} | {r['total_s']:.2f} | {r['restore_s']:.2f} | "
              f"{', '.join(f'{x:.0f}' for x in r['read_mib_per_rank'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
