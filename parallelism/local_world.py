"""A group of local processes joined by gloo, kept alive to run many functions.

Tests, the demo and the CPU benchmark need W real processes talking over gloo.
Starting processes and importing torch costs seconds, so `LocalWorld` starts them once
and then runs any number of module-level functions on every rank:

    with LocalWorld(4) as world:
        results = world.run(fn, arg)   # fn(arg) on every rank; list indexed by rank

Failures do not hang: a rank that raises sends its traceback back and `run` raises it;
collectives time out after `timeout_s`; `close` stops every process by PID.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from .dims import init_distributed


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1: every socket is held until all are chosen, so
    no two of them can be the same port."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _worker(rank, world_size, port, timeout_s, threads, inbox, outbox):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # What torchrun / Ray Train set for each worker; libraries such as DeepSpeed read them.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init_distributed(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout_s=timeout_s,
        )
        outbox.put((rank, "ready", None))
    except Exception:  # noqa: BLE001 - the parent raises it, with this rank's traceback
        outbox.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = inbox.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            outbox.put((rank, "ok", fn(*args, **kwargs)))
        except Exception:  # noqa: BLE001 - the parent raises it, with this rank's traceback
            outbox.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class RankError(RuntimeError):
    pass


class LocalWorld:
    def __init__(self, world_size: int, *, timeout_s: float = 120.0, threads_per_rank: int = 1):
        if world_size < 1:
            raise ValueError(f"LocalWorld: world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.threads_per_rank = threads_per_rank
        self._answer_timeout_s = 2 * timeout_s + 30
        self._procs: list = []

    def __enter__(self) -> LocalWorld:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        for r in range(self.world_size):
            p = ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self.timeout_s, self.threads_per_rank, self._inboxes[r], self._outbox),
                daemon=True,
            )
            p.start()
            self._procs.append(p)
        try:
            self._collect("ready")
        except BaseException:
            self.close()
            raise

    def _collect(self, expected: str) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors = []
        # Longer than the collective timeout, so a rank stuck in a collective reports its
        # own timeout error before we give up on it; a rank that dies is noticed at once.
        deadline = time.monotonic() + self._answer_timeout_s
        pending = self.world_size
        while pending:
            try:
                rank, status, value = self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    raise RankError(f"rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})") from None
                if time.monotonic() > deadline:
                    raise RankError(f"no answer within {self._answer_timeout_s}s") from None
                continue
            pending -= 1
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            results[rank] = value
        if errors:
            raise RankError("\n".join(errors))
        return results

    def run(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """Runs fn(*args, **kwargs) on every rank; returns the results by rank."""
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        return self._collect("ok")

    def close(self) -> None:
        for box, p in zip(getattr(self, "_inboxes", []), self._procs):
            if p.is_alive():
                box.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():  # stop it by PID, never by name
                os.kill(p.pid, 9)
                p.join(timeout=5)
        self._procs = []
