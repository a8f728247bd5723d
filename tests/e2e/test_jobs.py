"""Jobs end to end on the shared services: what a run writes to S3 and MLflow, job
submission, a config error before anything starts, and PIIP's branch groups.

The jobs run through the `longview` CLI in subprocesses, as a user runs them.
"""

import json
import uuid

import pytest

from tests.e2e.conftest import (
    BASE,
    BUCKET,
    STEPS,
    cli,
    history,
    mlflow_run,
    one_line_failure,
    run_log,
    s3fs_direct,
    train,
    unique,
)


def test_job_writes_checkpoints_to_s3_and_metrics_to_mlflow(services, reference):
    fs = services
    name, losses, out = reference
    s3 = s3fs_direct(fs)
    ckpts = sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{BUCKET}/runs/{name}") if "step-" in p)
    assert ckpts == ["step-0000004", "step-0000006"]  # keep_checkpoints: 2
    last = f"{BUCKET}/runs/{name}/step-0000006"
    names = {p.rsplit("/", 1)[1] for p in s3.ls(last)}
    assert {"manifest.json", "state", "rng-rank0.pt", "rng-rank1.pt"} <= names
    # Each of the two ranks wrote its share of the DCP state.
    shards = {p.rsplit("/", 1)[1] for p in s3.ls(f"{last}/state")}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= shards, shards
    manifest = json.loads(s3.cat_file(f"{last}/manifest.json"))
    state = manifest["state"]
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    assert manifest["world_size"] == 2 and manifest["layout"] == {"dp": 1, "cp": 2, "cp_a2a": 1}
    assert s3.exists(f"{BUCKET}/runs/{name}/export/model.safetensors")
    assert s3.exists(f"{BUCKET}/runs/{name}/export/config.json")
    assert f"s3://{BUCKET}/runs/{name}/step-0000006" in out

    client, run = mlflow_run(fs, name)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses[-1][1] < losses[0][1]  # it learns
    assert run.data.params["parallelism.cp"] == "2" and run.data.params["model.size"] == "tiny"
    for key in ("tokens_per_s", "samples_per_s", "lr", "grad_norm", "cpu_peak_rss_mib", "world_size"):
        assert len(client.get_metric_history(run.info.run_id, key)) == STEPS, key
    # A background save's timings arrive with the first step whose metrics are taken after
    # it completed: the saves of steps 2 and 4, each reported by step 6 unless it was
    # still running then (the last one always completes after the last step).
    saves = client.get_metric_history(run.info.run_id, "checkpoint_total_s")
    assert 1 <= len(saves) <= 2 and all(3 <= m.step <= 6 and m.value > 0 for m in saves), saves
    assert run.data.tags["longview.checkpoint_uri"] == f"s3://{BUCKET}/runs/{name}"
    assert run.data.tags["longview.export"] == f"s3://{BUCKET}/runs/{name}/export"
    assert run.info.status == "FINISHED"
    # What MLflow's UI lists for the run: its source and commit, a description, the
    # training data as a dataset input, the export as a logged model.
    assert run.data.tags["mlflow.source.name"] == "longview training (v2pe)" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["mlflow.note.content"].startswith(f"v2pe training job {name}: {STEPS} steps")
    [ds] = run.inputs.dataset_inputs
    assert f"s3://{BUCKET}/runs/{name}/data/train/data.jsonl" in ds.dataset.source
    [out_model] = run.outputs.model_outputs
    model = client.get_logged_model(out_model.model_id)
    assert model.tags["longview.export"] == f"s3://{BUCKET}/runs/{name}/export" and out_model.step == STEPS
    assert {a.path for a in client.list_logged_model_artifacts(model.model_id)} >= {"config.json", "longview.json"}
    # The planner's prediction beside the first step's measured peak (live CPU tensors).
    predicted = client.get_metric_history(run.info.run_id, "memory_predicted_mib")
    measured = client.get_metric_history(run.info.run_id, "memory_measured_mib")
    assert [m.step for m in predicted] == [m.step for m in measured] == [1]
    assert measured[0].value > 0 and predicted[0].value == pytest.approx(
        float(run.data.tags["longview.memory_predicted_gib.total"]) * 1024, rel=1e-3)
    assert "memory per worker (live CPU tensors, the planner's per-GPU bytes): predicted" in out
    assert f"step {STEPS}/{STEPS} loss" in out  # rank 0's progress line
    assert f"MLflow run: {fs['started']['mlflow'].url}/#/experiments/" in out
    assert "Traceback" not in out  # a successful run shows no error
    # The workers' progress reaches the terminal as longview's own lines; Ray's output
    # (the controller's resource requests, the workers' prefixes) is in the run's log.
    assert f"[longview] step {STEPS}/{STEPS} loss" in out and "(RayTrainWorker" not in out, out[-3000:]
    assert "(TrainController" not in out and "Ray's output (workers, Train controller): " in out
    logged = run_log(fs, name)
    assert "(TrainController pid=" in logged and f"[longview] step {STEPS}/{STEPS}" in logged
    # The description, at the top of the run's page, ends with the headline: the last loss.
    assert run.data.tags["mlflow.note.content"].endswith(
        f"Finished at step {STEPS}: loss {losses[-1][1]:.4g} (step 1: {losses[0][1]:.4g}); last checkpoint "
        f"s3://{BUCKET}/runs/{name}/step-0000006.")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for d in ("config", "logs") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/job.yaml", "loss.png"} <= artifacts, artifacts  # the plot at the top level: no folder to open
    assert any(a.startswith("logs/train-") for a in artifacts), artifacts
    # Artifacts went through the server's proxy into the S3 bucket.
    assert any(p.endswith("loss.png") for p in s3.find(f"{BUCKET}/mlflow"))
    # Losses in the checkpoint's record and in MLflow agree.
    assert [v for _, v in state["losses"]] == pytest.approx([v for _, v in losses], rel=1e-6)


