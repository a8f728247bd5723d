import glob

import pytest

from orchestrator.config import ConfigError, flatten, load_config, to_dict

BASE = """
name: t1
workload: v2pe
resources: {workers: 2}
parallelism: {cp: 2}
"""


@pytest.mark.parametrize("path", sorted(glob.glob("configs/v2pe-*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.workload == "v2pe" and cfg.resources.max_workers % cfg.parallelism.cp == 0


def test_defaults_and_derived_values():
    cfg = load_config(BASE)
    assert cfg.dp == 1 and cfg.experiment == "longview-v2pe" and cfg.training.sharding == "none"
    flat = flatten(to_dict(cfg))
    assert flat["parallelism.cp"] == 2 and flat["training.lr"] == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ({"training.stpes": 3}, r"training.stpes: unknown key; did you mean 'steps'\?"),
        ({"training.steps": "ten"}, r"training.steps: expected an integer, got 'ten'"),
        ({"training.steps": 0}, r"training.steps: must be > 0, got 0"),
        ({"training.lr": True}, r"training.lr: expected a number, got True"),
        ({"parallelism.cp": 3}, r"parallelism.cp: 3 does not divide 2 workers"),
        ({"training.sharding": "fsdx"},
         r"training.sharding: 'fsdx' is not allowed; choose one of 'deepspeed' \| 'fsdp' \| 'none'"),
        # elastic ranges: [min, max], a fixed global batch every reachable dp divides, no DeepSpeed
        ({"resources.workers": [4, 2]}, r"resources.workers: \[4, 2\]: give a count or \[min, max\] with min <= max"),
        ({"resources.workers": [2, 3]}, r"parallelism.cp: 2 does not divide 3 workers \(resources.workers=\[2, 3\]"),
        ({"resources.workers": [2, 6]}, r"training.global_batch: an elastic run \(resources.workers: \[min, max\]\) needs"),
        ({"resources.workers": [2, 6], "training.global_batch": 4},
         r"training.global_batch: 4 is not a multiple of data-parallel degree 3 \(one of \[1, 2, 3\] that "
         r"resources.workers=\[2, 6\] allows\); use a multiple of 6"),
        ({"resources.workers": [2, 4], "training.global_batch": 4, "training.sharding": "deepspeed"},
         r"training.sharding: 'deepspeed' checkpoints resume only on as many workers"),
        ({"data.position_mode": "v2pe_fix"}, r"data.position_stride: required when data.position_mode is 'v2pe_fix'"),
        ({"data.position_stride": 300}, r"data.position_stride: 300 is not in 1..256"),
        ({"model.size": "gpt5"}, r"model: model size 'gpt5' is unknown"),
        ({"storage.uri": "s3://Bad_Bucket/x"}, r"storage.uri: 's3://Bad_Bucket/x' is not an s3://bucket/prefix URI"),
        ({"evaluation.strides": [64, 0]}, r"evaluation.strides: 0 is not an integer in 1..256"),
        ({"resources.cpus_per_worker": -1}, r"resources.cpus_per_worker: must be >= 0, got -1"),
        ({"training.zero_stage": 3}, r"training.zero_stage: only meaningful with training.sharding='deepspeed'"),
        ({"name": "bad name!"}, r"name: 'bad name!' must be 1-100 letters"),
        ({"parallelism.cp_a2a": 4}, r"parallelism.cp_a2a: 4 does not divide parallelism.cp=2"),
        ({"parallelism.cp_a2a": 0}, r"parallelism.cp_a2a: must be > 0, got 0"),
        ({"parallelism.kernel": "fast"},
         r"parallelism.kernel: 'fast' is unknown; choose one of auto, cpu_flash, .*, ring_flash_attn"),
        # the tiny model has 4 query heads and 2 KV heads: all-to-all over 4 ranks cannot split them
        ({"resources.workers": 4, "parallelism.cp": 4, "parallelism.cp_a2a": 4},
         r"parallelism.cp_a2a: 4 does not divide the model's num_kv_heads=2"),
    ],
)
def test_errors_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE, overrides=override)


