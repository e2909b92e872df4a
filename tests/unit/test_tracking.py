"""The tracking store: URIs resolved, a dead server named, and where a local store keeps its artifacts."""

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


def test_a_sqlite_store_keeps_artifacts_beside_its_database_not_in_the_working_folder(
        tmp_path: Path, micro_config, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.mlflow_tracker import MlflowTracker

    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    tracker = MlflowTracker(uri, "a b/c", "artifacts")
    run_id = tracker.start(micro_config())
    (tmp_path / "note.txt").write_text("kept")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()
    assert list(elsewhere.iterdir()) == []  # no ./mlruns where the job happened to start
    assert (tmp_path / "store" / "mlartifacts" / "a_b_c" / run_id / "artifacts" / "note.txt").read_text() == "kept"
    assert "note.txt" in [a.path for a in MlflowClient(uri).list_artifacts(run_id)]


def test_a_sweep_ends_only_the_child_runs_still_running_with_their_reason(tmp_path: Path, micro_config) -> None:
    """A trial Tune stopped never ended its MLflow run; the sweep ends it (KILLED, with the reason), and leaves a run
    that ended itself as it was."""
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MlflowTracker(uri, "sweep")
    parent_id = parent.start(micro_config(), run_name="sweep-x")
    client = MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    children = {name: client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent_id}).info.run_id
                for name in ("stopped", "finished")}
    client.set_terminated(children["finished"], "FINISHED")
    for name in children:
        parent.close_child_run(name, "KILLED", {"sd3ray.stopped_because": "ASHA at step 2"})
    parent.finish()
    stopped, finished = (client.get_run(children[name]) for name in ("stopped", "finished"))
    assert stopped.info.status == "KILLED" and stopped.data.tags["sd3ray.stopped_because"] == "ASHA at step 2"
    assert finished.info.status == "FINISHED" and "sd3ray.stopped_because" not in finished.data.tags
