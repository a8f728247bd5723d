"""One state object, one checkpointer, one place that knows where checkpoints live.

Layout in storage (`<storage.uri>/<name>/`):

    step-0000020/              one checkpoint per `training.checkpoint_every` steps
      state/.metadata          torch.distributed.checkpoint (DCP): the index of every tensor
      state/__<r>_0.distcp     rank r's share of the model and optimizer tensors
      deepspeed/...            instead of state/ with DeepSpeed: every rank's ZeRO shard
      rng-rank<r>.pt           rank r's torch and Python RNG states
      manifest.json            written last: the run's progress (TrainState), the schedule,
                               the writers' layout and job config, and the size and SHA-256
                               of every file and of every tensor's bytes. No manifest:
                               incomplete.
    export/                    the trained model in the workload's published format
    data/                      data written by `prepare_data`

Saving (`Checkpointer`): the training thread has the engine's checkpoint format stage
the state (`checkpoint_formats`: DCP copies it to host memory, DeepSpeed writes its own
shards; the only part that blocks training), and a background thread has the format
write this rank's share into a local folder, uploads that rank's files, and gathers
every rank's verdict over a checkpoint group of its own
(`parallelism.dims.checkpoint_group`). Rank 0 writes `manifest.json` only when every
rank's upload succeeded. One save is in flight at a time; the next save, the end of
training and the export wait for it, and a failure surfaces there, on every rank, as
`CheckpointUploadError`.

Restoring (`CheckpointStore.restore_latest`): the newest checkpoint whose manifest is
there is handed to the format, which reads only what this rank needs and checks every
byte against the manifest (DCP: the byte ranges of this rank's tensors, resharded from
W workers to W'; DeepSpeed: this rank's ZeRO shard, on as many workers only); a
checkpoint that fails is passed over for the one before, saying why.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint_formats import format_for
from .checkpoint_formats.base import (
    CheckpointError,
    CheckpointMismatch,
    CheckpointUploadError,
    file_sha256,
    sha256,
    space_hint,
)
from .errors import first_line
from .storage import run_uri, storage_fs

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 2


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    mlflow_run_id: str | None = None
    losses: list = field(default_factory=list)  # (step, loss) of every completed step, for the record


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(state), "python_version": version, "python_gauss": gauss}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))


def _local_reason(e: BaseException, local: Path) -> str:
    """Why writing this rank's files into its local temp folder failed, in one line."""
    return f"writing {local} failed ({type(e).__name__}: {first_line(e)}){space_hint(local)}"


