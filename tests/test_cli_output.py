"""What a user reads: Ray's output routed to the run's log, secrets never echoed, one line
per failure, exit codes as shells report them."""

import logging
import signal
import subprocess
import sys

import pytest

from orchestrator.ray_output import RayOutput


def _batch(lines, *, pid=101, actor="RayTrainWorker", is_err=False):
    return {"pid": pid, "actor_name": actor, "is_err": is_err, "lines": lines}


def test_ray_output_goes_to_the_file_and_only_our_lines_to_the_terminal(tmp_path, capsys):
    before = list(logging.getLogger("ray").handlers)
    out = RayOutput()
    out.to_file(tmp_path / "run.log", stream_all=False)
    try:
        out._on_batch(_batch(["[longview] step 1/4 loss 2.0", "Setting up process group"]))
        out._on_batch(_batch(["Traceback (most recent call last):", "ValueError: boom",
                              "\x1b[33m[longview] WARNING: slow step\x1b[0m"], is_err=True))
        out._on_batch(_batch(["Requesting resources: {'CPU': 1.0} * 2"], pid=7, actor="TrainController"))
        said = capsys.readouterr()
        assert said.out == "[longview] step 1/4 loss 2.0\n"
        assert said.err == "[longview] WARNING: slow step\n"  # Ray's colours left out
        out.mute()  # the driver is about to print a failure's line: nothing may follow it
        out._on_batch(_batch(["[longview] step 2/4 loss 1.0"]))
        assert capsys.readouterr() == ("", "")
        logging.getLogger("ray.test").warning("driver-side note")  # the driver's `ray` logger: the file only
        assert capsys.readouterr() == ("", "")
    finally:
        data = out.close().decode()
    # The file has everything, with Ray's prefixes, in order, the muted line included.
    assert data.splitlines()[:2] == ["(RayTrainWorker pid=101) [longview] step 1/4 loss 2.0",
                                     "(RayTrainWorker pid=101) Setting up process group"]
    for text in ("(RayTrainWorker pid=101) Traceback (most recent call last):",
                 "(TrainController pid=7) Requesting resources", "(RayTrainWorker pid=101) [longview] step 2/4",
                 "driver-side note"):
        assert text in data, text
    assert "\x1b[" not in data
    assert logging.getLogger("ray").handlers == before  # the driver's `ray` logger as it was


def test_everything_streams_with_verbose_whether_ray_connected_first_or_not(tmp_path, capsys, monkeypatch):
    from ray._private import worker

    printed = []
    dispatcher = worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", printed.append)])
    out = RayOutput()
    out.install()  # as connect_ray does, before the run's file is set
    assert [name for name, _ in dispatcher.handlers] == ["longview_run_log"]  # Ray's printer taken out
    batch = _batch(["[longview] step 1/4", "Traceback (most recent call last):"])
    out._on_batch(batch)  # no run routed yet: Ray's printer gets it, as without longview
    out.to_file(tmp_path / "run.log", stream_all=True)
    try:
        out._on_batch(batch)  # -v: the file and Ray's printer, whole
        out.mute()
        out._on_batch(batch)  # after the failure's line: the file only
    finally:
        data = out.close().decode()
    assert printed == [batch, batch]
    assert capsys.readouterr() == ("", "")  # nothing printed by us beside Ray's printer
    assert data.count("Traceback") == 2 and "[longview] step 1/4" in data


