from pathlib import Path

import pytest

from sd3ray.redact import redact


@pytest.mark.parametrize(("text", "expected"), [
    ("https://alice:s3cr3t@mlflow.example.com:5000", "https://alice:***@mlflow.example.com:5000"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
    ("s3://bucket/runs?endpoint_override=h:9000&access_key=AKIA123&secret_key=abc&scheme=http",
     "s3://bucket/runs?endpoint_override=h:9000&access_key=***&secret_key=***&scheme=http"),
    ("gs://b/x?token=ya29.abc#frag", "gs://b/x?token=***#frag"),
    ("https://h/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA/2026", "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("tracking.uri: https://u:p@h\nstorage: /data/runs", "tracking.uri: https://u:***@h\nstorage: /data/runs"),
])
def test_credentials_are_masked_and_the_rest_stays_readable(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", ["s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http",
                                  "sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "runs/ray", "user@host:path"])
def test_text_without_credentials_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_no_config_value_logged_to_mlflow_carries_a_credential(micro_config, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking import MlflowTracker

    secret_uri = "https://alice:hunter2@mlflow.example.com"
    cfg = micro_config(f"tracking.uri={secret_uri}", "tracking.run_name=redacted")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(store, "redaction")
    run_id = tracker.start(cfg, tags={"sd3ray.checkpoint_uri": "s3://b/runs/x?secret_key=hunter2"})
    tracker.set_tags({"sd3ray.note": secret_uri})
    tracker.finish()
    client = MlflowClient(store)
    run = client.get_run(run_id)
    logged = [*run.data.params.values(), *run.data.tags.values(),
              Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()]
    assert not [value for value in logged if "hunter2" in value]
    assert run.data.params["tracking.uri"] == "https://alice:***@mlflow.example.com"
