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

Saving (`Checkpointer`): the training thread copies the state (a copy in memory, the
only part that blocks training), and a background thread writes it with DCP into a
local folder (each rank its own share: with FSDP its shards, with replicated models DCP
spreads the tensors over the ranks), uploads that rank's files, and gathers every
rank's verdict over a checkpoint group of its own (`parallelism.dims.checkpoint_group`).
Rank 0 writes `manifest.json` only when every rank's upload succeeded. One save is in
flight at a time; the next save, the end of training and the export wait for it, and a
failure surfaces there, on every rank, as `CheckpointUploadError`.

Restoring (`CheckpointStore.restore_latest`): every rank reads the manifest and DCP's
index, and fetches only the byte ranges of the tensors it needs (its shards; all of a
replicated model), checking each range's SHA-256 before anything is loaded. DCP
reshards: a checkpoint written by W workers loads on W' (with FSDP each rank reads about
1/W' of it). DeepSpeed's ZeRO shards are per rank: those resume on as many workers only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
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

from .errors import first_line

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incomplete, corrupted, or not for this job)."""


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be written; the previous one stays the latest."""


class CheckpointMismatch(CheckpointError):
    """A complete checkpoint this job cannot resume from as configured (no fallback:
    older checkpoints of the run have the same layout)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    mlflow_run_id: str | None = None
    losses: list = field(default_factory=list)  # (step, loss) of every completed step, for the record


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _item_key(relative_path: str, offset: int, length: int) -> str:
    return f"{relative_path}@{offset}+{length}"


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(state), "python_version": version, "python_gauss": gauss}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))


def _staged(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of the state in host memory that training cannot change under the writer.
    DTensors stay DTensors (DCP needs their placement) with a copied local shard."""
    out = {}
    for k, t in tensors.items():
        if hasattr(t, "to_local"):
            from torch.distributed.tensor import DTensor

            out[k] = DTensor.from_local(t.to_local().detach().to("cpu", copy=True), t.device_mesh, t.placements,
                                        run_check=False, shape=t.shape, stride=t.stride())
        else:
            out[k] = t.detach().to("cpu", copy=True)
    return out


def _dcp_reason(e: BaseException) -> str:
    """One line from DCP's per-rank failure report."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        exc = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)
        return f"rank {rank}: {type(exc).__name__}: {first_line(exc)}"
    return f"{type(e).__name__}: {first_line(e)}"


LOW_SPACE = 64 << 20  # free bytes below which a failed local write is taken for a full disk


def _space_hint(local: Path) -> str:
    """"; No space left on device: ..." when the local temp folder's disk is (nearly)
    full, so the failure reads as what it is (and is not retried, `launch.retriable`)."""
    try:
        free = shutil.disk_usage(local.parent).free
    except OSError:
        return ""
    if free >= LOW_SPACE:
        return ""
    return (f"; No space left on device: {free >> 20} MiB free in {local.parent} (the workers' temp folder, "
            "TMPDIR): free it or point TMPDIR at a larger disk")


def _local_reason(e: BaseException, local: Path) -> str:
    """Why writing this rank's files into its local temp folder failed, in one line."""
    return f"writing {local} failed ({type(e).__name__}: {first_line(e)}){_space_hint(local)}"


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index is a pickle: only its own classes may be built from it, so a
    tampered index cannot run code (tensors themselves load with weights_only)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata" or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint index refers to {module}.{name}, which is not part of DCP's index")


def _load_metadata(blob: bytes):
    return _MetadataUnpickler(io.BytesIO(blob)).load()


# --- reading only the bytes a rank needs ---------------------------------------------------


class _Ranges(io.RawIOBase):
    """A file of which only some byte ranges were fetched (and checked): DCP seeks to a
    tensor's offset and reads it as if the whole file were there."""

    def __init__(self, pieces: dict[int, bytes], name: str):
        super().__init__()
        self._pieces = sorted(pieces.items())
        self._pos = 0
        self._name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            raise io.UnsupportedOperation("the end of a partly fetched file is unknown")
        self._pos = offset
        return offset

    def readinto(self, buf) -> int:
        for start, data in self._pieces:
            if start <= self._pos < start + len(data):
                n = min(len(buf), start + len(data) - self._pos)
                buf[:n] = data[self._pos - start:self._pos - start + n]
                self._pos += n
                return n
        raise CheckpointError(f"{self._name}: read at byte {self._pos} outside the ranges fetched")


