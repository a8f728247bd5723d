"""A storage backend and a checkpoint format are each one class and one registry line:
a backend registered from outside serves config checks, paths and reads; the formats
cover every engine kind."""

import typing

import fsspec
import pytest

from orchestrator import storage
from orchestrator.checkpoint_formats import FORMATS, CheckpointError, format_for
from orchestrator.config import ConfigError, load_config
from workloads.engine import TrainingConfig


class MemoryBackend:
    """fsspec's in-process memory filesystem as storage: memory://<prefix>."""

    name = "memory"

    def handles(self, uri):
        return uri.startswith("memory://")

    def check_uri(self, uri):
        return None if uri.count("/") >= 3 else f"{uri!r} needs a prefix: memory://<root>/<prefix>"

    def filesystem(self, uri, *, endpoint_url=None, retries=10):
        return fsspec.core.url_to_fs(uri)

    def worker_env(self, storage_section):
        return {}

    def for_ray(self, uri, storage_section):
        raise NotImplementedError("in-process storage cannot reach Ray's workers")

    def check_reachable(self, uri, storage_section):
        pass


@pytest.fixture
def memory_backend(monkeypatch):
    monkeypatch.setattr(storage, "BACKENDS", [MemoryBackend(), *storage.BACKENDS])


def test_a_registered_backend_serves_config_paths_and_reads(memory_backend):
    cfg = load_config("configs/v2pe-demo.yaml", overrides={"storage.uri": "memory://lv/runs"})
    assert storage.run_uri(cfg, "export") == f"memory://lv/runs/{cfg.name}/export"
    storage.write_export_meta(storage.run_uri(cfg, "export"), cfg, cfg.name, 7)
    assert storage.read_export_meta(storage.run_uri(cfg, "export"), cfg) == {"run": cfg.name, "step": 7}
    with pytest.raises(ConfigError, match=r"storage.uri: 'memory://lv' needs a prefix"):
        load_config("configs/v2pe-demo.yaml", overrides={"storage.uri": "memory://lv"})


def test_without_a_backend_a_scheme_is_refused_by_name():
    # Other paths and URLs (a --checkpoint elsewhere) are still read, through fsspec as given.
    fs, path = storage.filesystem("relative/export")
    assert "file" in fs.protocol and path.endswith("relative/export")
    with pytest.raises(ConfigError, match=r"storage.uri: 'memory://lv/runs' is neither an s3://bucket/prefix URI "
                                          r"nor an absolute folder"):
        load_config("configs/v2pe-demo.yaml", overrides={"storage.uri": "memory://lv/runs"})


def test_every_engine_kind_has_one_checkpoint_format():
    kinds = typing.get_args(typing.get_type_hints(TrainingConfig)["sharding"])  # training.sharding's choices
    assert set(kinds) == {"none", "fsdp", "deepspeed"}
    for kind in kinds:
        assert [f.name for f in FORMATS.values() if kind in f.engines] == [format_for(kind).name]
    assert format_for("fsdp").name == "dcp" and format_for("deepspeed").name == "deepspeed"
    with pytest.raises(CheckpointError, match="no checkpoint format holds the state of engine 'tensor-parallel'"):
        format_for("tensor-parallel")


def test_the_checkpoint_format_is_a_config_choice_checked_against_the_engine():
    """training.checkpoint_format names a format ("auto": the engine's); one that cannot
    hold the engine's state is refused when the config loads, naming the key and what can."""
    assert format_for("none", "dcp").name == "dcp" and format_for("deepspeed", "auto").name == "deepspeed"
    cfg = load_config("configs/v2pe-demo.yaml", overrides={"training.checkpoint_format": "dcp"})
    assert cfg.training.checkpoint_format == "dcp"
    with pytest.raises(ConfigError, match=r"training.checkpoint_format: checkpoint format 'deepspeed' holds the state "
                                          r"of engines deepspeed, not 'none' \(for it: dcp\)"):
        load_config("configs/v2pe-demo.yaml", overrides={"training.checkpoint_format": "deepspeed"})
    with pytest.raises(ConfigError, match=r"training.checkpoint_format: checkpoint format 'zarr' is unknown; the "
                                          r"formats: dcp, deepspeed"):
        load_config("configs/v2pe-demo.yaml", overrides={"training.checkpoint_format": "zarr"})
