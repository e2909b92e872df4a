"""A real CPU sweep on the shared Ray head: ASHA stops trials without leaking their resources, failures are
recorded without stopping the sweep, and the parent/child MLflow runs hold what a person reviews."""


from mlflow.tracking import MlflowClient

from sd3ray.sweeps.driver import run_sweep
from sd3ray.sweeps.spec import load_sweep
from tests.support import sweep_file


def test_asha_sweep_releases_resources_and_logs_parent_and_children(ray_head, mnist_parquet, tmp_path) -> None:
    # One 2-CPU worker per trial on a 2-CPU cluster: one trial at a time, so a placement group left behind by an
    # ASHA-stopped trial would leave the next trial waiting forever (Ray issue #54305). One worker, not two of one
    # CPU each: the same guard with one worker process fewer to start per trial.
    path = sweep_file(tmp_path, mnist_parquet, "asha", [32, 64], workers_per_trial=1, cpus_per_worker=2,
                       asha={"enabled": True, "grace_period": 2, "reduction_factor": 4})
    spec = load_sweep(path)
    rows = run_sweep(spec)
    assert sorted(r["trial"] for r in rows) == sorted(
        ["w32-uniform", "w32-logit_normal(0,1)", "w64-uniform", "w64-logit_normal(0,1)"])
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "failed" not in statuses, rows
    assert all(r["step"] == 6 for r in rows if r["status"] == "finished")
    assert all(r["step"] < 6 for r in rows if r["status"] == "stopped early")
    assert all(r["stopped_because"].startswith(f"ASHA at step {r['step']}: loss/val ")
               for r in rows if r["status"] == "stopped early"), rows
    assert all(r["stopped_because"] == "" for r in rows if r["status"] == "finished")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-asha'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(r["trial"] for r in rows)
    assert all(c.data.params["model.num_heads"] == str(int(c.data.params["model.width"]) // 16) for c in children)
    files = [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")]
    assert {"sweep/results.csv", "sweep/results.md"} <= set(files)
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    assert any("metric_vs_width" in p for p in images) and any("best_grid_per_scheme" in p for p in images)
    assert client.get_run(parent.info.run_id).data.metrics["sweep/stopped_early"] >= 1


def test_a_failing_trial_is_recorded_and_resume_reruns_nothing(ray_head, mnist_parquet, tmp_path) -> None:
    # width 40 is not a multiple of head_dim 16: those trials fail; the others still run
    path = sweep_file(tmp_path, mnist_parquet, "failing", [32, 40], asha={"enabled": False},
                       schemes=[{"scheme": "cosmap"}], registered_model="failing-best")
    rows = run_sweep(load_sweep(path))
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["w32-cosmap"]["status"] == "finished"
    assert by_trial["w40-cosmap"]["status"] == "failed"
    assert "not a multiple of head_dim 16" in by_trial["w40-cosmap"]["error"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("failing").experiment_id
    # the best trial's model is registered, and the parent run says which trial and version it was
    (best,) = client.search_runs([experiment], "attributes.run_name = 'w32-cosmap'")
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-failing'")
    assert parent.data.tags["sd3ray.best_trial"] == "w32-cosmap"
    assert parent.data.tags["sd3ray.registered_model"] == "models:/failing-best/1"
    assert client.get_model_version("failing-best", "1").run_id == best.info.run_id
    before = len(client.search_runs([experiment]))
    again = run_sweep(load_sweep(path), resume=True)
    assert {r["trial"]: r["status"] for r in again} == {r["trial"]: r["status"] for r in rows}
    parents = client.search_runs([experiment], "attributes.run_name = 'sweep-failing'")
    assert len(parents) == 1 and len(client.search_runs([experiment])) == before  # no trial ran again