def test_a_failed_run_mutes_the_workers_and_keeps_its_log(tmp_path, capsys, monkeypatch):
    """run_output around a run that raises: the terminal gets nothing from the workers after
    it (the failure's line comes next), the log reaches the run's storage and `keep`."""
    from orchestrator.config import load_config
    from orchestrator.ray_job import run_output
    from orchestrator.ray_output import ROUTER

    monkeypatch.setenv("LONGVIEW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(logging.getLogger("longview"), "level", logging.INFO)  # not -v, whatever ran before
    cfg = load_config("configs/v2pe-demo.yaml", overrides={"name": "muted", "storage.uri": str(tmp_path / "runs")})
    kept = {}
    with pytest.raises(RuntimeError, match="boom"):
        with run_output(cfg, "train", lambda data, name: kept.update({name: data})):
            ROUTER._on_batch(_batch(["[longview] step 1/4"]))
            raise RuntimeError("boom")
    ROUTER._on_batch(_batch(["[longview] step 2/4", "Traceback (most recent call last):"]))  # late lines
    said = [ln for ln in capsys.readouterr().out.splitlines() if "Ray's output" not in ln]  # the path, said once
    assert said == ["[longview] step 1/4"]
    [(name, data)] = kept.items()
    assert name.startswith("logs/train-") and b"(RayTrainWorker pid=101) [longview] step 1/4" in data
    assert (tmp_path / "runs" / "muted" / name).read_bytes() == data  # beside the checkpoints


def test_one_scrub_for_uri_credentials():
    from orchestrator.errors import failure_reason, first_line
    from orchestrator.log import setup
    from workloads.scrub import scrub_credentials

    assert scrub_credentials("storage.uri: 's3://user:secret@longview/runs' bad") == \
        "storage.uri: 's3://***@longview/runs' bad"
    assert scrub_credentials("http://alice@host:5000/x and https://b:c@d/e") == "http://***@host:5000/x and https://***@d/e"
    assert scrub_credentials("s3://bucket/key@v2 and user@example.com") == "s3://bucket/key@v2 and user@example.com"
    assert scrub_credentials("s3://u:p@ss@bucket/x") == "s3://***@bucket/x"  # an unencoded @ in the password
    # Secrets in a query: named tokens and keys, a presigned URL's signature, credential
    # and session token; other parameters are left as they are.
    assert scrub_credentials("tracking at http://h:5000/?token=abc123&x=1 down") == \
        "tracking at http://h:5000/?token=***&x=1 down"
    presigned = ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F2026"
                 "&X-Amz-Date=20261207T000000Z&X-Amz-Signature=deadbeef&X-Amz-Security-Token=FwoGZX")
    assert scrub_credentials(presigned) == ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                            "&X-Amz-Credential=***&X-Amz-Date=20261207T000000Z&X-Amz-Signature=***"
                                            "&X-Amz-Security-Token=***")
    assert scrub_credentials("'https://a.blob/c?sv=1&sig=Zm9v' and http://h/?api_key=k;secret=s#top") == \
        "'https://a.blob/c?sv=1&sig=***' and http://h/?api_key=***;secret=***#top"
    assert scrub_credentials("http://h/x?password=p&Auth=q&page=2") == "http://h/x?password=***&Auth=***&page=2"
    assert scrub_credentials("s3://bucket/key?versionId=3") == "s3://bucket/key?versionId=3"
    e = RuntimeError("Ray wrapped it\nDataError: data.train: s3://k:secret@b/x is not a file")
    assert failure_reason(e) == "DataError: data.train: s3://***@b/x is not a file"
    assert first_line(ValueError("http://a:secret@h/ down")) == "http://***@h/ down"
    setup("INFO")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger = logging.getLogger("longview")
    keep = Keep()
    for h in logger.handlers:  # what longview's own handlers let through, and as what
        keep.addFilter(lambda r, h=h: all(f.filter(r) for f in h.filters))
    logger.addHandler(keep)
    try:
        logger.info("uploading to %s", "s3://key:secret@bucket/run")
        logger.info("MLflow at %s does not answer", "http://h:5000/?token=t0ken")
    finally:
        logger.removeHandler(keep)
    assert records == ["uploading to s3://***@bucket/run", "MLflow at http://h:5000/?token=*** does not answer"]


