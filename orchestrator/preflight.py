"""Checks that cost seconds before a job starts or is submitted, and save minutes: the
run's storage answers and its bucket exists (longview never creates one: `longview up`
does for the local endpoint), the workload's inputs are there and load
(`WorkloadSpec.check_inputs`), and MLflow answers (unless tracking.on_unreachable is
"keep": then a warning, and training never waits on it). Each failure is one `InputError` line that says what to do."""

from __future__ import annotations

import logging

from .checkpoint import checkpoint_store
from .config import ConfigError
from .errors import InputError
from .launch import check_resume
from .resume import ResumeRefused
from .storage import backend_for, resolved

log = logging.getLogger(__name__)


def check_storage(cfg) -> None:
    """The run's storage answers (S3: its bucket exists; a folder: it can be written)."""
    uri = resolved(cfg.storage.uri)
    backend_for(uri).check_reachable(uri, cfg.storage)


def check_tracking(cfg) -> None:
    """MLflow answers at tracking.uri: InputError if not, unless tracking.on_unreachable is
    "keep" (then a warning: the run starts and its records are sent when it answers)."""
    if not cfg.tracking.uri:
        return
    import urllib.request

    try:
        with urllib.request.urlopen(cfg.tracking.uri.rstrip("/") + "/health", timeout=5):
            pass
    except Exception as e:  # noqa: BLE001 - any failure to answer
        if cfg.tracking.on_unreachable == "fail":
            raise InputError(f"MLflow at {cfg.tracking.uri} does not answer ({type(e).__name__}): start it (`longview "
                             "up` for the local one), fix tracking.uri, or set tracking.on_unreachable=keep to run now "
                             "and send its records when it answers") from None
        log.warning("MLflow at %s does not answer (%s); the run starts anyway and its records are sent when it "
                    "answers (tracking.on_unreachable=keep)", cfg.tracking.uri, type(e).__name__)


def check_resume_rules(cfg) -> None:
    """A start that would resume: the resume rules speak before the inputs are checked,
    so a change the checkpoint cannot take (a model size, a tokenizer) is refused as that,
    naming every such key with its old and new value, not as the first input it breaks."""
    try:
        check_resume(cfg, checkpoint_store(cfg))
    except ResumeRefused as e:
        raise InputError(f"ResumeRefused: {e}") from None


def check_inputs(cfg) -> None:
    """The workload's own checks, as one InputError."""
    try:
        cfg.spec.check_inputs(cfg)
    except (ConfigError, ValueError, OSError) as e:  # FieldError, DataError, TokenizerError are ValueErrors
        raise InputError(f"{type(e).__name__}: {e}") from None
