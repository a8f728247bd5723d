import subprocess
import sys

import pytest

from orchestrator.cli import main


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch-rockets"])
    assert e.value.code == 2
    assert "invalid choice: 'launch-rockets'" in capsys.readouterr().err


def test_ring_demo_runs_and_reports_exactness():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ring-demo", "--seq", "256", "--worlds", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    line = next(l for l in out.splitlines() if "W=2" in l)
    err = float(line.rsplit(":", 1)[1])
    assert err < 1e-4, line  # float32 ring vs one process: a few ulps, see test_ring_attention


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    from orchestrator import cli

    def boom(args):
        raise RuntimeError("the cluster said no")

    monkeypatch.setattr(cli, "cmd_status", boom)
    assert cli.main(["status", "raysubmit_x"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: status: RuntimeError: the cluster said no (`longview -v status ...` shows where)"]
    with pytest.raises(RuntimeError, match="the cluster said no"):
        cli.main(["-v", "status", "raysubmit_x"])
