"""Security properties that need no running job: loopback-only services unless exposed
on purpose. (Checkpoints that cannot run code when loaded: tests/test_checkpoint.py; the credential scan of a
whole run is in tests/e2e/test_security_scan.py.)"""

import os
import subprocess
import sys

import pytest

from orchestrator.services import ServiceError, check_bind_host, start_s3, stop_pid


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # LISTEN
                out.add(addr)
    return out


def test_local_services_listen_on_loopback_only(tmp_path):
    s3 = start_s3(tmp_path, ["lv-bind-test"])
    try:
        port = int(s3.url.rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    finally:
        stop_pid(s3.pid)


def test_a_failed_start_leaves_no_process(tmp_path):
    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(ServiceError, match=r"bucket 'B' could not be created on the local S3 endpoint"):
        start_s3(tmp_path, ["B"])  # upper case: not a valid bucket name
    left = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in before]
    cmdlines = [open(f"/proc/{p}/cmdline", "rb").read() for p in left if os.path.exists(f"/proc/{p}/cmdline")]
    assert not [c for c in cmdlines if b"rclone" in c]


def test_exposing_the_services_takes_a_flag_and_warns(capsys, tmp_path):
    from orchestrator.log import setup

    setup()  # longview's handlers, as the CLI has them
    assert check_bind_host("127.0.0.1", expose=False) is None
    with pytest.raises(ServiceError, match=r"binding the local services to 0.0.0.0 .* pass --expose"):
        check_bind_host("0.0.0.0", expose=False)
    warning = check_bind_host("0.0.0.0", expose=True)
    assert "without authentication" in warning and warning in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "up", "--host", "0.0.0.0", "--no-ray"],
                          env=dict(os.environ, LONGVIEW_HOME=str(tmp_path / "home")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "pass --expose" in proc.stderr and "Traceback" not in proc.stderr


