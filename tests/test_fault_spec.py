"""The fault-injection spec (orchestrator/faults.py): parsing, and each fault fires once."""

import pytest

from orchestrator.faults import Fault, StepFaults, parse


def test_spec_parses_and_bad_specs_are_named():
    assert parse("kill@3:1,raise@2, s3down@4=3") == [Fault("kill", 3, 1), Fault("raise", 2, 0),
                                                      Fault("s3down", 4, 0, "3")]
    with pytest.raises(ValueError, match=r"LONGVIEW_FAULTS: 'kill@x' is not KIND@STEP"):
        parse("kill@x")
    with pytest.raises(ValueError, match=r"unknown fault kind 'explode'"):
        parse("explode@1")


def test_a_fault_fires_once_and_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVIEW_FAULTS", "raise@2:1")
    monkeypatch.setenv("LONGVIEW_FAULT_DIR", str(tmp_path))
    for step, rank in [(1, 1), (2, 0), (3, 1)]:
        with StepFaults(step, rank):
            pass
    with pytest.raises(RuntimeError, match="injected fault at step 2"):
        with StepFaults(2, 1):
            pass
    assert (tmp_path / "raise-2-1").exists()
    with StepFaults(2, 1):  # the restarted worker passes
        pass


def test_the_checkpoint_in_flight_settles_before_a_fault_fires(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVIEW_FAULTS", "raise@2")
    monkeypatch.setenv("LONGVIEW_FAULT_DIR", str(tmp_path))
    settled = []
    with StepFaults(1, 0, settle=lambda: settled.append(1)):  # no fault due: nothing waits
        pass
    assert settled == []
    with pytest.raises(RuntimeError, match="injected fault at step 2"):
        with StepFaults(2, 0, settle=lambda: settled.append(2)):
            pass
    assert settled == [2]


def test_failure_reason_finds_our_error_inside_rays():
    from orchestrator.cli import failure_reason

    class WorkerGroupError(RuntimeError):
        pass

    nested = WorkerGroupError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...\n"
                              "parallelism.dims.CollectiveTimeout: all-gather of rows on context-parallel group "
                              "cp[dp=0] (ranks 0, 1) timed out on global rank 0\n")
    assert failure_reason(nested).startswith("CollectiveTimeout: all-gather of rows on context-parallel group")
    ray_own = RuntimeError('botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: '
                           '"http://s3/b/run/snapshot.json"')
    assert failure_reason(ray_own, storage_retries=3) == (
        'S3 endpoint unreachable after storage.retries=3 attempts: Could not connect to the endpoint URL: '
        '"http://s3/b/run/snapshot.json"')
    assert failure_reason(ValueError("plain\nlast line")) == "last line"
