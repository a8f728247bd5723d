"""One state object, one checkpointer.

`TrainState` holds everything needed to continue a run exactly: the step (which is
also the data position: batches are a pure function of step, seed and replica), the
RNG states, and the MLflow run id. `save_checkpoint` writes, per rank, the files of
that rank plus a manifest of their SHA-256 sums into one directory; Ray Train merges
every rank's directory into one checkpoint in storage. `restore_checkpoint` verifies
every manifest before loading anything and loads tensors without unpickling arbitrary
objects (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    mlflow_run_id: str | None = None
    losses: list = field(default_factory=list)  # (step, loss) of every completed step, for the record


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path, rank: int, files: list[str]) -> None:
    manifest = {name: _sha256(folder / name) for name in files}
    (folder / f"manifest-rank{rank}.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify(folder: str | Path, world_size: int) -> None:
    """Every rank's manifest exists and every listed file has its recorded checksum."""
    folder = Path(folder)
    for r in range(world_size):
        mf = folder / f"manifest-rank{r}.json"
        if not mf.exists():
            raise CheckpointError(f"{folder}: manifest of rank {r} is missing (checkpoint incomplete)")
        for name, digest in json.loads(mf.read_text()).items():
            p = folder / name
            if not p.exists():
                raise CheckpointError(f"{folder}: {name} listed by rank {r} is missing")
            if _sha256(p) != digest:
                raise CheckpointError(f"{folder}: {name} fails its checksum (corrupted)")


def save_checkpoint(folder: str | Path, *, rank: int, state: TrainState, engine, shard: str = "",
                    writer: bool | None = None) -> None:
    """Writes this rank's part: the writer (rank 0 by default) the model, optimizer and
    schedule (named with `shard`, e.g. "-branch1" when ranks hold different parts);
    rank 0 the state; every rank its RNG state. With DeepSpeed every rank writes its
    ZeRO shard."""
    writer = rank == 0 if writer is None else writer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]},
               folder / f"rng-rank{rank}.pt")
    if engine.ds is not None:
        engine.ds.save_checkpoint(str(folder / "deepspeed"), tag="state")  # every rank: its ZeRO shard
    elif writer:
        torch.save(engine.module.state_dict(), folder / f"model{shard}.pt")
        torch.save(engine.optimizer.state_dict(), folder / f"optimizer{shard}.pt")
        torch.save(engine.scheduler.state_dict(), folder / f"scheduler{shard}.pt")
    if rank == 0:
        (folder / "state.json").write_text(json.dumps(asdict(state)))
    # Each rank writes into its own local folder (Ray Train merges them in storage), so
    # everything in it is this rank's.
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and not p.name.startswith("manifest-rank"))
    _write_manifest(folder, rank, files)


def restore_checkpoint(folder: str | Path, *, rank: int, world_size: int, engine, shard: str = "") -> TrainState:
    folder = Path(folder)
    verify(folder, world_size)
    state = TrainState(**json.loads((folder / "state.json").read_text()))
    if engine.ds is not None:
        engine.ds.load_checkpoint(str(folder / "deepspeed"), tag="state")
    else:
        engine.module.load_state_dict(torch.load(folder / f"model{shard}.pt", weights_only=True))
        engine.optimizer.load_state_dict(torch.load(folder / f"optimizer{shard}.pt", weights_only=True))
        engine.scheduler.load_state_dict(torch.load(folder / f"scheduler{shard}.pt", weights_only=True))
    rng = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    return state
