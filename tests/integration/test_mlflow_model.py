"""A trained run's MLflow model: registered, loaded by its registry URI in a fresh process, sampled through
jobs/sample.py by the same URI, and served over HTTP by `mlflow models serve`, all giving the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sd3ray.tracking.mlflow_tracker import MlflowTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import (
    MICRO,
    REPO_ROOT,
    free_port,
    http_status,
    start_in_own_session,
    stop_process_group,
    wait_until,
)

MODEL = "sd3ray-test-model"
PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"prompt": ["7", "three"]})
first = model.predict(frame, params={"seed": 1, "steps": 3})
again = model.predict(frame, params={"seed": 1, "steps": 3})
other = model.predict(frame, params={"seed": 2, "steps": 3})
np.save(sys.argv[2], first)
print(json.dumps({"dtype": str(first.dtype), "shape": list(first.shape), "same_seed_same_images":
                  bool(np.array_equal(first, again)), "other_seed_differs": not np.array_equal(first, other)}))
"""


@pytest.fixture(scope="module")
def registered(mlflow_server: str, mnist_parquet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from sd3ray.config import load_config

    out = tmp_path_factory.mktemp("model-run")
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, f"data.parquet_dir={mnist_parquet}", "train.steps=4", "train.eval_every=4", "train.ckpt_every=4",
        "train.log_every=2", f"train.output_dir={out}", f"tracking.registered_model={MODEL}"])
    result = train(cfg, LocalContext(out / "run", torch.device("cpu")), MlflowTracker(mlflow_server, "model-test"))
    return {"uri": mlflow_server, "run_id": result.run_id, "checkpoint": str(result.checkpoint),
            "parquet": str(mnist_parquet)}


def test_a_run_registers_its_model_and_says_which_version(registered: dict[str, str]) -> None:
    client = MlflowClient(registered["uri"])
    tags = client.get_run(registered["run_id"]).data.tags
    version = client.get_model_version(MODEL, tags["sd3ray.registered_model"].rsplit("/", 1)[-1])
    assert tags["sd3ray.registered_model"] == f"models:/{MODEL}/{version.version}"
    assert version.run_id == registered["run_id"] and tags["sd3ray.model_uri"].startswith("models:/m-")


def test_the_model_loads_in_a_fresh_process_and_matches_sample_job(registered: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    model_uri = f"models:/{MODEL}/1"
    proc = subprocess.run([sys.executable, "-c", PREDICT, model_uri, str(tmp_path / "pyfunc.npy")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Add type hints" not in proc.stderr  # predict's DataFrame hint quiets MLflow's warning at load
    assert report == {"dtype": "uint8", "shape": [2, 1, 32, 32], "same_seed_same_images": True,
                      "other_seed_differs": True}

    sample = subprocess.run([sys.executable, str(REPO_ROOT / "jobs/sample.py"), "--checkpoint", model_uri,
                             "--prompt", "7", "--prompt", "three", "--num-samples", "1", "--seed", "1", "--steps",
                             "3", "--output", str(tmp_path / "samples")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "samples/samples.npz")["images"], np.load(tmp_path / "pyfunc.npy"))


def test_mlflow_models_serve_answers_with_images(registered: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    # `mlflow models serve` runs `uvicorn` from PATH: the venv's, even when the venv is not activated
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    server = start_in_own_session([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/1",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, log)
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/ping") == 200, server, log, "mlflow models serve")

        def invoke(seed: int) -> np.ndarray:
            body = json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [["7"], ["three"]]},
                               "params": {"seed": seed, "steps": 3}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                return np.asarray(json.loads(reply.read())["predictions"])

        first, again, other = invoke(1), invoke(1), invoke(2)
    finally:
        stop_process_group(server)
    assert first.shape == (2, 1, 32, 32) and first.min() >= 0 and first.max() <= 255
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_register_after_the_fact_then_promote_the_better_version(registered: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}

    def job(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    made = job("jobs/register.py", "--checkpoint", registered["checkpoint"], "--name", MODEL)
    assert f"registered models:/{MODEL}/2 (step 4" in made.stdout, made.stdout

    judge = ["--guidance", "2", "--steps", "3", "--num-samples", "20", "--no-tracking",
             "--parquet-dir", registered["parquet"], "--promote", "champion"]
    first = job("jobs/evaluate.py", "--checkpoint", f"models:/{MODEL}/2", *judge)
    assert "champion: now sd3ray-test-model version 2" in first.stdout, first.stdout[-2000:]
    job("jobs/evaluate.py", "--checkpoint", f"models:/{MODEL}/1", *judge)

    from sd3ray.tracking.registry import beats

    client = MlflowClient(registered["uri"])
    v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    assert v1.tags["judge/setting"] == v2.tags["judge/setting"] == "guidance 2, 3 euler steps, 20 samples"
    expected = "1" if beats(v1.tags, v2.tags) else "2"
    assert client.get_model_version_by_alias(MODEL, "champion").version == expected

    drawn = job("jobs/sample.py", "--checkpoint", f"models:/{MODEL}@champion", "--prompt", "7", "--num-samples",
                "2", "--steps", "2", "--output", str(tmp_path / "champion"))
    assert (tmp_path / "champion/samples.npz").is_file(), drawn.stdout


def test_promotion_needs_a_registered_version(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(tmp_path), "--promote", "champion"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--promote needs a registered model version" in proc.stderr
