"""Training against a real MLflow server over HTTP, then reading back what a person would look at."""

from pathlib import Path

import pytest

from sd3ray.errors import TrackingError
from sd3ray.storage import resolve_tracking_uri
from sd3ray.tracking.mlflow_tracker import check_reachable


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(TrackingError, match="unreachable.*unset MLFLOW_TRACKING_URI"):
        check_reachable("http://127.0.0.1:9", timeout_s=2)


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri("") == "http://example:5000"
