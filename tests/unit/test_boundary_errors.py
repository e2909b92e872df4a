"""Errors of the libraries at sd3ray's edges (file decoding, pyarrow, MLflow URIs) become one sd3ray message that
names the file or URI and the fix. Each test plants the fault."""


import pytest

from sd3ray.errors import TrackingError
from sd3ray.storage import resolve_tracking_uri


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/mlruns"])
def test_an_unknown_tracking_scheme_is_refused_with_the_ones_that_work(uri: str, monkeypatch) -> None:
    with pytest.raises(TrackingError, match=r"tracking.uri .*cannot open a \w+:// store; use http\(s\)://"):
        resolve_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI "):
        resolve_tracking_uri("")


@pytest.mark.parametrize("uri", ["sqlite:///x.db", "http://127.0.0.1:5000", "postgresql+psycopg2://u@h/db", "mlruns"])
def test_the_stores_mlflow_opens_pass(uri: str) -> None:
    assert resolve_tracking_uri(uri).endswith(uri.split("///")[-1])
