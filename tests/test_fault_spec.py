"""The fault-injection spec (orchestrator/faults.py): parsing, and each fault fires once."""

import time

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


def test_a_hold_waits_on_every_rank_until_released_and_names_what_it_waited_for(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("LONGVIEW_FAULTS", "hold@3=grow")
    monkeypatch.setenv("LONGVIEW_FAULT_DIR", str(tmp_path))
    with StepFaults(2, 1, world=2):  # another step: no wait
        pass
    done, settled = threading.Event(), []

    def step_three():
        with StepFaults(3, 0, settle=lambda: settled.append(3), world=2):
            done.set()

    worker = threading.Thread(target=step_three, daemon=True)
    worker.start()
    held = tmp_path / "held-grow"
    # Bounded waits on conditions: the held file appears, the step has not run.
    deadline = time.monotonic() + 30
    while not held.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.read_text() == "2" and settled == [3] and not done.is_set()
    (tmp_path / "release-grow").touch()
    assert done.wait(timeout=30), "the released step did not run"
    with StepFaults(3, 1, world=3):  # released: a later visit (another group) passes at once
        pass
    (tmp_path / "release-grow").unlink()
    monkeypatch.setenv("LONGVIEW_HOLD_TIMEOUT_S", "0.3")
    with pytest.raises(RuntimeError, match=r"hold@3: .*release-grow did not appear within 0 s"):
        with StepFaults(3, 1, world=3):
            pass
