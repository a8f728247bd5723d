"""Checkpoint formats: how an engine's tensors become files in a checkpoint folder, and back.

A format is one class with the methods of `CheckpointFormat`, in a file of its own,
and one line in `FORMATS`. A job picks one with `training.checkpoint_format`; "auto"
is the one that holds its engine's state. `orchestrator.checkpoint` owns everything around it: the
local temp folder, the upload of every file with its checksum, the verdict exchange,
the manifest, the fallback past a bad checkpoint, the RNG states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .base import CheckpointError, CheckpointMismatch
from .dcp import DCPFormat
from .deepspeed import DeepSpeedFormat


class CheckpointFormat(Protocol):
    name: str
    engines: tuple[str, ...]  # the engine kinds (training.sharding) whose state it holds

    def stage(self, engine, local: Path) -> Any:
        """In the training thread (it blocks training): what `write` needs, copied now,
        or written into `local` now. Raises OSError/RuntimeError for a failed local write."""

    def write(self, staged: Any, local: Path, group) -> dict[str, str]:
        """In the background, collective over `group` (`staged` is None on a rank whose
        stage failed: it still takes part): this rank's files under `local`; returns
        {item key: SHA-256} of byte ranges a restore reads alone ({} when it reads whole files)."""

    def restore(self, store, name: str, manifest: dict, *, rank: int, world: int, engine, group) -> None:
        """Collective: loads checkpoint `name` into `engine`, reading through
        `store.fetch` (checked whole files) or the store's filesystem (checked ranges)."""


FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (DCPFormat(), DeepSpeedFormat())}


def format_for(engine_kind: str, name: str = "auto") -> CheckpointFormat:
    """The format `name` ("auto": the first that holds `engine_kind`); CheckpointError
    when it is unknown or cannot hold that engine's state."""
    if name != "auto":
        f = FORMATS.get(name)
        if f is None:
            raise CheckpointError(f"checkpoint format {name!r} is unknown; the formats: {', '.join(FORMATS)}")
        if engine_kind not in f.engines:
            holds = [n for n, g in FORMATS.items() if engine_kind in g.engines]
            raise CheckpointError(f"checkpoint format {name!r} holds the state of engines {', '.join(f.engines)}, not "
                                  f"{engine_kind!r} (for it: {', '.join(holds) or 'none'})")
        return f
    for f in FORMATS.values():
        if engine_kind in f.engines:
            return f
    raise CheckpointError(f"no checkpoint format holds the state of engine {engine_kind!r}")


__all__ = ["FORMATS", "CheckpointError", "CheckpointFormat", "CheckpointMismatch", "format_for"]
