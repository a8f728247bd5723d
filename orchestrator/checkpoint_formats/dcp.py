"""torch.distributed.checkpoint (DCP): each rank writes its share of the tensors in the
background and reads back only the byte ranges it needs, resharded to any worker count.

    state/.metadata        DCP's index of every tensor (a pickle, unpickled restricted)
    state/__<r>_0.distcp   rank r's share of the model and optimizer tensors

Saving stages a host copy of the state (the only part that holds training up); the
write is collective over the checkpoint group, and every tensor's bytes get a SHA-256
for ranged reads. Restoring fetches the index and each needed range through the store,
checking each against the manifest before DCP unpickles or loads anything.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import posixpath
from pathlib import Path

import torch

from ..errors import first_line
from .base import CheckpointError, CheckpointMismatch, item_key, sha256, space_hint


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
                digest = manifest["items"].get(item_key(rel, offset, length))
                if digest is None or len(blob) != length or sha256(blob) != digest:
                    raise CheckpointError(f"state/{rel} bytes {offset}..{offset + length} fail their checksum "
                                          "(corrupted)")
                self.fs.files.setdefault(path, {})[offset] = blob
            return super().read_data(plan, planner)

    return RangeReader()


class DCPFormat:
    """The format of the engines whose tensors DCP saves (no sharding, FSDP2)."""

    name = "dcp"
    engines = ("none", "fsdp")

    def stage(self, engine, local: Path):
        return _staged(engine.state_tensors())

    def write(self, staged, local: Path, group) -> dict[str, str]:
        # DCP's save is collective: a rank whose own copy failed still takes part (and
        # DCP shares any rank's failure); its failure is reported by the caller after.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        if staged is None:  # this rank's copy failed: an empty share keeps the collective whole
            staged = {}
        try:
            metadata = dcp.save(staged, storage_writer=dcp.FileSystemWriter(str(local / "state")),
                                process_group=group)
        except CheckpointException as e:
            raise CheckpointError(f"writing the state failed on {_dcp_reason(e)}{space_hint(local)}") from None
        items = {}
        for info in metadata.storage_data.values():
            path = local / "state" / info.relative_path
            if path.exists():  # this rank's file: a checksum per tensor, for ranged reads
                with open(path, "rb") as f:
                    f.seek(info.offset)
                    blob = f.read(info.length)
                items[item_key(info.relative_path, info.offset, info.length)] = sha256(blob)
        return items

    def restore(self, store, name: str, manifest: dict, *, rank: int, world: int, engine, group) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        root = posixpath.join(store.root, name, "state")
        try:  # checked against the manifest before it is unpickled, and unpickled restricted
            metadata = _load_metadata(store.fetch(name, manifest, "state/.metadata"))
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"state/.metadata: {e}") from None
        keys = metadata.state_dict_metadata.keys()
        tensors = engine.state_templates(keys)
        missing = sorted(k for k in tensors if k not in keys)
        if missing:
            raise CheckpointMismatch(f"it has no {missing[0].split('/', 1)[1]!r} (model parameter or state) "
                                     f"of this job's model ({len(missing)} missing): another model?")
        try:
            dcp.load(tensors, storage_reader=_reader(store.fs, root, manifest, metadata), process_group=group)
        except CheckpointException as e:
            raise CheckpointError(f"loading failed on {_dcp_reason(e)}") from None
        engine.load_state_tensors(tensors, manifest["scheduler"])