def test_job_submission_runs_the_same_job(services):
    fs = services
    name = f"c-{uuid.uuid4().hex[:8]}"
    proc = cli(fs["env"], "submit", "configs/v2pe-demo.yaml", "--set", f"name={name}", "--wait", *BASE[:2],
               "--set", "training.steps=2", "--set", "training.checkpoint_every=2", "--set", "data.synthetic.samples=2",
               "--set", "parallelism.cp_a2a=2")  # hybrid context parallelism: all-to-all over both ranks
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    assert "SUCCEEDED: step 2/2" in proc.stdout  # the wait followed the run's steps
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(fs["started"]["ray"].url)
    assert str(client.get_job_status(job_id)) in ("SUCCEEDED", "JobStatus.SUCCEEDED")
    logs = client.get_job_logs(job_id)
    assert f"finished: last checkpoint s3://{BUCKET}/runs/" in logs
    assert "dp 1 x cp 2 (all-to-all 2 x ring 1)" in logs
    assert logs.count("[longview] finished: last checkpoint") == 1  # each line once
    assert "SUCCEEDED" in cli(fs["env"], "status", job_id).stdout
    _, run = mlflow_run(fs, name)
    assert run.data.tags.get("longview.ray_job_id") == job_id


def test_bad_config_fails_before_anything_starts(services):
    proc = cli(services["env"], "train", "configs/v2pe-demo.yaml", "--set", "parallelism.cp=3", check=False, timeout=60)
    assert proc.returncode != 0
    assert "config error: parallelism.cp: 3 does not divide 2 workers" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_kernel_the_workers_cannot_run_fails_once_naming_what_can(services):
    """parallelism.kernel is a valid name the driver accepts; the CPU workers cannot run
    cuDNN, so the run fails at their start, once (a restart meets the same device)."""
    name = unique("kernel")
    proc = cli(services["env"], "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE,
               "--set", "parallelism.kernel=cudnn", "--set", "training.max_failures=2", check=False)
    assert proc.returncode == 1
    last = one_line_failure(proc, f"error: training {name} failed: ")  # Ray's tracebacks are in the run's log
    assert last.endswith("KernelUnavailable: kernel='cudnn' does not support device cpu, dtype torch.float32, "
                            "head dim 16; supported here: ['cpu_flash']"), last
    assert "restarting from its last checkpoint" not in proc.stderr
    # Submitted and waited on: the job's log keeps everything; the terminal ends with the reason.
    proc = cli(services["env"], "submit", "configs/v2pe-demo.yaml", "--set", f"name={name}-job", *BASE,
               "--set", "parallelism.kernel=cudnn", "--wait", check=False)
    last = one_line_failure(proc, "error: job ")
    assert " FAILED: training " in last and last.endswith("supported here: ['cpu_flash']"), last


