"""The judge and its metrics against known cases, and the paths that log them."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.support import REPO_ROOT


def test_evaluate_job_prints_a_table_and_logs_a_nested_run(micro_config, tmp_path: Path, judge_reference) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.mlflow_tracker import MlflowTracker
    from sd3ray.training.context import LocalContext
    from sd3ray.training.loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = micro_config("train.steps=2", "train.eval_every=2", f"tracking.uri={uri}")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), MlflowTracker(uri, "eval-test"))
    proc = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--checkpoint", result.checkpoint, "--guidance", "1", "3", "--steps", "2",
         "--num-samples", "20", "--tracking-uri", uri, "--output", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| guidance | steps | prompt acc" in proc.stdout and "| 3 | 2 |" in proc.stdout
    assert (tmp_path / "out/results.json").is_file()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(runs) == 1 and "eval/g3_s2/accuracy" in runs[0].data.metrics