class _RangeFS:
    """The part of DCP's filesystem interface its reader uses, served from prefetched ranges."""

    def __init__(self):
        self.files: dict[str, dict[int, bytes]] = {}

    def create_stream(self, path, mode):
        return contextlib.nullcontext(_Ranges(self.files[str(path)], str(path)))

    def concat_path(self, path, suffix):
        return posixpath.join(str(path), suffix)


def _reader(fs, root: str, manifest: dict, metadata):
    """A DCP storage reader over `root` that fetches, per load, just the tensors' byte
    ranges this rank's plan asks for, all at once (s3fs runs them concurrently), and
    checks each against the manifest before DCP unpickles anything from it."""
    from torch.distributed.checkpoint import FileSystemReader

    class RangeReader(FileSystemReader):
        def __init__(self):
            super().__init__(root)
            self.fs = _RangeFS()
            self.path = root

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            infos = (self.storage_data[item.storage_index] for item in plan.items)
            wanted = sorted({(info.relative_path, info.offset, info.length) for info in infos})
            paths = [posixpath.join(root, rel) for rel, _, _ in wanted]
            data = fs.cat_ranges(paths, [o for _, o, _ in wanted], [o + n for _, o, n in wanted], on_error="return") \
                if wanted else []
            for (rel, offset, length), path, blob in zip(wanted, paths, data):
                if isinstance(blob, BaseException):
                    raise CheckpointError(f"state/{rel} cannot be read ({type(blob).__name__}: {blob})")
                digest = manifest["items"].get(_item_key(rel, offset, length))
                if digest is None or len(blob) != length or _sha256(blob) != digest:
                    raise CheckpointError(f"state/{rel} bytes {offset}..{offset + length} fail their checksum "
                                          "(corrupted)")
                self.fs.files.setdefault(path, {})[offset] = blob
            return super().read_data(plan, planner)

    return RangeReader()


# --- saving ---------------------------------------------------------------------------------


