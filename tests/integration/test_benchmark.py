"""The benchmark runs and measures what it claims (a quick CPU smoke test; speed targets live in the job)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT

TINY = ["model.width=64", "model.depth=2", "model.num_heads=2", "model.patch_size=4"]




def test_benchmark_job_prints_writes_and_logs_its_figures(mnist_parquet: Path, tmp_path: Path,
                                                          mlflow_server: str) -> None:
    pytest.importorskip("diffusers")
    from mlflow.tracking import MlflowClient

    proc = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--config", "configs/mnist_tiny.yaml", "--batch", "4", "--iters", "1",
         "--warmup", "0", "--sampling-images", "4", "--output", str(tmp_path / "b.json"),
         "--tracking-uri", mlflow_server,
         *[a for s in [*TINY, f"data.parquet_dir={mnist_parquet}", "sample.steps=2", "sample.guidance=2",
                       "tracking.experiment=bench"]
           for a in ("--set", s)]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sd3ray | False |" in proc.stdout and "| diffusers | False |" in proc.stdout
    assert "sampling (2 Euler steps, CFG 2)" in proc.stdout and "data path" in proc.stdout
    written = json.loads((tmp_path / "b.json").read_text())
    assert (tmp_path / "b.md").read_text().startswith("CPU")
    run = MlflowClient(mlflow_server).get_run(proc.stdout.split("logged to MLflow run ")[1].split()[0])
    sd3ray_row = written["rows"][0]
    assert run.data.metrics["bench/sd3ray/images_per_s"] == pytest.approx(sd3ray_row["images_per_s"])
    assert run.data.metrics["bench/sampling/images_per_s"] > 0
    assert run.data.params["model.width"] == "64" and run.data.tags["sd3ray.kind"] == "benchmark"
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id, "benchmark")}
    assert artifacts == {"benchmark/b.json", "benchmark/b.md"}


def test_benchmark_job_rejects_a_bad_ray_overhead_config_before_timing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "--ray-overhead", "configs/missing.yaml", "--no-tracking",
         "--output", str(tmp_path / "b.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--ray-overhead: config file configs/missing.yaml does not exist" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_ray_overhead_rows_compare_ray_with_local_mode_side_by_side_and_interleaved(
        ray_head, micro_config, tmp_path: Path) -> None:
    """Both of the benchmark's Ray comparisons on one config: local mode, local mode beside the cluster and a
    streamed Ray run; then local and Ray in memory alternately (A B A B). Three Ray Train runs in all."""
    from benchmarks.ray_overhead import (
        interleaved_ray_rows,
        ray_overhead_config,
        ray_overhead_rows,
        stream_read_rows,
    )

    steps = 4
    cfg = ray_overhead_config(micro_config(), steps=steps, output_dir=str(tmp_path / "bench"))
    assert (cfg.train.steps, cfg.train.log_every, cfg.eval.num_samples) == (4, 2, 0)
    local, beside, streamed = ray_overhead_rows(cfg, [("streamed", 1, 1, "stream")], local_beside_cluster=True)
    assert local["vs_local"] == 1.0 and not local["ray"]
    assert beside["setup"].endswith("Ray cluster up") and not beside["ray"]
    assert streamed["setup"] == "streamed" and streamed["ray"] and streamed["loading"] == "stream"
    assert streamed["vs_local"] == pytest.approx(streamed["images_per_s"] / local["images_per_s"])
    for row in (local, beside, streamed):  # fixed cost: wall time less the steps at the steady rate
        assert row["fixed_s"] == pytest.approx(row["wall_s"] - steps * 16 / row["images_per_s"])
        assert 0 < row["fixed_s"] < row["wall_s"]
    assert (tmp_path / "bench" / "ray" / "bench-1x1-stream").is_dir()  # the Ray run wrote where the config says

    *pairs, median = interleaved_ray_rows(cfg, repeats=2)
    assert [p["repeat"] for p in pairs] == [0, 1] and median["repeat"] == "median"
    for pair in pairs:
        assert pair["ray_vs_local"] == pytest.approx(pair["ray_images_per_s"] / pair["local_images_per_s"])
    assert median["ray_vs_local"] == pytest.approx(sum(p["ray_vs_local"] for p in pairs) / 2)
    ray_runs = {p.name for p in (tmp_path / "bench" / "ray").iterdir()}
    assert ray_runs == {"bench-1x1-stream", "bench-interleaved-0", "bench-interleaved-1"}

    # one whole pass in batches of 1,000 rather than the training batch: the same read in fewer Python iterations
    from sd3ray.config import apply_overrides, from_dict, to_dict

    (read,) = stream_read_rows(from_dict(apply_overrides(to_dict(cfg), ["train.batch_size=1000"])), [1])
    assert read["rows"] == 60000  # one whole pass over MNIST's train split


def test_gpu_report_measures_every_part_with_tiny_settings(mnist_parquet: Path, tmp_path: Path) -> None:
    """The GPU report's command, on CPU at toy sizes, so it is known to work before a GPU is at hand."""
    pytest.importorskip("diffusers")
    sets = [*TINY, f"data.parquet_dir={mnist_parquet}", "data.download=false", "train.batch_size=8",
            "train.log_every=2", "train.eval_every=4", "eval.num_samples=20", "eval.batch_size=20", "sample.steps=2",
            "data.num_val_images=16", "sample.guidance=2"]
    proc = subprocess.run(
        [sys.executable, "jobs/gpu_report.py", "--config", "configs/mnist_tiny.yaml", "--device", "cpu", "--batch", "2",
         "--max-batch", "4", "--iters", "1", "--no-compile", "--minutes", "0.05", "--judge-guidance", "0,2",
         "--output", str(tmp_path / "r.json"),
         *[a for s in sets for a in ("--set", s)]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["model"], r["compiled"]) for r in report["speed"]] == [("sd3ray", False), ("diffusers", False)]
    assert [r["batch"] for r in report["mfu"]] == [2, 4] and not any(r["out_of_memory"] for r in report["mfu"])
    quality = report["quality"]
    # the wall-clock budget ended the run (a 3 s budget cannot reach the config's steps), after a final judgement;
    # the stop keeps room for that judgement, so the run may end before the 3 s are up
    assert 2 <= quality["steps"] < 2000 and quality["wall_minutes"] > 0
    final = quality["evaluations"][-1]
    assert final["step"] == quality["steps"] and 0 <= final["samples/accuracy"] <= 1
    # the floor comes back as a tag in 6 digits
    assert final["samples/cfid_ratio"] == pytest.approx(final["val/cfid"] / final["val/cfid_floor"], rel=1e-5)
    minutes = [e["minutes"] for e in quality["evaluations"]]
    assert minutes == sorted(minutes)
    # the final weights at each guidance, judged on the prompts and noise of the training-time judge: at the
    # config's own guidance (set to 2 here) they are the final evaluation's samples again, to the last digit
    by_guidance = quality["final_by_guidance"]
    assert [r["guidance"] for r in by_guidance] == [0, 2]
    for key in ("val/cfid", "samples/accuracy", "samples/diversity"):
        assert by_guidance[1][key] == pytest.approx(final[key], rel=1e-6)
    markdown = (tmp_path / "r.md").read_text()
    assert markdown.startswith("# sd3ray GPU report: CPU") and "## Time to quality" in markdown
    assert f"| {final['step']} |" in markdown
    assert "Final weights of the run at each guidance" in markdown and "| 0 |" in markdown


