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
ENV_KEYS = (FAULTS_ENV, FAULT_DIR_ENV, S3_CONTROL_ENV)
KINDS = ("raise", "kill", "stall", "s3down")
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
            marker = os.path.join(os.environ.get(FAULT_DIR_ENV, "."), f"{kind}-{step}-{rank}")
            if os.path.exists(marker):
                return None
            open(marker, "w").close()  # before firing: a killed worker cannot write it afterwards
            return f
    return None


class StepFaults:
    """Wraps one training step: `with StepFaults(step, rank, settle=...): ...`.

    settle: called before a fault fires, to let the checkpoint in flight complete; the
    suite injects faults to test resuming from the last checkpoint, and a save still
    being written in the background would otherwise make that point a matter of timing."""

    def __init__(self, step: int, rank: int, settle=None):
        self.step, self.rank, self.settle, self._timer = step, rank, settle, None

    def __enter__(self):
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
