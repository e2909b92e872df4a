"""A real CPU sweep on the shared Ray head: ASHA stops trials without leaking their resources, failures are
recorded without stopping the sweep, the parent/child MLflow runs hold what a person reviews, and a resumed sweep
runs nothing twice. One sweep checks all of it: every trial is a Ray Train run, the costliest thing a test starts."""


from mlflow.tracking import MlflowClient

from sd3ray.sweeps.driver import run_sweep
from sd3ray.sweeps.spec import load_sweep
from tests.support import sweep_file


def test_asha_stops_a_trial_a_failure_is_recorded_and_resume_reruns_nothing(ray_head, mnist_parquet, tmp_path) -> None:
    """One sweep, four trials in grid order, one at a time (a 2-CPU worker each on the 2-CPU head):

    - w64 reaches ASHA's rung at step 2 first and finishes;
    - w32 is stopped there: its loss/val at step 2 (~1.84) is far outside w64's (~1.70), on any CPU;
    - w48 then needs the CPUs w32 held, so a placement group left behind by an ASHA-stopped trial would leave it
      waiting forever (Ray issue #54305); it finishes or is stopped, by its own loss;
    - w40 fails: 40 is not a multiple of head_dim 16. The others run on, and the sweep records the failure.

    One worker, not two of one CPU each: the same guard with one worker process fewer to start per trial."""
    path = sweep_file(tmp_path, mnist_parquet, "asha", [64, 32, 48, 40], workers_per_trial=1, cpus_per_worker=2,
                       schemes=[{"scheme": "uniform"}], registered_model="asha-best",
                       asha={"enabled": True, "grace_period": 2, "reduction_factor": 4})
    rows = run_sweep(load_sweep(path))
    by_trial = {r["trial"]: r for r in rows}
    assert sorted(by_trial) == ["w32-uniform", "w40-uniform", "w48-uniform", "w64-uniform"]
    assert by_trial["w64-uniform"]["status"] == "finished" and by_trial["w64-uniform"]["step"] == 6
    stopped = by_trial["w32-uniform"]
    assert stopped["status"] == "stopped early" and stopped["step"] == 2, rows
    assert stopped["stopped_because"].startswith("ASHA at step 2: loss/val "), rows
    assert by_trial["w48-uniform"]["status"] in ("finished", "stopped early"), rows  # it ran: nothing was leaked
    assert all(r["step"] == 6 and r["stopped_because"] == "" for r in rows if r["status"] == "finished")
    assert all(r["step"] < 6 for r in rows if r["status"] == "stopped early")
    assert by_trial["w40-uniform"]["status"] == "failed"
    assert "not a multiple of head_dim 16" in by_trial["w40-uniform"]["error"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-asha'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # every trial that trained is a child run; the failed one stopped before training began
    assert sorted(c.info.run_name for c in children) == ["w32-uniform", "w48-uniform", "w64-uniform"]
    assert all(c.data.params["model.num_heads"] == str(int(c.data.params["model.width"]) // 16) for c in children)
    # no child run is left RUNNING: the finished trial ended its own; ASHA's stopped ones are ended with the reason
    status = {c.info.run_name: c.info.status for c in children}
    assert status["w64-uniform"] == "FINISHED" and status["w32-uniform"] == "KILLED", status
    killed = next(c for c in children if c.info.run_name == "w32-uniform")
    assert killed.data.tags["sd3ray.stopped_because"] == stopped["stopped_because"]
    assert set(status.values()) <= {"FINISHED", "KILLED"}
    files = [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")]
    assert {"sweep/results.csv", "sweep/results.md"} <= set(files)
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    assert any("metric_vs_width" in p for p in images) and any("best_grid_per_scheme" in p for p in images)
    assert client.get_run(parent.info.run_id).data.metrics["sweep/stopped_early"] >= 1
    # the best trial's model is registered (a finished one: trials stopped at step 2 are far behind), and the parent
    # run says which trial and version it was
    best = min((r for r in rows if r["loss/val"] is not None), key=lambda r: r["loss/val"])
    assert best["status"] == "finished"
    best = best["trial"]
    (best_run,) = client.search_runs([experiment], f"attributes.run_name = '{best}'")
    assert parent.data.tags["sd3ray.best_trial"] == best
    assert parent.data.tags["sd3ray.registered_model"] == "models:/asha-best/1"
    assert client.get_model_version("asha-best", "1").run_id == best_run.info.run_id

    before = len(client.search_runs([experiment]))
    again = run_sweep(load_sweep(path), resume=True)
    assert {r["trial"]: r["status"] for r in again} == {r["trial"]: r["status"] for r in rows}
    parents = client.search_runs([experiment], "attributes.run_name = 'sweep-asha'")
    assert len(parents) == 1 and len(client.search_runs([experiment])) == before  # no trial ran again