def test_gpu_report_levers_train_each_lever_and_judge_it_on_the_way(mnist_parquet: Path, tmp_path: Path) -> None:
    """The levers part: every lever is its own run from scratch with its overrides, judged at the plan's steps and
    at each guidance; a lever that changes the steps keeps its own length."""
    from tests.support import MICRO

    plan = {"config": "configs/mnist_tiny.yaml",
            "base": [*MICRO, f"data.parquet_dir={mnist_parquet}", "eval.num_samples=20", "eval.batch_size=20",
                     "sample.guidance=2"],
            "steps": 4, "judge_every": 2, "guidances": [1, 2],
            "levers": {"lr1e-3": ["train.lr=1e-3"], "lr1e-2-six": ["train.lr=1e-2", "train.steps=6"]}}
    levers_file = tmp_path / "levers.yaml"
    levers_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "jobs/gpu_report.py", "--device", "cpu", "--parts", "levers", "--levers", str(levers_file),
         "--output", str(tmp_path / "l.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = json.loads((tmp_path / "l.json").read_text())["levers"]
    first, second = section["levers"]
    assert (first["label"], first["steps"], second["label"], second["steps"]) == ("lr1e-3", 4, "lr1e-2-six", 6)
    assert [e["step"] for e in first["evaluations"]] == [2, 4]
    assert [e["step"] for e in second["evaluations"]] == [2, 4, 6]
    # same seed and data, different learning rate: the runs' losses part at the first judgement already
    assert first["evaluations"][0]["loss/val"] != second["evaluations"][0]["loss/val"]
    assert [r["guidance"] for r in first["final_by_guidance"]] == [1, 2]
    # at the config's guidance (2) the final weights give the last evaluation's samples again
    assert first["final_by_guidance"][1]["val/cfid"] == pytest.approx(first["evaluations"][-1]["val/cfid"], rel=1e-6)
    markdown = (tmp_path / "l.md").read_text()
    assert "## Levers: configs/mnist_tiny.yaml" in markdown and "| lr1e-2-six | `train.lr=1e-2` `train.steps=6` | 6 |" \
        in markdown

    levers_file.write_text(yaml.safe_dump({**plan, "levers": {"typo": ["train.lrr=1"]}}))
    proc = subprocess.run(
        [sys.executable, "jobs/gpu_report.py", "--device", "cpu", "--parts", "levers", "--levers", str(levers_file),
         "--output", str(tmp_path / "bad.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "lever 'typo'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad.json").exists()  # refused before any work


def test_gpu_report_study_trains_each_scheme_and_seed_into_the_study_table(mnist_parquet: Path, tmp_path: Path) -> None:
    """The study part: a sweep file's trials run one after another without Ray, each judged at its end, and the
    table gives mean ± std over the seeds per scheme, with SD3's Table 1 rank beside it."""
    from tests.support import MICRO, sweep_file

    micro = [o for o in MICRO if not o.startswith("eval.")]
    study = sweep_file(tmp_path, mnist_parquet, "study", [32], seeds=2, metric="samples/cfid_ratio",
                       asha={"enabled": False},
                       schemes=[{"scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}, {"scheme": "cosmap"}],
                       overrides=[*micro, f"data.parquet_dir={mnist_parquet}", "train.steps=4", "train.eval_every=4",
                                  "train.ckpt_every=4", "eval.num_samples=20", "eval.batch_size=20"])
    proc = subprocess.run(
        [sys.executable, "jobs/gpu_report.py", "--device", "cpu", "--parts", "study", "--study", str(study),
         "--output", str(tmp_path / "s.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = json.loads((tmp_path / "s.json").read_text())["study"]
    trials = section["trials"]
    assert [t["trial"] for t in trials] == ["w32-logit_normal(0,1)-seed0", "w32-logit_normal(0,1)-seed1",
                                            "w32-cosmap-seed0", "w32-cosmap-seed1"]
    assert all(t["status"] == "finished" and t["step"] == 4 and t["samples/cfid_ratio"] > 0 for t in trials)
    # the seeds differ, so each point's two trials do too
    assert trials[0]["samples/cfid_ratio"] != trials[1]["samples/cfid_ratio"]
    rows = {line.split("|")[2].strip(): line for line in section["table"].splitlines()[2:]}
    assert set(rows) == {"w32-logit_normal(0,1)", "w32-cosmap"}
    assert rows["w32-logit_normal(0,1)"].rstrip(" |").endswith("1.54") and " ± " in rows["w32-cosmap"]
    assert "## Study: study, 4 of 4 trials finished" in (tmp_path / "s.md").read_text()


def test_time_to_quality_per_step_trains_exactly_that_many_steps_with_each_seed(mnist_parquet: Path,
                                                                               tmp_path: Path) -> None:
    """--steps: quality per image seen; the run ends at the step count, not a clock, and the report names the
    machine and the command. --seeds 2: each seed trains its own run, and the report gives mean ± std over them."""
    from tests.support import MICRO

    micro = ["micro", *MICRO, f"data.parquet_dir={mnist_parquet}", "train.log_every=4", "eval.batch_size=20"]
    proc = subprocess.run(
        [sys.executable, "jobs/time_to_quality.py", "--steps", "8", "--seeds", "2", "--num-samples", "20",
         "--output-dir", str(tmp_path / "ttq"), "--no-tracking", "--setup", *micro],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ttq" / "time_to_quality.json").read_text())
    assert [(r["seed"], r["budget_steps"], r["step"], r["images_seen"]) for r in rows] == [(0, 8, 8, 128),
                                                                                          (1, 8, 8, 128)]
    assert rows[0]["val/cfid"] != rows[1]["val/cfid"]  # two trainings, not one judged twice
    report = (tmp_path / "ttq" / "time_to_quality.md").read_text()
    assert report.startswith("CPU: ") and "--steps 8" in report and "| micro (seed 1) | 8 steps |" in report
    assert "| micro | 8 steps | 2 |" in report and " ± " in report


def test_time_to_quality_trains_each_budget_as_a_user_would_and_judges_it(micro_config, mnist_parquet: Path,
                                                                         tmp_path: Path) -> None:
    """Two budgets of a micro model through the job: each is a fresh train.py process, stopped by its clock (not
    its step count) with the learning rate decayed to zero at the end, judged, tabled and logged."""
    from tests.support import MICRO

    log_every = 5  # the clock is read at log steps: the first one is the earliest a budget can end a run
    micro = ["micro", *MICRO, f"data.parquet_dir={mnist_parquet}", "train.steps=100000", f"train.log_every={log_every}",
             "eval.num_samples=50", "eval.batch_size=50", "train.lr_decay_to_budget=true"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "jobs/time_to_quality.py", "--minutes", "0.25", "0.6", "--reserve-s", "6", "--num-samples",
         "40", "--output-dir", str(tmp_path / "ttq"), "--tracking-uri", uri, "--setup", *micro],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ttq" / "time_to_quality.json").read_text())
    assert [(r["label"], r["budget_minutes"]) for r in rows] == [("micro", 0.25), ("micro", 0.6)]
    short, long = rows
    # the clock ended both runs, the longer one later. The budgets count from the command, start-up included, so
    # they lie far apart: with the neighbouring test file on the other core, a 0.4 min budget once ended at the
    # same first logged step as the 0.25 min one
    assert log_every <= short["step"] < long["step"] < 100000
    for row in rows:
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        # the cosine ended with the budget, not at train.steps (projected a log step ahead: one interval of slack)
        assert meta["lr_horizon"] <= row["step"] + log_every
        # the 15 s budget counts from the command: start-up (~10 s on an idle 2-core machine) and the 6 s reserve
        # spend it before the first log step, where that run ends, on time when idle, past it under load. The
        # 0.6 min run is the one held to its clock
        assert row["train_seconds"] < 60 * row["budget_minutes"] or row["step"] == log_every
        assert 60 * row["budget_minutes"] < 60 * row["wall_minutes"] + 60
        assert row["samples/cfid_ratio"] == pytest.approx(row["val/cfid"] / row["val/cfid_floor"])
    table = (tmp_path / "ttq" / "time_to_quality.md").read_text()
    assert f"| micro | 0.6 min | {long['wall_minutes']:.2f} | {long['step']} |" in table

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "attributes.run_name = 'time-to-quality'")
    assert run.data.metrics["ttq/micro/0.6min/accuracy"] == pytest.approx(long["samples/accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "time_to_quality")}
    assert artifacts == {"time_to_quality/time_to_quality.md", "time_to_quality/time_to_quality.json"}


def test_thread_contention_runs_each_setup_and_names_the_machine_and_command() -> None:
    """The thread-contention benchmark at ten steps: three setups, each timed, under the machine's line. Few steps,
    as its second setup is the contention it measures, and the test file beside it would share in it."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.thread_contention", "--steps", "10"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("CPU: ")
    assert "command: python -m benchmarks.thread_contention --steps 10" in proc.stdout
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]
    cores = len(os.sched_getaffinity(0))
    # the children run on torch's default (a thread per core), not the tests' own cap, then on half the cores each
    assert [[cell.strip() for cell in row[:2]] for row in rows[1:]] == [
        ["1 process, torch's default threads", str(cores)],
        ["2 processes at once, torch's default threads", str(cores)],
        [f"2 processes at once, OMP_NUM_THREADS={max(1, cores // 2)}", str(max(1, cores // 2))]]
    assert all(float(seconds) > 0 for _, _, seconds in rows[1:])


def test_step_speed_times_the_first_steps_and_the_steady_rate(mnist_parquet: Path) -> None:
    """The step-speed benchmark's table for the eager fp32 and bf16 steps of a micro model (compiling is too slow
    for a test), with the machine it ran on."""
    from tests.support import MICRO

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_speed", "--modes", "none", "--precisions", "fp32,bf16",
         "--warmup", "1", "--iters", "2",
         *[a for s in [*MICRO, f"data.parquet_dir={mnist_parquet}"] for a in ("--set", s)]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("CPU: ")
    rows = {line.split("|")[2].strip(): line for line in proc.stdout.splitlines() if line.startswith("| none |")}
    assert set(rows) == {"fp32", "bf16"}
    first_s, images_per_s, ratio = (cell.strip() for cell in rows["fp32"].strip("|").split("|")[2:])
    assert float(first_s) > 0 and float(images_per_s) > 0 and ratio == "1.00×"
