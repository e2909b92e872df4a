"""A real CPU sweep on the shared Ray head: ASHA stops trials without leaking their resources, the parent/child
MLflow runs hold what a person reviews, and a resumed sweep runs nothing twice. One sweep checks all of it: every
trial is a Ray Train run, the costliest thing a test starts. A second, whose trials fail before any worker starts,
checks that a sweep in which every trial failed ends the job with an error naming each failure."""


import runpy
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sd3ray.config import ConfigError
from sd3ray.sweeps.driver import run_sweep
from sd3ray.sweeps.spec import load_sweep
from tests.support import REPO_ROOT, sweep_file


def test_asha_stops_a_trial_without_leaking_it_and_resume_reruns_nothing(ray_head, mnist_parquet, tmp_path) -> None:
    """One sweep, three trials in grid order, one at a time (a 2-CPU worker each on the 2-CPU head):

    - w64 reaches ASHA's rung at step 2 first and finishes;
    - w32 is stopped there: its loss/val at step 2 (~1.84) is far outside w64's (~1.70), on any CPU;
    - w48 then needs the CPUs w32 held, so a placement group left behind by an ASHA-stopped trial would leave it
      waiting forever (Ray issue #54305); it finishes or is stopped, by its own loss.

    One worker, not two of one CPU each: the same guard with one worker process fewer to start per trial."""
    path = sweep_file(tmp_path, mnist_parquet, "asha", [64, 32, 48], workers_per_trial=1, cpus_per_worker=2,
                       schemes=[{"scheme": "uniform"}], registered_model="asha-best",
                       asha={"enabled": True, "grace_period": 2, "reduction_factor": 4})
    rows = run_sweep(load_sweep(path))
    by_trial = {r["trial"]: r for r in rows}
    assert sorted(by_trial) == ["w32-uniform", "w48-uniform", "w64-uniform"]
    assert by_trial["w64-uniform"]["status"] == "finished" and by_trial["w64-uniform"]["step"] == 6
    stopped = by_trial["w32-uniform"]
    assert stopped["status"] == "stopped early" and stopped["step"] == 2, rows
    assert stopped["stopped_because"].startswith("ASHA at step 2: loss/val "), rows
    assert by_trial["w48-uniform"]["status"] in ("finished", "stopped early"), rows  # it ran: nothing was leaked
    assert all(r["step"] == 6 and r["stopped_because"] == "" for r in rows if r["status"] == "finished")
    assert all(r["step"] < 6 for r in rows if r["status"] == "stopped early")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-asha'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # every trial is a child run
    assert sorted(c.info.run_name for c in children) == ["w32-uniform", "w48-uniform", "w64-uniform"]
    configs = [client.download_artifacts(c.info.run_id, "config.yaml", str(tmp_path / c.info.run_id)) for c in children]
    models = [yaml.safe_load(Path(config).read_text())["model"] for config in configs]
    assert all(model["num_heads"] == model["width"] // 16 for model in models)
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
    with pytest.raises(ConfigError, match="sweep 'asha' already ran at .*--resume.*another name"):
        run_sweep(load_sweep(path))  # the same sweep again without --resume: refused, nothing mixed in
    assert len(client.search_runs([experiment])) == before


def test_a_sweep_whose_every_trial_failed_exits_non_zero_naming_each_failure(ray_head, mnist_parquet, tmp_path,
                                                                             capsys, monkeypatch) -> None:
    """A sweep over two image sets that were never prepared: each trial finds that out when it opens its set, before
    its workers start (the driver prepares and checks only the base config's), so Tune runs both to failure
    quickly. The job (jobs/tune.py as a user runs it, in this process, on the shared head) lists each failure in
    one line and exits 1; the parent MLflow run ends FAILED."""
    missing = [str(tmp_path / "missing-a"), str(tmp_path / "missing-b")]
    path = sweep_file(tmp_path, mnist_parquet, "all-fail", [32], schemes=[{"scheme": "uniform"}],
                      asha={"enabled": False}, space={"data.parquet_dir": missing})
    monkeypatch.setattr(sys, "argv", ["tune.py", "--config", str(path)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / "jobs/tune.py"), run_name="__main__")
    out, err = capsys.readouterr()
    assert exited.value.code == 1, err[-3000:]
    lines = out.splitlines()
    at = lines.index("sd3ray: 2 of 2 trials failed:")
    assert sorted(lines[at + 1:at + 3]) == [
        f"  w32-uniform-parquet_dir{where}: DataError: no Parquet image set at {where} (metadata.json missing). "
        f"Create it with `python jobs/prepare_data.py --data-root DIR --out {where}`" for where in missing], out
    error = err.strip().splitlines()[-1]
    assert error.startswith("sd3ray: error: all 2 trials of sweep 'all-fail' failed (each is listed above with its "
                            "error; tracebacks are in the trials' error.txt under "), err[-3000:]
    assert f"The first: w32-uniform-parquet_dir{missing[0]}: DataError: no Parquet image set at " in error
    assert "Traceback" not in err.split("sd3ray: error:")[-1]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("all-fail").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-all-fail'")
    assert parent.info.status == "FAILED"
    assert client.get_run(parent.info.run_id).data.metrics["sweep/failed"] == 2


def test_the_cpu_timestep_study_runs_two_seeds_into_a_study_table(ray_head, mnist_parquet, tmp_path,
                                                                   monkeypatch) -> None:
    """configs/sweeps/sd3_timesteps_cpu.yaml as shipped, cut to one scheme × 2 seeds of a few micro steps: each trial
    is judged (its metric is the judge's), and the parent run holds the study table and its plot. It runs as a user
    types it, from a project folder whose data, runs and tracking store are relative paths: Tune runs each trial in
    a folder of its own, where those paths would name nothing."""
    from tests.support import MICRO

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/mnist_parquet").symlink_to(mnist_parquet)
    path = REPO_ROOT / "configs/sweeps/sd3_timesteps_cpu.yaml"
    shipped = load_sweep(path, [], ["data.download=false"])
    assert len(shipped.schemes) == 7 and shipped.seeds == 3 and shipped.metric == "samples/cfid_ratio"
    micro = [o for o in MICRO if not o.startswith(("eval.", "train.batch_size"))]
    spec = load_sweep(path, ["schemes=[{scheme: logit_normal, logit_mean: 0.0, logit_std: 1.0}]", "seeds=2",
                             "widths=[32]", "head_dim=16", "name=cpu-study", f"storage_path={tmp_path / 'tune'}"],
                      [*micro, "data.parquet_dir=data/mnist_parquet", "train.steps=4", "train.eval_every=4",
                       "train.ckpt_every=4", "train.log_every=2", "train.batch_size=16", "eval.num_samples=20",
                       "eval.batch_size=20", "train.output_dir=runs", "tracking.uri=sqlite:///mlflow.db",
                       "tracking.experiment=cpu-study"])
    rows = run_sweep(spec)
    assert sorted(r["trial"] for r in rows) == ["w32-logit_normal(0,1)-seed0", "w32-logit_normal(0,1)-seed1"]
    assert all(r["status"] == "finished" and r["samples/cfid_ratio"] > 0 for r in rows), rows

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cpu-study").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'sweep-cpu-study'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2  # the trials logged where the sweep did, not to a database in their own folders
    study = Path(client.download_artifacts(parent.info.run_id, "sweep/study.md", str(tmp_path / "study")))
    (row,) = [line for line in study.read_text().splitlines() if "logit_normal(0,1)" in line]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["1", "w32-logit_normal(0,1)", "2"] and cells[-1] == "1.54", row  # SD3's rank beside it
    assert " ± " in cells[3] and not cells[3].endswith("± ")  # cFID / floor, mean ± std over the two seeds
    images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
    assert any("study_by_point" in p for p in images), images
