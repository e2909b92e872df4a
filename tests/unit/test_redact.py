
import pytest

from sd3ray.storage import redact


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
