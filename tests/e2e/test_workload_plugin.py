"""A workload registered from outside longview (tests/e2e/linear_workload.py) runs
through `longview train` on the shared services: config section checked, checkpoints in
S3, metrics in MLflow, and an exact resume after an injected fault."""

import pytest

from tests.e2e.conftest import BUCKET, cli, history, s3fs_direct, train, unique

CONFIG = """
name: linear
workload: linear
linear: {features: 8, batch_size: 32}
training: {steps: 6, checkpoint_every: 2, lr: 0.2, sharding: none}
parallelism: {timeout_s: 120}
resources: {workers: 2, cpus_per_worker: 0.5}
"""
PLUGIN = {"LONGVIEW_WORKLOADS": "tests.e2e.linear_workload"}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "linear.yaml"
    path.write_text(CONFIG)
    return str(path)


def test_a_registered_workload_trains_checkpoints_and_resumes(services, config):
    fs = services
    a = unique("lin")
    out = train(fs, a, config=config, env_extra=PLUGIN)
    assert "dp 2" in out.stdout  # the spec's default layout line
    want, run = history(fs, a, experiment="longview-linear")
    assert [s for s, _ in want] == list(range(1, 7))
    assert want[-1][1] < 0.5 * want[0][1]  # it learns
    assert run.info.status == "FINISHED" and run.data.params["linear.features"] == "8"
    ckpts = sorted(p.rsplit("/", 1)[1] for p in s3fs_direct(fs).ls(f"{BUCKET}/runs/{a}") if "step-" in p)
    assert ckpts == ["step-0000004", "step-0000006"]

    b = unique("linf")
    out = train(fs, b, config=config, env_extra=PLUGIN, faults="raise@3")
    text = out.stdout + out.stderr
    assert "injected fault at step 3" in text and "at step 2" in text
    got, _ = history(fs, b, experiment="longview-linear")
    assert [s for s, _ in got] == list(range(1, 7))
    # float32 on CPU, batches a function of (seed, step): the resumed run recomputes the
    # same numbers; 1e-6 only absorbs float printing and transport.
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_a_registered_workload_owns_its_config_section(services, config):
    proc = cli(dict(services["env"], **PLUGIN), "train", config, "--set", "linear.featurs=3", check=False, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "config error: linear.featurs: unknown key; did you mean 'features'?" in proc.stderr
    proc = cli(services["env"], "train", config, check=False, timeout=60)  # not registered without the plug-in
    assert "config error: workload: 'linear' is not allowed; choose one of 'piip' | 'v2pe'" in proc.stderr