class Checkpointer:
    """Saves this rank's part of each checkpoint in the background, one at a time.

    Collective: every rank calls `save` for the same steps, and `wait` at the same points."""

    def __init__(self, store: CheckpointStore, *, rank: int, world: int, group, engine, keep: int,
                 layout: dict, upload_hook=None, job: dict | None = None, checkpoint_format: str = "auto"):
        self.store, self.rank, self.world, self.group, self.engine = store, rank, world, group, engine
        self.format = format_for(engine.kind, checkpoint_format)
        self.keep, self.layout = keep, layout  # layout: the writers' parallel degrees, for the manifest
        self.job = job  # the job config that writes it, for the manifest (`orchestrator.resume`)
        self.upload_hook = upload_hook  # (step, rank) -> None, the fault suite's
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._timings: dict[str, float] = {}  # of the last save, until `timings` hands them out

    def save(self, state: TrainState) -> None:
        self.wait()
        t0 = time.perf_counter()
        name = self.store.name(state.step)
        local = Path(tempfile.mkdtemp(prefix=f"longview-{name}-"))
        staged, failed = None, None
        try:
            staged = self.format.stage(self.engine, local)
            torch.save(_rng_state(), local / f"rng-rank{self.rank}.pt")
        except (OSError, RuntimeError) as e:
            # A full or broken local disk: told to every rank by the verdict exchange in
            # the background, so the ranks agree that this checkpoint failed.
            failed = f"rank {self.rank}: {_local_reason(e, local)}"
        record = {"state": asdict(state), "scheduler": self.engine.scheduler.state_dict(), "job": self.job}
        blocked_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(name, local, staged, record, state.step, t0,
                                                                  blocked_s, failed),
                                        name=f"checkpoint-{name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Blocks until the save in flight is complete; raises CheckpointUploadError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointUploadError(error)

    def settle(self, timeout_s: float | None = None) -> None:
        """Waits for the save in flight without raising (a failure is logged): called when
        the worker goes down for another reason, so that a save that can still complete
        does, and the restart resumes from it."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._thread = None
        if self._error is not None:
            log.warning("%s", self._error)
            self._error = None

    def timings(self) -> dict[str, float]:
        """{"checkpoint_blocked_s": the copy that held training up, "checkpoint_total_s":
        until the manifest} of the last completed save, once; {} otherwise."""
        done, self._timings = self._timings, {}
        return done

    def _write(self, name: str, local: Path, staged, record: dict, step: int, t0: float, blocked_s: float,
               failure: str | None = None) -> None:
        mine: dict = {"files": {}, "items": {}}
        try:
            # A format's write may be collective (DCP): a rank whose local copy failed
            # already still takes part, then only exchanges its verdict.
            mine["items"] = self.format.write(staged, local, self.group)
            if failure is not None:
                raise CheckpointError(failure)
            files = sorted(p for p in local.rglob("*") if p.is_file())
            mine["files"] = {str(p.relative_to(local)): [p.stat().st_size, file_sha256(p)] for p in files}
            if self.upload_hook is not None:
                self.upload_hook(step, self.rank)
            remote = posixpath.join(self.store.root, name)
            for p in files:
                target = posixpath.join(remote, str(p.relative_to(local)))
                if "://" not in self.store.uri:  # a local folder (S3 has no folders to make)
                    self.store.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                self.store.fs.put_file(str(p), target)
        except CheckpointError as e:
            failure = failure or f"rank {self.rank}: {e}"
        except Exception as e:  # noqa: BLE001 - the storage layer's errors vary by backend; reported below
            failure = f"rank {self.rank}: {type(e).__name__}: {e}{space_hint(local)}"
        finally:
            shutil.rmtree(local, ignore_errors=True)
        verdicts: list = [None] * self.world
        try:
            dist.all_gather_object(verdicts, (failure, mine), group=self.group)
        except RuntimeError as e:  # a peer died: this checkpoint is not complete
            self._error = f"checkpoint {name}: ranks did not all report back ({e})"
            return
        failures = [f for f, _ in verdicts if f]
        committed = [None]
        if not failures and self.rank == 0:
            try:
                self._commit(name, record, [m for _, m in verdicts])
            except Exception as e:  # noqa: BLE001 - any storage error: told to every rank, the save fails
                committed[0] = f"rank 0 writing {MANIFEST}: {type(e).__name__}: {e}"
        if not failures:
            dist.broadcast_object_list(committed, src=0, group=self.group)
            failures = [c for c in committed if c]
        self._timings = {"checkpoint_blocked_s": blocked_s, "checkpoint_total_s": time.perf_counter() - t0}
        if failures:
            self._error = (f"checkpoint {name} could not be written to {self.store.location(name)} "
                           f"({'; '.join(failures)}); the previous checkpoint stays the one to resume from")

    def _commit(self, name: str, record: dict, manifests: list[dict]) -> None:
        files, items = {}, {}
        for m in manifests:
            files.update(m["files"])
            items.update(m["items"])
        manifest = {"format": FORMAT, **record, "world_size": self.world, "layout": self.layout,
                    "engine": self.engine.kind, "checkpoint_format": self.format.name, "files": files,
                    "items": items}
        self.store.fs.pipe_file(posixpath.join(self.store.root, name, MANIFEST), json.dumps(manifest).encode())
        self.store.rotate(self.keep)


# --- the run's checkpoints ----------------------------------------------------------------


class CheckpointStore:
    """A run's checkpoints in storage: their names, their listing, restoring the newest
    one that verifies, and dropping old ones.

    Storage, not Ray's registry, is the source: longview uploads checkpoints itself (in
    the background) and a checkpoint is complete when its manifest is there."""

    PATTERN = re.compile(r"step-\d{7}")

    def __init__(self, fs, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri.rstrip("/")  # root: fs path; uri: as users write it

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:07d}"

    def location(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def names(self) -> list[str]:
        """Checkpoint names in storage (complete or not), newest first."""
        if not self.fs.exists(self.root):
            return []
        self.fs.invalidate_cache(self.root)  # fsspec caches listings per process
        found = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        return sorted((n for n in found if self.PATTERN.fullmatch(n)), reverse=True)

    def manifest(self, name: str) -> dict:
        path = posixpath.join(self.root, name, MANIFEST)
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointError("it has no manifest (incomplete: a rank's upload never finished)") from None
        except ValueError as e:
            raise CheckpointError(f"its manifest is unreadable ({e})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"its format {manifest.get('format')!r} is not {FORMAT}")
        return manifest

    def verify(self, name: str) -> dict:
        """Reads every file of checkpoint `name` and checks it against the manifest (for
        tests and operators; a restore checks only the bytes it reads). Returns the manifest."""
        manifest = self.manifest(name)
        for rel in manifest["files"]:
            self.fetch(name, manifest, rel)
        return manifest

    def latest_complete(self) -> str | None:
        for name in self.names():
            try:
                self.manifest(name)
                return name
            except CheckpointError:
                continue
        return None

    def drop_incomplete(self) -> list[str]:
        """Removes the checkpoints that have no manifest (a save cut short by a stop or a
        crash), so no restore has to pass over them. Only while no worker of the run
        writes: the driver calls it under the run's lease, before the workers start."""
        dropped = []
        for name in self.names():
            if not self.fs.exists(posixpath.join(self.root, name, MANIFEST)):
                self.fs.rm(posixpath.join(self.root, name), recursive=True)
                dropped.append(name)
        return dropped

    def rotate(self, keep: int) -> None:
        """Keeps the newest `keep` complete checkpoints, and anything newer than those."""
        complete = 0
        for name in self.names():
            if complete >= keep:
                self.fs.rm(posixpath.join(self.root, name), recursive=True)
                continue
            if self.fs.exists(posixpath.join(self.root, name, MANIFEST)):
                complete += 1

    def fetch(self, name: str, manifest: dict, rel: str) -> bytes:
        """File `rel` of checkpoint `name`, checked against its manifest entry."""
        size, digest = manifest["files"][rel]
        blob = self.fs.cat_file(posixpath.join(self.root, name, rel))
        if len(blob) != size or sha256(blob) != digest:
            raise CheckpointError(f"{rel} fails its checksum (corrupted)")
        return blob

    def restore(self, name: str, *, rank: int, world: int, engine, group) -> TrainState:
        """Loads checkpoint `name` into `engine` (collective over `group`)."""
        manifest = self.manifest(name)
        if manifest["engine"] != engine.kind:
            raise CheckpointMismatch(f"it was written with training.sharding={manifest['engine']!r}, "
                                     f"this job uses {engine.kind!r}")
        # read back with the format that wrote it (checkpoints from before formats were
        # recorded: the engine's own)
        fmt = format_for(engine.kind, manifest.get("checkpoint_format", "auto"))
        fmt.restore(self, name, manifest, rank=rank, world=world, engine=engine, group=group)
        rng = f"rng-rank{rank}.pt"
        if manifest["world_size"] == world and rng in manifest["files"]:
            # Same ranks: each goes on with its own random stream. A resharded run draws
            # nothing random from these (data and δ draws are seeded by sample index).
            _set_rng_state(torch.load(io.BytesIO(self.fetch(name, manifest, rng)), weights_only=True))
        return TrainState(**manifest["state"])

    def restore_latest(self, *, rank: int, world: int, engine, group):
        """Restores the newest checkpoint that verifies, going back past any that do not
        (corrupted, or incomplete: a rank's upload never finished) and saying why. Every
        rank reads the same manifests, and DCP shares every rank's failure, so all ranks
        settle on the same checkpoint.

        Returns (state, the checkpoint's name, ["name: reason" of each one passed over]),
        or None when the run has no checkpoint yet."""
        candidates = self.names()
        if not candidates:
            return None
        skipped = []
        for i, name in enumerate(candidates):
            try:
                state = self.restore(name, rank=rank, world=world, engine=engine, group=group)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(f"checkpoint {self.location(name)}: {e}") from None
            except (CheckpointError, FileNotFoundError) as e:
                skipped.append(f"{name}: {e}")
                if rank == 0:
                    nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                    log.warning("checkpoint %s is unusable (%s); %s", name, e,
                                f"falling back to {nxt}" if nxt else "no older checkpoint left")
                continue
            return state, name, skipped
        raise CheckpointError(f"no usable checkpoint under {self.uri} (tried {', '.join(candidates)})")


def checkpoint_store(cfg) -> CheckpointStore:
    """The job's `CheckpointStore`: <storage.uri>/<name>/ on the job's storage backend."""
    fs, root = storage_fs(run_uri(cfg), cfg)
    return CheckpointStore(fs, root, run_uri(cfg))
