"""Autoscaling and elastic training on Ray's simulated multi-node cluster
(`cluster/local-fake-multinode.yaml`), with its own head; S3 and MLflow are the shared
services. First the autoscaler adds worker nodes for a job that needs them and removes
them once idle; then, on the same head, a run whose cluster changes size: a node is added
mid-run and later one is removed, Ray Train restarts the worker group at the new size,
and the run resumes from its checkpoint, resharded, with the losses of a run that never
changed size. The cluster's size is changed
the way an operator (or a spot market) changes it: the autoscaler rereads its YAML, so
raising the worker node type's `max_workers` adds a node, lowering it removes one.
"""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.e2e.conftest import BUCKET, history, s3fs_direct, unique

NODE = "longview.worker.cpu"
STEPS = 16
# cp 1: the data-parallel degree is the worker count (2 or 3 here); a global batch of 6
# samples divides into both.
ELASTIC = ["--set", f"storage.uri=s3://{BUCKET}/runs", "--set", f"training.steps={STEPS}",
           "--set", "training.checkpoint_every=2", "--set", "parallelism.cp=1", "--set", "training.global_batch=6",
           "--set", "training.sharding=fsdp", "--set", "data.synthetic.samples=12", "--set", "data.synthetic.tokens=512",
           "--set", "data.max_tokens=512", "--set", "resources.custom={longview_worker: 1}",
           "--set", "training.max_failures=6", "--set", "resources.resize_interval_s=3"]


def _set_max_nodes(path, n: int) -> None:
    cluster = yaml.safe_load(path.read_text())
    cluster["available_node_types"][NODE]["max_workers"] = n
    path.write_text(yaml.safe_dump(cluster))


