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
