"""Training against a real MLflow server over HTTP, then reading back what a person would look at."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sd3ray.checkpoint import latest_checkpoint
from sd3ray.context import LocalContext
from sd3ray.tracking import MlflowTracker, TrackingError, check_reachable, resolve_tracking_uri
from sd3ray.train_loop import train

pytestmark = pytest.mark.integration


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_training_run_round_trips_through_a_real_server(mlflow_server: str, micro_config, tmp_path: Path) -> None:
    common = ["train.steps=4", "train.log_every=2", "train.eval_every=2", "train.ckpt_every=2",
              f"tracking.uri={mlflow_server}", "tracking.experiment=test-roundtrip", "tracking.run_name=micro"]
    cfg = micro_config(*common)
    tracker = MlflowTracker(mlflow_server, "test-roundtrip", "micro")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), tracker)

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "micro"
    assert run.data.params["model.width"] == "32" and run.data.params["flow.scheme"] == "logit_normal"
    assert len(run.data.tags["sd3ray.config_hash"]) == 12 and "sd3ray.checkpoint_uri" in run.data.tags
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [2, 4]
    assert {"val/loss", "val/loss_t0.062", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(run.data.metrics)
    files = _artifacts(client, result.run_id)
    assert "config.yaml" in files and "checkpoint/model.pt" in files and "checkpoint/MANIFEST.json" in files
    grids = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    assert {f.split("+")[2] for f in grids if f.startswith("images/samples+step+")} == {"2", "4"}, grids

    # Resume from the step-2 checkpoint: the same MLflow run continues, with no duplicated steps.
    first = sorted((tmp_path / "run/checkpoints").iterdir())[0]
    assert first.name == "step_00000002"
    resumed = train(micro_config(*common, "train.steps=6"), LocalContext(tmp_path / "run", torch.device("cpu"), first),
                    MlflowTracker(mlflow_server, "test-roundtrip"))
    assert resumed.run_id == result.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [2, 4, 6]
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000006"


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(TrackingError, match="unreachable.*unset MLFLOW_TRACKING_URI"):
        check_reachable("http://127.0.0.1:9", timeout_s=2)


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri("") == "http://example:5000"
