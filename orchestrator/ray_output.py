"""Where Ray's own output goes while a driver runs a job (`longview train`, `eval`,
`experiment`).

Ray streams every worker's and actor's stdout and stderr to the driver and prints it
there with its `(RayTrainWorker pid=...)` prefix: tracebacks from the workers and the
Train controller, its resource requests, the repeated-lines notes. That is the run's
log, not what a user follows. So while a run is routed here:

- everything Ray sends (and the driver's own `ray` logger) is written to the run's log
  file, prefixes kept, as Ray would have printed it;
- the terminal gets only longview's lines from the workers (`[longview] ...`: progress,
  memory, data counts), without Ray's prefix; `-v` (or a submitted job, whose output
  is the Ray job log) streams everything as Ray does;
- `mute()` stops even those before the driver prints a failure's one-line reason, so
  that reason is the last line, whatever the workers still send.

Ray hands the driver its workers' lines through a dispatcher in `ray._private.worker`
(its `log_to_driver` printer is one handler there): the routing swaps that handler for
ours. If a Ray release moves it, the output stays as Ray prints it (logged at debug).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path

from workloads.scrub import scrub_credentials

log = logging.getLogger(__name__)

OUR_PREFIX = "[longview]"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PRINTER = "ray_print_logs"  # the name Ray registers its printer under
_OURS = "longview_run_log"


class RayOutput:
    """The routing of one driver process (`ROUTER`): a run sets its file with `to_file`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._file = None
        self.path: Path | None = None
        self._stream_all = False
        self._muted = False
        self._ray_handlers: list[logging.Handler] | None = None
        self._ray_printer = None  # Ray's own printer of the workers' lines, taken out of its dispatcher
        self.last_ours: float | None = None  # time.monotonic() of the workers' last `[longview]` line

    def to_file(self, path: Path, *, stream_all: bool) -> None:
        """From now on Ray's output goes to `path` (appended); the terminal gets all of it
        (stream_all) or longview's lines only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = open(path, "a", encoding="utf-8", errors="replace")
            self.path, self._stream_all, self._muted = path, stream_all, False
        self._route_ray_logger()

    def _route_ray_logger(self) -> None:
        """The driver's `ray` logger (connection notes, warnings) into the file; also to
        the terminal only when everything streams."""
        ray_logger = logging.getLogger("ray")
        if self._ray_handlers is None:
            self._ray_handlers = list(ray_logger.handlers)
        to_file = logging.StreamHandler(self)  # writes through `write` below
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        ray_logger.handlers[:] = [to_file, *(self._ray_handlers if self._stream_all else [])]
        ray_logger.propagate = False
        # asyncio's reports of the storage client's dropped connections while S3 is down
        # ("Task exception was never retrieved" with a traceback): the file's, as Ray's
        # are; the run's own line says what happened.
        loop_logger = logging.getLogger("asyncio")
        loop_logger.handlers[:] = [to_file, *([logging.StreamHandler()] if self._stream_all else [])]
        loop_logger.propagate = False

    def install(self) -> None:
        """After `ray.init` (again after each): Ray's printer of the workers' lines replaced
        by ours, which calls it when everything streams (whether `to_file` came first or not)."""
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        except ImportError as e:  # a Ray that moved it: its own printing stays
            log.debug("Ray's output is not routed (%s): it prints as Ray prints it", e)
            return
        handlers = dict(dispatcher.handlers)
        if _RAY_PRINTER in handlers:
            self._ray_printer = handlers[_RAY_PRINTER]
            dispatcher.remove_handler(_RAY_PRINTER)
        if _OURS not in handlers:
            dispatcher.add_handler(_OURS, self._on_batch)

    @staticmethod
    def _autoscaler_events(lines: list[str]) -> list[str]:
        try:
            from ray._private.worker import filter_autoscaler_events
        except ImportError:
            return lines
        return list(filter_autoscaler_events(lines))

    def _on_batch(self, data: dict) -> None:
        """One batch of lines from a worker or actor (Ray's dict: pid, actor_name, is_err, lines)."""
        who = data.get("actor_name") or data.get("task_name") or ""
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # the monitor's whole log: its events only, as Ray prints them
            lines, prefix = self._autoscaler_events(lines), "(autoscaler) "
        else:
            prefix = "" if data.get("pid") == "raylet" else f"({who} pid={data.get('pid')}) "
        lines = [_ANSI.sub("", line) for line in lines]
        if any(line.startswith(OUR_PREFIX) for line in lines):
            self.last_ours = time.monotonic()
        with self._lock:
            if self._file is not None:  # the run's log: stored with the run and logged to MLflow
                self._file.writelines(scrub_credentials(f"{prefix}{line}\n") for line in lines)
                self._file.flush()
            if self._muted:
                return
            if self._stream_all or self.path is None:  # -v, or no run routed yet: as Ray prints it
                if self._ray_printer is not None:
                    self._ray_printer(data)
                return
            sink = sys.stderr if data.get("is_err") else sys.stdout
            for line in lines:
                if line.startswith(OUR_PREFIX):
                    print(line, file=sink, flush=True)

    def write(self, text: str) -> int:
        """File-like, for the `ray` logger's handler."""
        with self._lock:
            if self._file is not None:
                self._file.write(scrub_credentials(text))
                self._file.flush()
        return len(text)

    def flush(self) -> None:
        pass

    def mute(self) -> None:
        """Nothing more from the workers on the terminal (the file still gets it all)."""
        with self._lock:
            self._muted = True

    def close(self) -> bytes:
        """The run's log, whole; the file closed and the driver's `ray` logger as it was.
        Lines arriving later reach the terminal as the run set it (muted, ours only, or all)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            data = self.path.read_bytes() if self.path is not None and self.path.exists() else b""
        if self._ray_handlers is not None:
            logging.getLogger("ray").handlers[:] = self._ray_handlers
            self._ray_handlers = None
        return data


ROUTER = RayOutput()


def run_log_path(home: Path, run_name: str, what: str) -> Path:
    """`<home>/logs/<run>/<what>-<YYYYmmdd-HHMMSS>.log`: one file per driver invocation."""
    return home / "logs" / run_name / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}.log"