def test_piip_job_places_branches_and_resumes_exactly(services, monkeypatch):
    """PIIP over three Ray workers, one branch each: per-branch checkpoints and step times,
    and a fault at step 3 resumes with the uninterrupted run's losses."""
    fs = services
    sets = ["--set", "training.steps=4", "--set", "training.checkpoint_every=2"]
    a = f"pa-{uuid.uuid4().hex[:8]}"
    train(fs, a, *sets, config="configs/piip-demo.yaml")
    want, run = history(fs, a, experiment="longview-piip")
    assert [s for s, _ in want] == [1, 2, 3, 4]
    client, _ = mlflow_run(fs, a, "longview-piip")
    params = set(run.data.params)  # its own section and the core keys it reads, nothing of V2PE's
    assert "piip.variant" in params and "training.lr" in params
    assert not {"parallelism.cp", "training.loss_chunk_tokens"} & params and not any(
        p.startswith(("model.", "data.", "evaluation.")) for p in params)
    for b in range(3):
        assert len(client.get_metric_history(run.info.run_id, f"branch{b}_step_s")) == 4
    manifest = json.loads(s3fs_direct(fs).cat_file(f"{BUCKET}/runs/{a}/step-0000004/manifest.json"))
    assert manifest["layout"] == {"branch0": 1, "branch1": 1, "branch2": 1}
    # Each branch's parameters were saved (by the rank that owns them), nothing twice.
    keys = [k for k in manifest["items"]]
    assert len({f"__{r}_0.distcp" for r in range(3)} & {k.split("@")[0] for k in keys}) == 3
    # The export exists where the tag points, holds every branch's trained parameters
    # (each from the group that trained it), and `longview eval` scores it on held-out shapes.
    assert run.data.tags["longview.export"] == f"s3://{BUCKET}/runs/{a}/export"
    proc = cli(fs["env"], "eval", "configs/piip-demo.yaml", "--set", f"name={a}", *BASE[:2],
               "--set", "piip.eval_samples=12")
    assert "| 12 | 3 |" in proc.stdout, proc.stdout[-2000:]
    result = json.loads(s3fs_direct(fs).cat_file(f"{BUCKET}/runs/{a}/eval/result.json"))
    _check_piip_export(fs, a, result["records"][0]["accuracy"], monkeypatch)

    b_name = f"pb-{uuid.uuid4().hex[:8]}"
    proc = train(fs, b_name, *sets, config="configs/piip-demo.yaml", faults="raise@3")
    assert "injected fault at step 3" in proc.stdout + proc.stderr
    assert "at step 2" in proc.stdout + proc.stderr
    got, _ = history(fs, b_name, experiment="longview-piip")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # deterministic CPU float32


def test_piip_detection_trains_on_its_groups_and_is_scored_by_cocoeval(services):
    """Mask R-CNN on PIIP-tiny, one branch per Ray worker, on generated COCO-format shapes:
    the loss terms reach MLflow, `longview eval` logs COCOeval's box and mask AP and a
    figure of predictions."""
    fs = services
    name = f"pd-{uuid.uuid4().hex[:8]}"
    sets = ["--set", "training.steps=2", "--set", "training.checkpoint_every=2", "--set", "piip.synthetic_samples=8",
            "--set", "piip.eval_samples=4", "--set", "piip.rpn_proposals=[100, 100]", "--set", "piip.roi_samples=32",
            "--set", "piip.batch_size=3"]
    train(fs, name, *sets, config="configs/piip-det-demo.yaml")
    client, run = mlflow_run(fs, name, "longview-piip")
    for term in ("loss_objectness", "loss_classifier", "loss_mask"):
        assert len(client.get_metric_history(run.info.run_id, term)) == 2
    proc = cli(fs["env"], "eval", "configs/piip-det-demo.yaml", "--set", f"name={name}", *BASE[:2], *sets)
    assert "| piip-tiny | 128/64/32 |" in proc.stdout, proc.stdout[-3000:]
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    (ev,) = children
    metrics = client.get_run(ev.info.run_id).data.metrics
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "backbone_gflops", "head_gflops"} <= set(metrics)
    assert -1 <= metrics["bbox_AP"] <= 1 and metrics["backbone_gflops"] > 0
    assert "predictions.png" in {a.path for a in client.list_artifacts(ev.info.run_id)}