def test_elastic_range_maps_to_min_and_max():
    cfg = load_config(BASE, overrides={"resources.workers": [2, 6], "training.global_batch": 6,
                                       "training.sharding": "fsdp"})
    r = cfg.resources
    assert (r.elastic, r.min_workers, r.max_workers, cfg.dp) == (True, 2, 6, 3)
    assert cfg.training.accumulation(2, 4) == 3 and cfg.training.accumulation(3, 6) == 2
    with pytest.raises(ValueError, match="global_batch: 6 is not a multiple of the 4 samples one micro-step"):
        cfg.training.accumulation(4, 8)
    assert load_config(BASE, overrides={"resources.workers": [2, 2]}).resources.elastic is False


def test_structural_errors():
    with pytest.raises(ConfigError, match="workload: required key is missing"):
        load_config("name: x\n")
    with pytest.raises(ConfigError, match="workload: 'piip2' is not allowed"):
        load_config("name: x\nworkload: piip2\n")
    with pytest.raises(ConfigError, match="training: expected a mapping of TrainingConfig keys, got 5"):
        load_config(BASE + "training: 5\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config("- a\n- b\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("name: [unclosed\n")


def test_piip_configs_and_errors():
    cfg = load_config("configs/piip-tsb.yaml")
    assert sum(_layout(cfg)) == 8 and len(_layout(cfg)) == 3
    base = "name: p\nworkload: piip\nresources: {workers: 3}\n"
    assert _layout(load_config(base)) == (1, 1, 1)
    for override, message in [
        ({"piip.ranks_per_branch": [2, 1, 1]}, r"adds up to 4, not resources.workers=3"),
        ({"piip.resolutions": [32, 48]}, r"piip: piip-tiny has 3 branches but 2 resolutions"),
        ({"piip.resolutions": [32, 48, 60]}, r"piip: resolution 60 is not divisible by the patch size 16"),
        ({"parallelism.cp": 3}, r"parallelism.cp: PIIP places branches on groups instead"),
        ({"piip.variant": "piip-xl"}, r"variant 'piip-xl' is unknown"),
        ({"piip.batch_size": 0}, r"piip.batch_size: must be > 0, got 0"),
        ({"piip.batch_size": 1, "resources.workers": 4, "piip.ranks_per_branch": [2, 1, 1]},
         r"piip.batch_size: 1 is smaller than the largest branch group \(2 ranks\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(base, overrides=override)


def _layout(cfg):
    return cfg.piip.layout(cfg.resources.workers)


def test_numbers_in_exponent_notation_are_numbers():
    # YAML 1.1 reads 3e-3 as a string; users write it everywhere, in files and in --set.
    cfg = load_config(BASE + "training: {lr: 3e-3, eps: 1e-8}\n")
    assert cfg.training.lr == 3e-3 and cfg.training.eps == 1e-8
    from orchestrator.config import from_dict

    assert from_dict(to_dict(cfg)) == cfg  # the submitted job's JSON round trip


def test_workload_plugins_are_named_when_they_cannot_load(monkeypatch):
    from workloads import registry

    monkeypatch.setenv(registry.WORKLOADS_ENV, "no_such_module_x")
    registry._load_plugins.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"workload: LONGVIEW_WORKLOADS: cannot import workload module "
                                              r"'no_such_module_x'"):
            load_config(BASE)
    finally:
        monkeypatch.delenv(registry.WORKLOADS_ENV)
        registry._load_plugins.cache_clear()


def test_a_config_path_that_is_not_a_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"configs/v2pe-dmo.yaml: no such config file"):
        load_config("configs/v2pe-dmo.yaml")
    with pytest.raises(ConfigError, match=r": is a folder, not a config file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("uri", ["gs://bucket/runs", "runs/here"])
def test_storage_is_s3_or_an_absolute_folder(uri):
    with pytest.raises(ConfigError, match=r"storage.uri: .* is neither an s3://bucket/prefix URI nor an absolute folder"):
        load_config(BASE, overrides={"storage.uri": uri})


def _string_keys(cfg) -> list[tuple[str, bool]]:
    """Every config key that holds a string or a list of strings: (dotted key, is a list)."""
    import dataclasses
    import typing

    out = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            tp = hints[f.name]
            args = typing.get_args(tp)
            if tp is str or (str in args and typing.get_origin(tp) is not list):
                out.append((f"{section.name}.{f.name}", False))
            elif typing.get_origin(tp) is list and args == (str,):
                out.append((f"{section.name}.{f.name}", True))
    return out


# String keys whose values are names, not URIs: a value with '@' in it is not refused there.
NOT_URIS = {"name", "model.size", "data.tokenizer", "training.sharding", "tracking.experiment", "piip.baseline"}


@pytest.mark.parametrize("config", ["configs/v2pe-demo.yaml", "configs/piip-det-demo.yaml", "configs/v2pe-eval-1m.yaml"])
def test_no_config_error_echoes_a_credential(config):
    """Every string-valued key of each workload, given a URI with a user and password:
    refused (a URI key) or taken as a plain name, and whatever is said never holds the
    secret (`scrub_credentials`, the one scrub of what is printed, logged or tagged)."""
    cfg = load_config(config)
    taken = []
    for key, is_list in _string_keys(cfg):
        value = "s3://alice:s3cret@bucket/x"
        try:
            load_config(config, overrides={key: [value] if is_list else value})
            taken.append(key)
        except ConfigError as e:
            assert "s3cret" not in str(e) and "alice" not in str(e), (key, str(e))
            assert str(e).startswith(key.split(".")[0]), (key, str(e))  # the error says where
    uri_keys = {k for k, _ in _string_keys(cfg)} - NOT_URIS
    assert not set(taken) & uri_keys, f"URI keys that take credentials: {sorted(set(taken) & uri_keys)}"
    assert len(uri_keys) >= 5  # the walk found the sections' URI keys (storage, tracking, data, ...)


@pytest.mark.parametrize("key", ["tracking.uri", "storage.endpoint_url", "storage.uri", "data.train", "model.pretrained"])
def test_uris_with_credentials_are_refused_without_echoing_them(key):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, overrides={key: "http://alice:s3cret@host:5000/x"})
    assert str(e.value).startswith(f"{key}: http://***@host:5000/x is given with credentials"), str(e.value)
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("key", ["tracking.uri", "storage.endpoint_url", "model.pretrained"])
def test_uris_with_a_secret_in_their_query_are_refused_without_echoing_it(key):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, overrides={key: "http://host:5000/?token=t0ps3cret&x=1"})
    assert str(e.value).startswith(f"{key}: http://host:5000/?token=***&x=1 is given with credentials"), str(e.value)
    assert "t0ps3cret" not in str(e.value) and "MLFLOW_TRACKING_TOKEN" in str(e.value)


def test_hostile_yaml_is_one_config_error_quickly(tmp_path):
    # Nested aliases: 9 levels of 9 would expand to 9^9 items in anything that walks them.
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)] + ["model: {overrides: {x: *a8}}"]
    with pytest.raises(ConfigError, match=r"config is not valid YAML: its aliases expand to more than 100000"):
        load_config(BASE + "\n".join(lines) + "\n")
    many = [f"k{i}: &k{i} {i}" for i in range(101)] + [f"r{i}: *k{i}" for i in range(101)]
    with pytest.raises(ConfigError, match=r"config is not valid YAML: more than 100 aliases"):
        load_config(BASE + "\n".join(many) + "\n")
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: 2.0 MiB is not a job config"):
        load_config(str(big))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.yaml: not UTF-8 text \(byte 6\)"):
        load_config(str(binary))
    from orchestrator.config import yaml_value

    for bad in ("[", "!!python/object:os.system", "{a: 1"):  # --set values
        with pytest.raises(ConfigError, match=r"the value is not valid YAML: "):
            yaml_value(bad)
