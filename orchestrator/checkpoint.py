"""One state object, one checkpointer, one place that knows where checkpoints live.

Layout in storage (`<storage.uri>/<name>/`):

    step-0000020/            one checkpoint per `training.checkpoint_every` steps
      state.json             TrainState: step (also the data position), MLflow run id, losses
      model{shard}.pt        model, optimizer, scheduler: one file each per model part
      optimizer{shard}.pt    (shard "" for V2PE, "-branch<b>" for PIIP's branch groups);
      scheduler{shard}.pt    with DeepSpeed, deepspeed/state/ holds every rank's ZeRO shard
      rng-rank<r>.pt         each rank's torch and Python RNG states
      manifest-rank<r>.json  SHA-256 of every file rank r wrote
    export/                  the trained model in the workload's published format
    data/                    synthetic data written by `prepare_data`

`TrainState` holds the run's progress; the RNG states are files of their own.
`save_checkpoint` writes, per rank, the files of that rank plus its manifest into one
directory; Ray Train merges every rank's directory into one checkpoint in storage.
`restore_checkpoint` verifies every manifest before loading anything and loads tensors
without unpickling arbitrary objects (`torch.load(weights_only=True)`). `CheckpointStore`
names, lists and restores a run's checkpoints, falling back past unusable ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


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


class CheckpointStore:
    """A run's checkpoints in storage: their names, their listing, and restoring the
    newest one that verifies.

    Storage, not Ray's registry, is the source: Ray registers a checkpoint only after its
    controller has processed the report, so a worker killed just after an upload can come
    back to `ray.train.get_checkpoint() is None` with a complete checkpoint stored."""

    PATTERN = re.compile(r"step-\d{7}")

    def __init__(self, fs, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri.rstrip("/")  # root: fs path; uri: as users write it

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:07d}"

    def location(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def names(self) -> list[str]:
        """Checkpoint names in storage, newest first."""
        if not self.fs.exists(self.root):
            return []
        self.fs.invalidate_cache(self.root)  # fsspec caches listings per process
        found = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        return sorted((n for n in found if self.PATTERN.fullmatch(n)), reverse=True)

    def restore_latest(self, *, rank: int, world: int, engine, shard: str = ""):
        """Restores the newest checkpoint that verifies, going back past any that do not
        (corrupted, or incomplete: a rank's upload never finished) and saying why. Every
        rank verifies every rank's manifest, so all ranks settle on the same checkpoint.

        Returns (state, the checkpoint's name, ["name: reason" of each one passed over]),
        or None when the run has no checkpoint yet."""
        candidates = self.names()
        if not candidates:
            return None
        skipped = []
        for i, name in enumerate(candidates):
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, name)
                try:
                    self.fs.get(posixpath.join(self.root, name), local, recursive=True)
                    state = restore_checkpoint(local, rank=rank, world_size=world, engine=engine, shard=shard)
                except (CheckpointError, FileNotFoundError) as e:
                    skipped.append(f"{name}: {e}")
                    if rank == 0:
                        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                        log.warning("checkpoint %s is unusable (%s); %s", name, e,
                                    f"falling back to {nxt}" if nxt else "no older checkpoint left")
                    continue
            return state, name, skipped
        raise CheckpointError(f"no usable checkpoint under {self.uri} (tried {', '.join(candidates)})")
