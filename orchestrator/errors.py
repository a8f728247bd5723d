"""What a user is told when something fails: the one line taken from an exception.

The CLI prints these lines, and the driver loops (training, evaluation) record them
(MLflow's run description, the retry log), so they live below all of them.
"""

from __future__ import annotations

from workloads.scrub import scrub_credentials

# longview's own errors, by class name: Ray nests a worker's exception in its own text,
# so the name is looked for in the lines, not the type in the chain.
OUR_ERRORS = ("StorageUnreachable", "HeadLost", "PretrainedError",
              "CheckpointUploadError", "CollectiveTimeout", "CheckpointError", "DataError", "ResumeRefused",
              "RunBusy", "PlacementTimeout", "ConfigError", "KernelUnavailable", "TokenizerError", "DivergenceError")


class InputError(RuntimeError):
    """Something a job needs is missing or unreachable (found before it starts); the
    message says what to do."""


class StorageUnreachable(RuntimeError):
    """The run's storage stopped answering for longer than its retries: the run ends
    rather than restart its workers into it."""


def first_line(e: BaseException) -> str:
    """An exception's first line, at most 300 characters (for one-line reports)."""
    return scrub_credentials((str(e).strip().splitlines() or [""])[0])[:300]


def failure_reason(e: BaseException, *, storage_retries: int | None = None) -> str:
    """The one line a user needs from a failed run: our own error's message when a worker
    raised one (Ray nests it in its own error text), else the last line of the error."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip()]
    for name in OUR_ERRORS:
        for ln in lines:
            if f"{name}: " in ln:
                return scrub_credentials(ln[ln.index(f"{name}: "):])
    for ln in lines:  # storage unreachable, met by Ray's own code (its controller's records)
        if "Could not connect to the endpoint URL" in ln:
            return scrub_credentials(f"S3 endpoint unreachable after storage.retries={storage_retries} attempts: "
                                     + ln[ln.index("Could not connect"):])
    return scrub_credentials(lines[-1]) if lines else "unknown error"
