from pathlib import Path

import yaml


def test_no_config_value_logged_to_mlflow_carries_a_credential(micro_config, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.mlflow_tracker import MlflowTracker

    secret_uri = "https://alice:hunter2@mlflow.example.com"
    cfg = micro_config(f"tracking.uri={secret_uri}", "tracking.run_name=redacted")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(store, "redaction")
    run_id = tracker.start(cfg, tags={"sd3ray.checkpoint_uri": "s3://b/runs/x?secret_key=hunter2"})
    tracker.set_tags({"sd3ray.note": secret_uri})
    tracker.finish()
    client = MlflowClient(store)
    run = client.get_run(run_id)
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    logged = [*run.data.params.values(), *run.data.tags.values(), config]
    assert not [value for value in logged if "hunter2" in value]
    assert yaml.safe_load(config)["tracking"]["uri"] == "https://alice:***@mlflow.example.com"