def _wait(what: str, check, proc, timeout_s: float = 300):
    """Polls `check` until it holds; the run ending first, or `timeout_s`, fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: rc {proc.returncode}")
        got = check()
        if got:
            return got
        time.sleep(2)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.fixture(scope="module")
def cluster(services, tmp_path_factory):
    """A Ray head whose autoscaler may add up to 2 worker nodes (1 worker each) for now."""
    from orchestrator.services import start_ray, stop_pid, stop_processes_under

    tmp = tmp_path_factory.mktemp("elastic")
    spec = yaml.safe_load(open("cluster/local-fake-multinode.yaml"))
    spec["available_node_types"][NODE]["max_workers"] = 2
    spec["max_workers"] = 4
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(spec))
    head = start_ray(tmp, num_cpus=1, autoscaling_yaml=str(tmp / "cluster.yaml"))
    yield head, tmp / "autoscaling.yaml"  # the copy the autoscaler reads (start_ray wrote it)
    stop_pid(head.pid)
    stop_processes_under(head.extra["temp_dir"])  # simulated nodes live outside its group


def _ray_nodes(address: str) -> list[dict]:
    # The autoscaler's own messages reach a driver's stdout too: mark our line.
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
            "print('NODES ' + json.dumps([{'alive': n['Alive'], 'res': n['Resources']} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NODES "))
    return json.loads(line[len("NODES "):])


def _alive_workers(address: str) -> list[dict]:
    return [n for n in _ray_nodes(address) if n["alive"] and n["res"].get("longview_worker")]


def test_autoscaler_adds_worker_nodes_for_a_job_and_removes_them_when_idle(services, cluster):
    """Runs first, on the fresh head: no worker node until a job asks for its resource."""
    head, _ = cluster
    address = head.extra["address"]
    assert [n["alive"] for n in _ray_nodes(address)] == [True]  # just the head
    name = unique("scale")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml", "--address", address,
         "--cluster-yaml", "cluster/local-fake-multinode.yaml", "--set", f"name={name}",
         "--set", f"storage.uri=s3://{BUCKET}/runs", "--set", "training.steps=2", "--set", "training.checkpoint_every=2",
         "--set", "data.synthetic.samples=2", "--set", "resources.custom={longview_worker: 1}"],
        env=services["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"s3://{BUCKET}/runs/{name}/step-0000002" in proc.stdout
    nodes = _ray_nodes(address)
    assert len([n for n in nodes if n["res"].get("longview_worker")]) >= 2, nodes  # one node per training worker
    # idle_timeout_minutes: 0.2 -> the worker nodes go away once the job has finished
    # (a bounded wait on the condition, named in the failure).
    deadline = time.monotonic() + 120
    while (alive := _alive_workers(address)) and time.monotonic() < deadline:
        time.sleep(5)
    assert not alive, f"worker nodes still alive 120 s after the job ended: {alive}"
    _, run = history(services, name)
    assert run.info.status == "FINISHED"


def test_a_run_grows_and_shrinks_with_the_cluster_and_keeps_its_losses(services, cluster, record):
    head, autoscaling = cluster
    env, address = services["env"], head.extra["address"]
    ref = unique("fixed")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                           "--address", address, "--set", f"name={ref}", *ELASTIC, "--set", "resources.workers=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    want, _ = history(services, ref)

    name = unique("elastic")
    out = open(services["home"] / f"{name}.log", "w+")
    markers = services["home"] / f"faults-{name}"
    markers.mkdir()
    # The run is held before step 4 until it has grown to 3 workers, and before step 10
    # until it has shrunk back to 2 (`hold` in orchestrator/faults.py): the resizes happen
    # while it trains however fast or slow this machine is, never after it has ended.
    # When a node is lost, Ray Train first retries the size it had reserved and waits
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the missing worker before it settles for
    # what the cluster holds (60 s by default; the driver passes it on to the controller).
    env = dict(env, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15", LONGVIEW_FAULTS="hold@4=grow,hold@10=shrink",
               LONGVIEW_FAULT_DIR=str(markers), LONGVIEW_HOLD_TIMEOUT_S="600")
    job = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml",
                            "--address", address, "--set", f"name={name}", *ELASTIC, "--set", "resources.workers=[2, 3]"],
                           env=env, stdout=out, stderr=subprocess.STDOUT, text=True)

    def held(tag: str, workers: int):
        path = markers / f"held-{tag}"
        return lambda: path.exists() and path.read_text() == str(workers)

    def sizes():
        try:
            return history(services, name, "world_size")[0]
        except IndexError:  # no MLflow run yet
            return []

    try:
        _wait("the run held before step 4 on 2 workers", held("grow", 2), job)
        _set_max_nodes(autoscaling, 3)  # a node is added
        _wait("the group restarted on 3 workers (held before step 4)", held("grow", 3), job)
        (markers / "release-grow").touch()
        _wait("the run held before step 10 on 3 workers", held("shrink", 3), job)
        _set_max_nodes(autoscaling, 2)  # a node is taken away while it trains
        _wait("the group restarted on 2 workers (held before step 10)", held("shrink", 2), job)
        (markers / "release-shrink").touch()
        rc = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    out.seek(0)
    text = out.read()
    assert rc == 0, text[-4000:]
    got, run = history(services, name)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    # The same 6 samples per step on 2 or 3 workers, each micro-step weighted by its
    # tokens: only the order of float32 sums differs (all-reduce over 2 or 3 ranks,
    # 3 or 2 micro-steps accumulated), ~1e-7 relative per sum, carried through 16
    # AdamW steps; 1e-4 relative allows for that growth and nothing more.
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want))
    # Steps computed again after each resize (rank 0 prints every step it computes, to 4
    # decimals): the new group's loss is the old group's.
    printed = {}
    for step, loss in re.findall(r"step (\d+)/\d+ loss (\d+\.\d+)", text):
        printed.setdefault(int(step), set()).add(float(loss))
    for step, values in printed.items():
        assert max(values) - min(values) <= 1e-4, (step, values)  # one unit of the last printed digit
    sizes_seen = [int(w) for _, w in sizes()]
    assert sizes_seen[0] == 2 and 3 in sizes_seen and sizes_seen[-1] == 2, sizes_seen
    assert run.info.status == "FINISHED"
    # The FSDP run's export gathered every shard: it loads as a whole model, with the
    # weights of the fixed-size run's export (same training, float32 sums reordered).
    from workloads.v2pe.hf_checkpoint import load_pretrained

    s3 = s3fs_direct(services)
    exported = {}
    for run_name in (ref, name):
        s3.get(f"{BUCKET}/runs/{run_name}/export", str(services["home"] / f"{run_name}-export"), recursive=True)
        exported[run_name] = load_pretrained(str(services["home"] / f"{run_name}-export")).state_dict()
    # Weights after 16 AdamW steps whose gradients differ in the order of float32 sums:
    # Adam divides by sqrt of the second moment, which can turn a ~1e-7 gradient
    # difference into a larger one for parameters with tiny gradients; 1e-3 relative
    # (1e-5 absolute, for weights near zero) is far below a missing or misplaced shard.
    for key, value in exported[ref].items():
        torch.testing.assert_close(exported[name][key], value, rtol=1e-3, atol=1e-5, msg=lambda m: f"{key}: {m}")
    resumes = _resumes(text)
    grow = next(r for r in resumes if r[1] == 3)
    shrink = next(r for r in resumes if r[1] == 2 and r[0] >= grow[0])
    record("node added mid-run (elastic workers [2, 3])", injected=1, survived=1, steps_lost=grow[2], data_lost=0,
           note="Ray Train restarts the group at 3 workers; it resumes from the last checkpoint, resharded")
    record("node lost and not replaced (elastic workers [2, 3])", injected=1, survived=1, steps_lost=shrink[2],
           data_lost=0, note=f"the group restarts at 2 workers; losses within {worst:.0e} (relative) "
                             "of a fixed 2-worker run")


def _resumes(text: str) -> list[tuple[int, int, int]]:
    """(checkpoint step, workers, steps computed again) of each resume, from rank 0's lines."""
    done, out = 0, []
    for line in text.splitlines():
        m = re.search(r"resumed from \S+ at step (\d+) on (\d+) workers", line)
        if m and (not out or out[-1][:2] != (int(m[1]), int(m[2]))):  # Ray may print a line more than once
            out.append((int(m[1]), int(m[2]), done - int(m[1])))
        m = re.search(r"step (\d+)/\d+ loss", line)
        if m:
            done = max(done, int(m[1]))
    return out
