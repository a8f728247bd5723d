"""longview's logging: the standard `logging` module under the `longview` logger.

Every module logs to `logging.getLogger(__name__)` (orchestrator.*, workloads.*) and
`setup` routes both trees to one format: what a user follows (progress, results) on
stdout, warnings and errors on stderr. The CLI calls it with `--verbose` / `--quiet`;
Ray workers call it too, so their lines reach the driver in the same form.
"""

from __future__ import annotations

import logging
import os
import sys

from workloads.scrub import scrub_credentials

LEVEL_ENV = "LONGVIEW_LOG_LEVEL"  # travels to Ray workers, so -v / -q reach them too
_ROOTS = ("longview", "orchestrator", "workloads", "parallelism", "tests")
_CHATTY = ("ray.train", "mlflow", "botocore", "s3fs", "aiobotocore")


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at the time of the record (a test's
    capture, a redirected stream), not the one there was when logging was set up."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ assigns one; ours is looked up each time
        pass


class _Scrubbed(logging.Filter):
    """Every line with URI credentials scrubbed (`scrub_credentials`), whatever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_credentials(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup(level: int | str | None = None) -> None:
    """Idempotent: (re)configures the handlers of longview's loggers."""
    if level is None:
        level = os.environ.get(LEVEL_ENV, "INFO")
    level = logging.getLevelName(level) if isinstance(level, str) else level
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    detail = "%(asctime)s %(name)s " if level <= logging.DEBUG else ""
    out = _CurrentStream("stdout")
    out.addFilter(_Below(logging.WARNING))
    out.addFilter(_Scrubbed())
    out.setFormatter(logging.Formatter(f"[longview] {detail}%(message)s", "%H:%M:%S"))
    err = _CurrentStream("stderr")
    err.setLevel(logging.WARNING)
    err.addFilter(_Scrubbed())
    err.setFormatter(logging.Formatter(f"[longview] {detail}%(levelname)s: %(message)s", "%H:%M:%S"))
    for name in _ROOTS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(level)
        logger.propagate = False  # Ray's and MLflow's root handlers would print each line again
    quiet_libraries()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the run's URL once


def quiet_libraries() -> None:
    """The libraries' routine INFO lines (every checkpoint report, credential discovery,
    the system-metrics monitor) drown ours; their warnings still show, and -v shows
    everything. Call again after importing a library that configures its own loggers
    (MLflow does, on import)."""
    level = logging.DEBUG if logging.getLogger("longview").level <= logging.DEBUG else logging.WARNING
    names = list(_CHATTY)
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:  # Ray Train names this module's logger by its file path
        names.append(context.__file__)
    for name in names:
        logging.getLogger(name).setLevel(level)