def _check_piip_export(fs, name, accuracy, monkeypatch):
    """The export reloads in one process, and its held-out accuracy recomputed here
    equals what the workers reported (so every branch's parameters came through)."""
    import torch

    from workloads.piip.data import ImageFolder, batch
    from workloads.piip.evaluate import load_export
    from workloads.piip.model import make_pyramid

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fs["direct_s3"])
    for k, v in fs["creds"].items():
        monkeypatch.setenv(k, v)
    model, _ = load_export(f"s3://{BUCKET}/runs/{name}/export")
    data = ImageFolder(f"s3://{BUCKET}/runs/{name}/data/eval-shapes-12/classification", "classification")
    images, labels, _ = batch([data[i] for i in range(len(data))], 64)
    with torch.no_grad():
        got = (model(make_pyramid(images, model.cfg))["logits"].argmax(-1) == labels).float().mean().item()
    assert got == pytest.approx(accuracy)


def test_eval_scores_the_exported_model_and_logs_a_nested_run(services, reference):
    fs = services
    name = reference[0]
    proc = cli(fs["env"], "eval", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE[:2],
               "--set", "evaluation.lengths=[1024, 2048]", "--set", "evaluation.strides=[256]",
               "--set", "evaluation.samples_per_length=1")
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| 1024 |") or ln.startswith("| 2048 |")]
    assert len(table) == 2, proc.stdout[-3000:]
    assert proc.stdout.count("evaluated 2048 tokens, δ = 1") == 1, proc.stdout[-3000:]  # the progress per cell, once
    result = json.loads(s3fs_direct(fs).cat_file(f"{BUCKET}/runs/{name}/eval/result.json"))
    assert [(r["tokens"], r["delta"], r["samples"]) for r in result["records"]] == [(1024, "1", 1), (2048, "1", 1)]
    client, parent = mlflow_run(fs, name)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1
    run = client.get_run(children[0].info.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time > run.info.start_time
    assert run.data.tags["longview.kind"] == "evaluation" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.params["eval.lengths"] == "1024,2048" and run.data.params["eval.deltas"] == "1"
    assert run.data.params["trained_steps"] == str(STEPS)  # read from the export's longview.json
    assert run.data.params["model"] == f"s3://{BUCKET}/runs/{name}/export"
    # Accuracy as a curve against context length: the step is the length, so MLflow's
    # charts draw it over x = tokens; the timestamps are real, not 1970.
    curve = client.get_metric_history(run.info.run_id, "accuracy_delta_1")
    assert sorted(m.step for m in curve) == [1024, 2048] and all(m.timestamp > 1.7e12 for m in curve)
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == [r["accuracy"] for r in result["records"]]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"result.md", "accuracy_by_length.png"}
    # The headline on top of the run's page; the command ends naming where every result is.
    assert run.data.tags["mlflow.note.content"].endswith(result["table"])
    for f in ("result.json", "result.md", "accuracy_by_length.png"):
        assert f"  s3://{BUCKET}/runs/{name}/eval/{f}\n" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.rstrip().endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning"), proc.stdout[-500:]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs


