"""Security properties that need no running job: loopback-only services unless exposed
on purpose, and checkpoints that cannot run code when loaded. (The credential scan of a
whole run is in tests/e2e/test_security_scan.py.)"""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from orchestrator.checkpoint import TrainState, _write_manifest, restore_checkpoint, save_checkpoint
from orchestrator.services import ServiceError, check_bind_host, start_s3, stop_pid
from workloads.engine import TrainingConfig, build_engine


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
    assert not [c for c in cmdlines if b"moto.server" in c]


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


class _Boom:
    """An object whose unpickling would run code (here: create a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    model = torch.nn.Linear(4, 4)
    engine = build_engine(model, TrainingConfig(sharding="none"))
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, rank=0, state=TrainState(step=3), engine=engine)
    restore_checkpoint(folder, rank=0, world_size=1, engine=engine)  # the honest checkpoint loads
    # Someone with write access to the bucket swaps in a pickle that runs code, and
    # rewrites the manifest so the checksums match.
    canary = tmp_path / "pwned"
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"weight": _Boom(str(canary))}, f)
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("manifest"))
    _write_manifest(folder, 0, files)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        restore_checkpoint(folder, rank=0, world_size=1, engine=engine)
    assert not canary.exists()


def test_manifest_catches_missing_and_corrupted_files(tmp_path):
    from orchestrator.checkpoint import CheckpointError, verify

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    _write_manifest(tmp_path, 0, ["a.bin"])
    verify(tmp_path, 1)
    with pytest.raises(CheckpointError, match="manifest of rank 1 is missing"):
        verify(tmp_path, 2)
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match="a.bin fails its checksum"):
        verify(tmp_path, 1)
