"""No credential value anywhere a run leaves traces: MLflow params, tags and artifacts,
the job's output and Ray's logs, the checkpoints and export in S3."""

from pathlib import Path


def _hits(data: bytes, secrets: dict[str, bytes]) -> list[str]:
    return [name for name, value in secrets.items() if value in data]


def test_no_credential_in_the_traces_of_a_run(services, reference, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.e2e.conftest import history, s3fs_direct

    fs = services
    name, _, output = reference
    secrets = {k: v.encode() for k, v in fs["creds"].items()}
    found = []
    # the job's own output
    found += [f"output: {h}" for h in _hits(output.encode(), secrets)]
    # MLflow: params, tags, and every artifact
    _, run = history(fs, name)
    client = MlflowClient(fs["started"]["mlflow"].url)
    for kind, mapping in (("param", run.data.params), ("tag", run.data.tags)):
        for k, v in mapping.items():
            found += [f"MLflow {kind} {k}: {h}" for h in _hits(f"{k}={v}".encode(), secrets)]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    artifacts = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "job.yaml" for p in artifacts)  # the scan saw the artifacts
    for p in artifacts:
        found += [f"artifact {p.relative_to(local)}: {h}" for h in _hits(p.read_bytes(), secrets)]
    # checkpoints and the exported model
    s3 = s3fs_direct(fs)
    objects = s3.find(f"lve2e/runs/{name}")
    assert any(o.endswith(".distcp") for o in objects) and any("export" in o for o in objects)
    for key in objects:
        found += [f"s3://{key}: {h}" for h in _hits(s3.cat_file(key), secrets)]
    # Ray's logs of the session (driver, workers, job agent, runtime environments)
    logs = Path(fs["started"]["ray"].extra["temp_dir"])
    scanned = 0
    for p in logs.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 50 << 20 and "sockets" not in p.parts:
            scanned += 1
            try:
                found += [f"Ray log {p.relative_to(logs)}: {h}" for h in _hits(p.read_bytes(), secrets)]
            except OSError:
                pass
    assert scanned > 10
    assert not found, "credentials leaked:\n" + "\n".join(found)
    # and these values really were the job's credentials
    assert fs["env"]["AWS_SECRET_ACCESS_KEY"] == fs["creds"]["AWS_SECRET_ACCESS_KEY"]
