"""The MLflow UI as a user sees it, in a real browser (headless Chromium): the
experiment opens on its runs, and a run's page shows its name, description, source,
metrics, and the figure among its artifacts."""

import os

from tests.e2e.browser import render
from tests.e2e.conftest import mlflow_run


def test_mlflow_ui_shows_the_run_its_metrics_and_its_figure(services, reference, tmp_path):
    fs = services
    name = reference[0]
    client, run = mlflow_run(fs, name)
    base = f"{fs['started']['mlflow'].url}/#/experiments/{run.info.experiment_id}"
    view = "?workflowType=machine_learning"  # the links longview prints carry it (tracking.UI_MODEL_TRAINING)

    runs = render(f"{base}{view}")
    assert "longview-v2pe" in runs and name in runs  # the experiment, on its runs
    assert "longview training (v2pe)" in runs  # the Source column

    shot = str(tmp_path / "run.png")
    page = render(f"{base}/runs/{run.info.run_id}{view}", screenshot=shot)
    assert name in page and f"v2pe training job {name}" in page  # name and description
    assert "loss" in page and "tokens_per_s" in page and "system/" in page  # model and system metrics
    # The headline (the last loss) is in the description, above the metrics table, whose
    # first group MLflow fixes as the system metrics.
    assert f"Finished at step {len(reference[1])}: loss " in page
    assert page.index("Finished at step") < page.index("System metrics ("), page[:3000]  # the group, not the tab
    assert os.path.getsize(shot) > 20_000  # a rendered page, not a blank one

    art = render(f"{base}/runs/{run.info.run_id}/artifacts/loss.png{view}")
    assert "loss.png" in art and "config" in art  # the figure, selected, beside the config folder
