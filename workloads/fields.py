"""What a config section's fields are made of: bounds the loader checks (`bounded`), the
error a section's own rule raises (`FieldError`), the refusal of credentials in a URI
field, and the resume rules a section declares per field.

Standard library only: workload configs load on machines that have only PyTorch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from .scrub import scrub_credentials

# What a resumed run may change, field by field (`orchestrator.resume`). A config section
# lists its rules in a class attribute `RESUME = {"field": APPLY | NEW_RUN | REFUSE}`;
# a field it leaves out is NEW_RUN, so a section nobody classified never lets a change
# slip into a checkpoint's run unseen.
APPLY = "apply"  # takes effect from the resumed step (learning rate, steps, logging, workers)
NEW_RUN = "new_run"  # fixed for the run's life (data order, its MLflow experiment): start a new run
REFUSE = "refuse"  # the checkpoint cannot hold it (model shape, tokenizer, the data itself)


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, default_factory: Any = dataclasses.MISSING):
    """A config field with bounds on itself (`ge`, `gt`, `le`; for a list, on each item).
    The config loader checks them and names the key; code that builds a section directly
    gets them from `check_bounds`."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return field(default=default, default_factory=default_factory, metadata=meta)


def no_credentials(key: str, uri: str | None) -> None:
    """A URI field must not carry a user or password (`http://alice:secret@host`): the
    config is printed, logged as MLflow params and stored with the run. FieldError if it does."""
    if not uri or "://" not in uri:
        return
    if scrub_credentials(uri) != uri:
        safe = scrub_credentials(uri)
        raise FieldError(key, f"{safe} is given with credentials in it (user:password@, or a token, key or "
                              "signature in its query), which the config would carry into every record of the run (MLflow "
                              "params, the checkpoints' manifests): give them in the environment "
                              "(MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")


class FieldError(ValueError):
    """A config section's own rule was broken; `key` is the field inside the section
    ("" for the section as a whole). The config loader adds the section's path."""

    def __init__(self, key: str, message: str):
        message = scrub_credentials(message)
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message


def bound_error(value: Any, meta: dict) -> str | None:
    """Why `value` breaks the bounds in `meta` ("must be > 0, got 0"), or None."""
    if "ge" in meta and "le" in meta and not meta["ge"] <= value <= meta["le"]:
        return f"{value!r} is not in {meta['ge']:g}..{meta['le']:g}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be > {meta['gt']:g}, got {value!r}"
    if "ge" in meta and not value >= meta["ge"]:
        return f"must be >= {meta['ge']:g}, got {value!r}"
    if "le" in meta and not value <= meta["le"]:
        return f"must be <= {meta['le']:g}, got {value!r}"
    return None
