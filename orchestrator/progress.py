"""Progress of a submitted job for `longview submit --wait`.

The job's own record is the source: the steps its MLflow run has logged (the `loss`
metric's last step) against `training.steps`, the last loss, and an ETA from the rate
since the first step seen. On a terminal a rich progress bar; otherwise (logs, CI) one
line whenever the status changes or another tenth of the steps is done, and at least
every 15 s (`longview logs JOB_ID` has what the job itself says).
"""

from __future__ import annotations

import logging
import time

from .tracking import RUN_NAME_TAG, mlflow_client

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0


class JobProgress:
    def __init__(self, cfg, *, poll_s: float = 5.0):
        self.cfg, self.poll_s = cfg, poll_s
        self.total = cfg.training.steps
        self.t0 = time.time()
        self.status, self.step, self.loss = None, 0, None
        self._run_id, self._last_poll, self._first = None, 0.0, None  # first: (time, step) seen
        self._logged_tenth = -1
        self._last_line = 0.0
        self._bar = self._task = None

    def __enter__(self):
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.cfg.name, total=self.total, loss="-")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def _poll(self, force: bool = False) -> None:
        """The run's last logged step and loss; silent when MLflow is not there (yet)."""
        if not self.cfg.tracking.uri or (not force and time.time() - self._last_poll < self.poll_s):
            return
        self._last_poll = time.time()
        try:
            client = mlflow_client(self.cfg.tracking.uri)
            if self._run_id is None:
                exp = client.get_experiment_by_name(self.cfg.experiment)
                runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{self.cfg.name}'",
                                          max_results=1) if exp else []
                if not runs:
                    return
                self._run_id = runs[0].info.run_id
            hist = client.get_metric_history(self._run_id, "loss")
        except Exception as e:  # noqa: BLE001 - progress is a courtesy; the job's status is what counts
            log.debug("progress: MLflow not answering (%s)", e)
            return
        if hist:
            last = max(hist, key=lambda m: m.step)
            self.step, self.loss = last.step, last.value
            if self._first is None:
                self._first = (time.time(), self.step)

    def eta(self) -> float | None:
        if self._first is None or self.step <= self._first[1]:
            return None
        rate = (time.time() - self._first[0]) / (self.step - self._first[1])
        return rate * (self.total - self.step)

    def update(self, status: str) -> None:
        changed = status != self.status
        self._poll(force=changed)  # a new status (the last one above all) shows the latest step
        self.status = status
        if self._bar is not None:
            loss = f"{self.loss:.4f}" if self.loss is not None else "-"
            self._bar.update(self._task, completed=self.step, loss=loss,
                             description=f"{self.cfg.name} [{status}]")
            return
        tenth = 10 * self.step // max(self.total, 1)
        # A line on each change of status, each tenth of the steps, and at least every
        # HEARTBEAT_S while nothing changes (a job starting: placing workers, reading data).
        if changed or tenth > self._logged_tenth or time.time() - self._last_line >= HEARTBEAT_S:
            self._logged_tenth, self._last_line = tenth, time.time()
            eta = self.eta()
            loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
            left = f", ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None and status == "RUNNING" else ""
            log.info("[%5.0fs] %s: step %d/%d%s%s", time.time() - self.t0, status, self.step, self.total, loss, left)
