"""Fault injection for the reliability suite (tests/e2e). Inert unless LONGVIEW_FAULTS is set.

    LONGVIEW_FAULTS="kill@3:1,kill@5:0,s3down@4=3"   LONGVIEW_FAULT_DIR=/tmp/markers

Each entry is KIND@STEP[:RANK][=ARG]; the fault fires once, on that rank (default 0),
when the worker reaches that step (0-based: the step about to run), and leaves a marker
file `KIND-STEP-RANK` in LONGVIEW_FAULT_DIR so a restarted worker does not fire it
again. Kinds:

- raise: the worker raises (an ordinary Python failure);
- kill: the worker SIGKILLs itself partway through the step (no cleanup, no exception);
- stall: the worker stops before the step and never enters its collectives, so its
  peers block until the collective timeout;
- s3down: before the upload of checkpoint step-STEP, S3 goes away for ARG seconds (the
  TCP proxy of the suite watches LONGVIEW_S3_CONTROL; the worker writes ARG there).
- hold: every rank (RANK is ignored) waits before step STEP, at every visit, until the
  file `release-ARG` exists in LONGVIEW_FAULT_DIR; while it waits, rank 0 writes the
  group's size to `held-ARG`. A test that must change the cluster while the run is still
  going holds it there instead of racing it. The wait is bounded by
  LONGVIEW_HOLD_TIMEOUT_S (default 900 s); past it the worker raises, naming the file it
  waited for.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

FAULTS_ENV = "LONGVIEW_FAULTS"
FAULT_DIR_ENV = "LONGVIEW_FAULT_DIR"
S3_CONTROL_ENV = "LONGVIEW_S3_CONTROL"
HOLD_TIMEOUT_ENV = "LONGVIEW_HOLD_TIMEOUT_S"
ENV_KEYS = (FAULTS_ENV, FAULT_DIR_ENV, S3_CONTROL_ENV, HOLD_TIMEOUT_ENV)
KINDS = ("raise", "kill", "stall", "s3down", "hold")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    arg: str = ""


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, rest = item.split("@", 1)
            rest, _, arg = rest.partition("=")
            step, _, rank = rest.partition(":")
            fault = Fault(kind, int(step), int(rank or 0), arg)
        except ValueError:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not KIND@STEP[:RANK][=ARG]") from None
        if kind not in KINDS:
            raise ValueError(f"{FAULTS_ENV}: unknown fault kind {kind!r}; choose one of {', '.join(KINDS)}")
        faults.append(fault)
    return faults


def _due(kind: str, step: int, rank: int) -> Fault | None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return None
    for f in parse(spec):
        if f.kind == kind and f.step == step and f.rank == rank:
            marker = os.path.join(_fault_dir(), f"{kind}-{step}-{rank}")
            if os.path.exists(marker):
                return None
            open(marker, "w").close()  # before firing: a killed worker cannot write it afterwards
            return f
    return None


def _fault_dir() -> str:
    return os.environ.get(FAULT_DIR_ENV, ".")


def hold(step: int, rank: int, world: int, settle=None) -> None:
    """Waits before `step` while a `hold` fault for it is not released (see the module's doc)."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    for f in parse(spec):
        if f.kind != "hold" or f.step != step:
            continue
        release = os.path.join(_fault_dir(), f"release-{f.arg}")
        if os.path.exists(release):
            continue
        if settle is not None:
            settle()  # the checkpoint in flight lands first: a resize resumes from it
        if rank == 0:
            held = os.path.join(_fault_dir(), f"held-{f.arg}")
            with open(held + ".tmp", "w") as fh:
                fh.write(str(world))
            os.replace(held + ".tmp", held)
            log.warning(f"held before step {step} on {world} workers until {release} exists")
        timeout_s = float(os.environ.get(HOLD_TIMEOUT_ENV, "900"))
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise RuntimeError(f"hold@{step}: {release} did not appear within {timeout_s:.0f} s")
            time.sleep(0.2)


class StepFaults:
    """Wraps one training step: `with StepFaults(step, rank, settle=...): ...`.

    settle: called before a fault fires, to let the checkpoint in flight complete; the
    suite injects faults to test resuming from the last checkpoint, and a save still
    being written in the background would otherwise make that point a matter of timing."""

    def __init__(self, step: int, rank: int, settle=None, world: int = 1):
        self.step, self.rank, self.world, self.settle, self._timer = step, rank, world, settle, None

    def __enter__(self):
        hold(self.step, self.rank, self.world, self.settle)
        for kind in ("raise", "stall", "kill"):
            if _due(kind, self.step, self.rank):
                if self.settle is not None:
                    self.settle()
                self._fire(kind)
                break
        return self

    def _fire(self, kind: str) -> None:
        if kind == "raise":
            raise RuntimeError(f"injected fault at step {self.step}")
        if kind == "stall":
            log.warning(f"injected stall on rank {self.rank} at step {self.step}")
            while True:
                time.sleep(3600)
        log.warning(f"injected SIGKILL on rank {self.rank} during step {self.step}")
        self._timer = threading.Timer(0.05, _kill_self)
        self._timer.start()

    def __exit__(self, *exc):
        if self._timer is not None:  # the step was quicker than the timer: die now, still inside it
            _kill_self()
        return False


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_checkpoint_upload(step: int, rank: int) -> None:
    """s3down: ask the suite's proxy to drop S3 for ARG seconds, right before the upload."""
    f = _due("s3down", step, rank)
    if f is not None:
        control = os.environ[S3_CONTROL_ENV]
        with open(control + ".tmp", "w") as fh:
            fh.write(f.arg or "5")
        os.replace(control + ".tmp", control)
        time.sleep(0.2)  # the proxy polls every 50 ms
        log.warning(f"injected S3 outage of {f.arg or 5} s before the step-{step} checkpoint")