class Checkpointer:
    """Saves this rank's part of each checkpoint in the background, one at a time.

    Collective: every rank calls `save` for the same steps, and `wait` at the same points."""

    def __init__(self, store: CheckpointStore, *, rank: int, world: int, group, engine, keep: int,
                 layout: dict, upload_hook=None, job: dict | None = None):
        self.store, self.rank, self.world, self.group, self.engine = store, rank, world, group, engine
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
        tensors, failed = None, None
        try:
            if self.engine.ds is not None:
                # DeepSpeed writes its shards itself, synchronously (into local disk, not S3).
                self.engine.ds.save_checkpoint(str(local / "deepspeed"), tag="state")
            else:
                tensors = _staged(self.engine.state_tensors())
            torch.save(_rng_state(), local / f"rng-rank{self.rank}.pt")
        except (OSError, RuntimeError) as e:
            # A full or broken local disk: told to every rank by the verdict exchange in
            # the background, so the ranks agree that this checkpoint failed.
            failed = f"rank {self.rank}: {_local_reason(e, local)}"
        record = {"state": asdict(state), "scheduler": self.engine.scheduler.state_dict(), "job": self.job}
        blocked_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(name, local, tensors, record, state.step, t0,
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

    def _write(self, name: str, local: Path, tensors, record: dict, step: int, t0: float, blocked_s: float,
               failure: str | None = None) -> None:
        mine: dict = {"files": {}, "items": {}}
        try:
            # DCP's save is collective: a rank whose local copy failed already still takes
            # part (and DCP shares any rank's failure), then only exchanges its verdict.
            if tensors is not None:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.api import CheckpointException

                try:
                    metadata = dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(local / "state")),
                                        process_group=self.group)
                except CheckpointException as e:
                    raise CheckpointError(f"writing the state failed on {_dcp_reason(e)}"
                                          f"{_space_hint(local)}") from None
                if failure is not None:
                    raise CheckpointError(failure)
                for info in metadata.storage_data.values():
                    path = local / "state" / info.relative_path
                    if path.exists():  # this rank's file: a checksum per tensor, for ranged reads
                        with open(path, "rb") as f:
                            f.seek(info.offset)
                            blob = f.read(info.length)
                        mine["items"][_item_key(info.relative_path, info.offset, info.length)] = _sha256(blob)
            if failure is not None:
                raise CheckpointError(failure)
            files = sorted(p for p in local.rglob("*") if p.is_file())
            mine["files"] = {str(p.relative_to(local)): [p.stat().st_size, _file_sha256(p)] for p in files}
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
            failure = f"rank {self.rank}: {type(e).__name__}: {e}{_space_hint(local)}"
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
            except Exception as e:  # noqa: BLE001
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
                    "engine": self.engine.kind, "files": files, "items": items}
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
            self._fetch(name, manifest, rel)
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

    def _fetch(self, name: str, manifest: dict, rel: str) -> bytes:
        size, digest = manifest["files"][rel]
        blob = self.fs.cat_file(posixpath.join(self.root, name, rel))
        if len(blob) != size or _sha256(blob) != digest:
            raise CheckpointError(f"{rel} fails its checksum (corrupted)")
        return blob

    def restore(self, name: str, *, rank: int, world: int, engine, group) -> TrainState:
        """Loads checkpoint `name` into `engine` (collective over `group`)."""
        manifest = self.manifest(name)
        if manifest["engine"] != engine.kind:
            raise CheckpointMismatch(f"it was written with training.sharding={manifest['engine']!r}, "
                                     f"this job uses {engine.kind!r}")
        if engine.ds is not None:
            self._restore_deepspeed(name, manifest, rank=rank, world=world, engine=engine)
        else:
            self._restore_dcp(name, manifest, engine=engine, group=group)
        rng = f"rng-rank{rank}.pt"
        if manifest["world_size"] == world and rng in manifest["files"]:
            # Same ranks: each goes on with its own random stream. A resharded run draws
            # nothing random from these (data and δ draws are seeded by sample index).
            _set_rng_state(torch.load(io.BytesIO(self._fetch(name, manifest, rng)), weights_only=True))
        return TrainState(**manifest["state"])

    def _restore_dcp(self, name: str, manifest: dict, *, engine, group) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        root = posixpath.join(self.root, name, "state")
        try:  # checked against the manifest before it is unpickled, and unpickled restricted
            metadata = _load_metadata(self._fetch(name, manifest, "state/.metadata"))
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"state/.metadata: {e}") from None
        keys = metadata.state_dict_metadata.keys()
        tensors = engine.state_templates(keys)
        missing = sorted(k for k in tensors if k not in keys)
        if missing:
            raise CheckpointMismatch(f"it has no {missing[0].split('/', 1)[1]!r} (model parameter or state) "
                                     f"of this job's model ({len(missing)} missing): another model?")
        try:
            dcp.load(tensors, storage_reader=_reader(self.fs, root, manifest, metadata), process_group=group)
        except CheckpointException as e:
            raise CheckpointError(f"loading failed on {_dcp_reason(e)}") from None
        engine.load_state_tensors(tensors, manifest["scheduler"])

    def _restore_deepspeed(self, name: str, manifest: dict, *, rank: int, world: int, engine) -> None:
        if manifest["world_size"] != world:
            raise CheckpointMismatch(
                f"it holds DeepSpeed ZeRO shards of {manifest['world_size']} workers and this job has {world}: "
                "ZeRO shards resume only on as many workers (training.sharding=fsdp reshards)")
        mine = re.compile(rf"zero_pp_rank_{rank}_")
        with tempfile.TemporaryDirectory() as tmp:
            for rel in manifest["files"]:
                # Every rank's ZeRO shard is a file of its own: fetch ours and the common files.
                if rel.startswith("deepspeed/") and (mine.search(rel) or not re.search(r"zero_pp_rank_\d+_", rel)):
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    Path(tmp, rel).write_bytes(self._fetch(name, manifest, rel))
            engine.ds.load_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
        engine.follow_schedule()

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
