"""DeepSpeed's own checkpoint: every rank writes its ZeRO shard itself, synchronously.

    deepspeed/state/...    DeepSpeed's files: the common ones and zero_pp_rank_<r>_* per rank

The shards are per rank, so such a checkpoint resumes on as many workers only
(training.sharding=fsdp reshards).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .base import CheckpointMismatch


class DeepSpeedFormat:
    name = "deepspeed"
    engines = ("deepspeed",)

    def stage(self, engine, local: Path):
        # DeepSpeed writes its shards itself, synchronously (into local disk, not S3).
        engine.ds.save_checkpoint(str(local / "deepspeed"), tag="state")
        return None

    def write(self, staged, local: Path, group) -> dict[str, str]:
        return {}  # the files are written; each file gets its checksum with the others

    def restore(self, store, name: str, manifest: dict, *, rank: int, world: int, engine, group) -> None:
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
                    Path(tmp, rel).write_bytes(store.fetch(name, manifest, rel))
            engine.ds.load_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
        engine.follow_schedule()