def test_eval_on_mm_niah_from_s3_generates_answers_and_logs_a_curve_per_task(services, reference, tmp_path):
    """MM-NIAH in its released layout, in S3: answers generated over the 2-rank group,
    a metric per task with the context length as step, the responses in the authors'
    format; a split with a missing image stops before anything is scored, in one line."""
    from tests.mmniah_fixture import write_split

    fs = services
    name = reference[0]
    s3 = s3fs_direct(fs)
    # The export records the positions it was trained with, as V2PE's checkpoints do, and
    # the training run says which it used.
    exported = json.loads(s3.cat_file(f"{BUCKET}/runs/{name}/export/config.json"))["llm_config"]
    assert exported["rope_pos_id_version"] == "v2pe_rnd" and "rope_pos_id_stride" not in exported
    assert mlflow_run(fs, name)[1].data.tags["longview.positions"] == "v2pe_rnd, from the job's config"
    split = f"{BUCKET}/mmniah-{uuid.uuid4().hex[:6]}/mm_niah_val"
    s3.put(write_split(str(tmp_path / "split"), tasks=["retrieval-text", "reasoning-text"]) + "/", split,
           recursive=True)
    args = ["eval", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE[:2], "--set",
            "evaluation.benchmark=mm-niah", "--set", f"evaluation.data=s3://{split}", "--set",
            "evaluation.max_new_tokens=4", "--set", "data.max_tokens=8192", "--set", "evaluation.strides=[64]",
            "--set", "evaluation.protocol=v2pe", "--set", "evaluation.teacher_forced=true"]
    proc = cli(fs["env"], *args)
    assert "| retrieval-text |" in proc.stdout and "| reasoning-text |" in proc.stdout, proc.stdout[-3000:]
    assert "Protocol: v2pe" in proc.stdout and "V2PE's teacher-forced check" in proc.stdout
    client, parent = mlflow_run(fs, name)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                            "and params.`eval.benchmark` = 'mm-niah'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["eval.protocol"] == "v2pe" and runs[0].data.params["eval.teacher_forced"] == "true"
    curve = client.get_metric_history(runs[0].info.run_id, "mmniah_retrieval_text")
    assert sorted(m.step for m in curve) == [1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000,
                                             64000]  # the authors' eleven buckets, empty ones 0 as they count them
    forced = client.get_metric_history(runs[0].info.run_id, "mmniah_forced_retrieval_text")
    assert sorted(m.step for m in forced) == [1000, 4000]  # the buckets of 1500 and 5000 tokens; 600 unscored
    # The authors' file names: <model>_<task>-<split>.jsonl, the model the checkpoint's run
    out = f"{BUCKET}/runs/{name}/eval/mm-niah"
    rows = [json.loads(x) for x in s3.cat_file(f"{out}/{name}_retrieval-text-val.jsonl").splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2] and all("response" in r for r in rows)
    assert s3.exists(f"{out}/teacher-forced/{name}_retrieval-text-val.jsonl")

    s3.rm(f"{split}/images/ret/1_b.png")
    proc = cli(fs["env"], *args, check=False, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"retrieval-text sample 1 (s3://{split}/annotations/retrieval-text.jsonl:2): images_list: image ret/1_b.png is not in "
        f"s3://{split}/images")


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_an_unknown_job_id_is_one_line(services, command):
    proc = cli(services["env"], command, "raysubmit_nosuchjob", check=False, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{command}: no job 'raysubmit_nosuchjob' on the cluster at {services['started']['ray'].url}"]


def test_missing_inputs_stop_before_anything_starts(services):
    """A training file that is not there, and evaluating a run never trained: one line
    each, before any Ray job or MLflow run exists."""
    fs = services
    name = f"m-{uuid.uuid4().hex[:8]}"
    proc = cli(fs["env"], "train", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE[:2],
               "--set", f"data.train=s3://{BUCKET}/nowhere/data.jsonl", check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: training {name} failed: DataError: data.train: s3://{BUCKET}/nowhere/data.jsonl is not a file")
    proc = cli(fs["env"], "eval", "configs/v2pe-demo.yaml", "--set", f"name={name}", *BASE[:2], check=False,
               timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"eval: no trained model at s3://{BUCKET}/runs/{name}/export: train {name} first, or pass --checkpoint")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(fs["started"]["mlflow"].url).get_experiment_by_name("longview-v2pe")
    assert exp is None or not MlflowClient(fs["started"]["mlflow"].url).search_runs(
        [exp.experiment_id], filter_string=f"tags.`longview.run_name` = '{name}'")


def test_an_experiment_writes_its_own_folder_and_names_its_runs_apart(services, tmp_path):
    """`longview experiment` as `make experiment` runs it, shortened: both arms trained and
    evaluated, the joint table printed once, the figure and table in --out, and MLflow
    names that lead with each arm (the runs table cuts long names)."""
    name, out = unique("exp"), tmp_path / "out"
    proc = cli(services["env"], "experiment", "configs/v2pe-length.yaml", "--set", f"name={name}", *BASE[:2],
               "--set", "training.steps=2", "--set", "data.synthetic.samples=4", "--set", "evaluation.lengths=[512]",
               "--set", "evaluation.strides=[256]", "--set", "evaluation.samples_per_length=1", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["length-generalisation.md", "length-generalisation.png"]
    assert proc.stdout.count("| 512 | 1 | 1 |") == 1, proc.stdout[-3000:]  # the table's row (tokens, x train, δ), once
    assert "MLflow run of the comparison (joint figure and table): " in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services["started"]["mlflow"].url)
    exp = client.get_experiment_by_name("longview-v2pe")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`longview.experiment` = '{name}'")
    assert sorted(r.info.run_name for r in runs) == sorted([f"comparison · {name}", f"v2pe_rnd · {name}",
                                                            f"default · {name}"]), [r.info.run_name for r in runs]
    evals = client.search_runs([exp.experiment_id], filter_string="tags.`longview.kind` = 'evaluation'")
    shown = {r.info.run_name for r in evals}
    assert {f"v2pe_rnd eval · {name}", f"default eval · {name}"} <= shown
