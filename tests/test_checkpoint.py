"""Checkpoint integrity: complete only with a manifest, every byte checked before it is
loaded, nothing unpickled that could run code, failed uploads never taken as complete,
and old checkpoints rotated. Real processes over gloo, a local store."""

import hashlib
import json
import pickle

import pytest

from tests import checkpoint_cases


def _manifest(folder, step):
    return folder / f"step-{step:07d}" / "manifest.json"


def _rewrite_manifest(folder, step, rel, data: bytes):
    """What someone with write access to the bucket can do: replace a file and make the
    manifest agree with it (file and per-tensor checksums)."""
    path = folder / f"step-{step:07d}" / rel
    path.write_bytes(data)
    m = json.loads(_manifest(folder, step).read_text())
    m["files"][rel] = [len(data), hashlib.sha256(data).hexdigest()]
    name = rel.removeprefix("state/")
    for key in list(m["items"]):
        if key.startswith(name + "@"):
            offset, length = map(int, key.split("@")[1].split("+"))
            m["items"][key] = hashlib.sha256(data[offset:offset + length]).hexdigest()
    _manifest(folder, step).write_text(json.dumps(m))


class _Boom:
    """An object whose unpickling would run code (here: create a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(gloo_world, tmp_path):
    """Steps 1..3 of a 2-rank run, each checkpointed."""
    weights, errors = gloo_world(2).run(checkpoint_cases.save_steps, str(tmp_path), 3)[0]
    assert not errors
    return tmp_path, weights


def test_restore_takes_the_newest_and_continues_from_its_weights(gloo_world, saved):
    folder, weights = saved
    step, name, skipped, w = gloo_world(2).run(checkpoint_cases.restore, str(folder))[0]
    assert (step, name, skipped) == (3, "step-0000003", [])
    assert w == weights[3]
    # each checkpoint says which format wrote it (training.checkpoint_format), and is read with it
    assert json.loads(_manifest(folder, 3).read_text())["checkpoint_format"] == "dcp"


def test_a_checkpoint_from_before_formats_were_recorded_restores_with_the_engines(gloo_world, saved):
    folder, weights = saved
    m = json.loads(_manifest(folder, 3).read_text())
    del m["checkpoint_format"]
    _manifest(folder, 3).write_text(json.dumps(m))
    step, name, skipped, w = gloo_world(2).run(checkpoint_cases.restore, str(folder))[0]
    assert (step, name, skipped, w) == (3, "step-0000003", [], weights[3])


def test_incomplete_and_corrupted_checkpoints_are_passed_over(gloo_world, saved):
    folder, weights = saved
    _manifest(folder, 3).unlink()  # a rank's upload never finished: no manifest
    distcp = sorted((folder / "step-0000002" / "state").glob("*.distcp"))[0]
    blob = bytearray(distcp.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in a tensor
    distcp.write_bytes(bytes(blob))
    results = gloo_world(2).run(checkpoint_cases.restore, str(folder))
    step, name, skipped, w = results[0]
    assert (step, name) == (1, "step-0000001") and w == weights[1]
    assert "no manifest (incomplete" in skipped[0] and "fail their checksum" in skipped[1], skipped
    assert results[1][:2] == (1, "step-0000001")  # both ranks settled on the same checkpoint


def test_a_start_drops_checkpoints_a_stop_cut_short(saved):
    folder, _ = saved
    _manifest(folder, 3).unlink()  # the save in flight when the run was stopped
    store = checkpoint_cases._store(str(folder))
    assert store.drop_incomplete() == ["step-0000003"]
    assert store.names() == ["step-0000002", "step-0000001"] and not (folder / "step-0000003").exists()
    assert store.drop_incomplete() == []


def test_a_full_local_disk_fails_the_save_on_every_rank_in_one_line(gloo_world, tmp_path):
    folder = tmp_path / "ckpt"
    results = gloo_world(2).run(checkpoint_cases.save_on_a_full_disk, str(folder), str(tmp_path / "tmp"))
    for errors, left in results:
        assert len(errors) == 1 and errors[0].startswith("CheckpointUploadError: checkpoint step-0000002 "), errors
        assert "rank 1: writing " in errors[0] and "unexpected pos" in errors[0]
        assert "No space left on device: 0 MiB free in " in errors[0] and "TMPDIR" in errors[0]
        assert left == []  # no temp folder left behind
    store = checkpoint_cases._store(str(folder))
    assert store.latest_complete() == "step-0000001"  # the failed save never became a checkpoint


def test_a_tampered_index_or_tensor_file_runs_no_code(gloo_world, saved, tmp_path_factory):
    folder, weights = saved
    canary = tmp_path_factory.mktemp("canary") / "pwned"
    _rewrite_manifest(folder, 3, "state/.metadata", pickle.dumps(_Boom(str(canary))))
    distcp = sorted(p.name for p in (folder / "step-0000002" / "state").glob("*.distcp"))[0]
    size = (folder / "step-0000002" / "state" / distcp).stat().st_size
    evil = pickle.dumps({"weight": _Boom(str(canary))})
    _rewrite_manifest(folder, 2, f"state/{distcp}", evil + b"\0" * (size - len(evil)))
    step, _, skipped, w = gloo_world(2).run(checkpoint_cases.restore, str(folder))[0]
    assert not canary.exists()
    assert step == 1 and w == weights[1]
    assert "not part of DCP's index" in skipped[0], skipped
    assert "UnpicklingError: Weights only load failed" in skipped[1] and "\n" not in skipped[1], skipped


def test_a_failed_upload_is_reported_and_never_complete(gloo_world, tmp_path):
    weights, errors = gloo_world(2).run(checkpoint_cases.save_steps, str(tmp_path), 3, {2})[0]
    assert len(errors) == 1 and errors[0].startswith("CheckpointUploadError: checkpoint step-0000002")
    assert "injected upload failure at step 2" in errors[0] and "previous checkpoint stays" in errors[0]
    assert not _manifest(tmp_path, 2).exists() and _manifest(tmp_path, 3).exists()
    _manifest(tmp_path, 3).unlink()
    assert gloo_world(2).run(checkpoint_cases.restore, str(tmp_path))[0][0] == 1


def test_old_checkpoints_are_rotated(gloo_world, tmp_path):
    gloo_world(2).run(checkpoint_cases.save_steps, str(tmp_path), 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000004", "step-0000005"]


def test_another_engine_is_refused_by_name(gloo_world, saved):
    folder, _ = saved
    with pytest.raises(Exception, match="written with training.sharding='none', this job uses 'fsdp'"):
        gloo_world(2).run(checkpoint_cases.restore, str(folder), "fsdp")