def test_the_runs_log_file_is_scrubbed(tmp_path):
    """What the workers print (a URL with a token in a library's error) reaches the run's
    log file, stored with the run and logged to MLflow, scrubbed."""
    from orchestrator.ray_output import RayOutput

    out = RayOutput()
    out.to_file(tmp_path / "train.log", stream_all=False)
    out.mute()
    try:
        out._on_batch(_batch(["GET https://h/w.pt?X-Amz-Signature=s1gn failed", "[longview] step 1/4"]))
        out.write("ray: fetching http://alice:pw@h/x?token=t0k\n")
    finally:
        data = out.close().decode()
    assert "s1gn" not in data and "t0k" not in data and "pw@" not in data, data
    assert "X-Amz-Signature=***" in data and "http://***@h/x?token=***" in data


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_credential_in_a_uri_is_never_printed(verbose, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LONGVIEW_HOME": str(tmp_path / "lv")}
    for key in ("storage.uri", "tracking.uri", "storage.endpoint_url"):
        proc = _cli(*verbose, "train", "configs/v2pe-demo.yaml", "--set", f"{key}=s3://user:secret@longview/runs",
                    env=env)
        assert proc.returncode == 1 and "secret" not in proc.stdout + proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"config error: {key}: "), proc.stderr


def test_set_errors_are_config_errors():
    proc = _cli("train", "configs/v2pe-demo.yaml", "--set", "training.steps")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "config error: --set 'training.steps': expected key=value"
    proc = _cli("plan", "configs/v2pe-demo.yaml", "--set", "training.steps=[")
    assert proc.returncode == 1 and proc.stderr.startswith("config error: --set 'training.steps=[': "), proc.stderr


def test_a_stopped_run_exits_as_shells_report_the_signal(monkeypatch):
    from orchestrator import ray_job

    monkeypatch.setattr(ray_job, "_STOP_SIGNAL", ["SIGINT (Ctrl-C)"])
    assert ray_job.stopped_exit_code() == 128 + signal.SIGINT == 130
    monkeypatch.setattr(ray_job, "_STOP_SIGNAL", ["SIGTERM"])
    assert ray_job.stopped_exit_code() == 128 + signal.SIGTERM == 143


def test_a_failed_jobs_reason_is_found_in_its_log():
    from orchestrator.cli import _reason_in_log

    log = ("[longview] step 1/4\nerror: training x failed: DivergenceError: step 2: loss nan\n"
           "(RayTrainWorker pid=1) Traceback (most recent call last):\n(RayTrainWorker pid=1)   raise\n")
    assert _reason_in_log(log) == "training x failed: DivergenceError: step 2: loss nan"
    assert _reason_in_log("stopped: training x stopped (SIGTERM); it resumes from s3://b/x/step-2\n").startswith(
        "training x stopped (SIGTERM)")
    assert _reason_in_log("nothing of ours\n") is None


def test_submit_wait_says_something_at_least_every_15_s(monkeypatch):
    """A job that is starting (no step yet, status unchanged) still gets a line every
    HEARTBEAT_S seconds; nothing more often than that while nothing changes."""
    import logging
    from types import SimpleNamespace

    from orchestrator import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress.log.addHandler(handler)
    level = progress.log.level
    progress.log.setLevel(logging.INFO)
    try:
        cfg = SimpleNamespace(name="job", training=SimpleNamespace(steps=10), tracking=SimpleNamespace(uri=None))
        p = progress.JobProgress(cfg)
        p.update("RUNNING")  # a new status: said
        for dt in (5, 5, 4.9):  # 14.9 s of nothing new: quiet
            clock[0] += dt
            p.update("RUNNING")
        assert len(lines) == 1
        clock[0] += 0.1  # 15 s since the last line
        p.update("RUNNING")
        assert len(lines) == 2 and "RUNNING: step 0/10" in lines[-1] and "[   15s]" in lines[-1], lines
    finally:
        progress.log.removeHandler(handler)
        progress.log.setLevel(level)
