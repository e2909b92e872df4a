"""What a person reads of a run in MLflow, away from the machine and the checkout that made it.

One short run is logged to a real `mlflow server` by sd3ray imported from a copy of the checkout; the copy is then
deleted, the server stopped, its store copied to another folder and served from there. From that copy: the run's
dataset, tags and model read right, the model loads in a fresh process from its own code, and headless Chromium
(Debian's `chromium`) opens the run where the printed link says, on the loss and the grids, with the grid's picture in
view once each page has finished loading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.support import MICRO, REPO_ROOT, free_port, start_mlflow_server, stop_process_group

LOG_RUN = """
import sys, torch
import sd3ray
assert sd3ray.__file__.startswith(sys.argv[1]), sd3ray.__file__  # the copy of the checkout, not the repository
from sd3ray.config import load_config
from sd3ray.tracking.mlflow_tracker import MlflowTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
cfg = load_config(sys.argv[2], sys.argv[5:])
result = train(cfg, LocalContext(sys.argv[3], torch.device("cpu")), MlflowTracker(sys.argv[4], "review"))
print(result.run_id)
"""
LOAD_MODEL = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = model.predict(pd.DataFrame({"prompt": ["7"]}), params={"seed": 1, "steps": 2})
import sd3ray
print(json.dumps({"shape": list(images.shape), "sd3ray": sd3ray.__file__}))
"""
STEPS, EVAL_EVERY = 6, 3


@pytest.fixture(scope="module")
def copied_store(mnist_parquet: Path, judge_reference, tmp_path_factory: pytest.TempPathFactory):
    """The run, served from a copy of its store; the checkout copy that logged it is gone."""
    root = tmp_path_factory.mktemp("review")
    checkout = root / "checkout"
    shutil.copytree(REPO_ROOT / "sd3ray", checkout / "sd3ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "configs", checkout / "configs")
    (root / "store").mkdir()
    first_port = free_port()
    server = start_mlflow_server(root / "store", first_port)
    try:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        overrides = [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.steps={STEPS}",
                     f"train.eval_every={EVAL_EVERY}", f"train.ckpt_every={STEPS}", f"train.log_every={EVAL_EVERY}",
                     "eval.num_samples=20", "tracking.run_name=moved", f"train.output_dir={root / 'runs'}"]
        config = checkout / "configs/mnist_tiny.yaml"
        logged = subprocess.run([sys.executable, "-c", LOG_RUN, str(checkout), str(config), str(root / "runs/moved"),
                                 f"http://127.0.0.1:{first_port}", *overrides], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert logged.returncode == 0, logged.stderr[-3000:]
        run_id = logged.stdout.strip().splitlines()[-1]
    finally:
        stop_process_group(server)
    shutil.rmtree(checkout)
    shutil.copytree(root / "store", root / "copy")
    port = free_port()
    server = start_mlflow_server(root / "copy", port)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "run_id": run_id, "root": root, "checkout": str(checkout)}
    finally:
        stop_process_group(server)


def test_the_run_names_its_dataset_model_and_checkpoint_for_any_reader(copied_store: dict, mnist_parquet: Path,
                                                                       tmp_path: Path) -> None:
    client = MlflowClient(copied_store["uri"])
    run = client.get_run(copied_store["run_id"])
    (dataset_input,) = run.inputs.dataset_inputs  # the Dataset column and its filter in the runs table
    dataset = dataset_input.dataset
    assert dataset.name == "mnist" and len(dataset.digest) == 16
    assert json.loads(dataset.source)["uri"] == str(mnist_parquet.resolve())
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "train"
    assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["image", "label", "caption"]
    checkpoint = Path(run.data.tags["sd3ray.checkpoint_uri"])
    assert checkpoint.is_absolute() and (checkpoint / "MANIFEST.json").is_file()
    # the params are the few config keys people compare and the global batch; the judge's constants are tags (the
    # image card prints every param above the grid), neither is a flat chart; the whole config is config.yaml
    from sd3ray.evaluation.judge import CONSTANT_METRICS
    from sd3ray.tracking.mlflow_tracker import COMPARED_PARAMS

    assert set(run.data.params) == {*COMPARED_PARAMS, "global_batch"}
    assert run.data.params["global_batch"] == "16" and run.data.params["model.width"] == "32"
    assert set(CONSTANT_METRICS) <= set(run.data.tags)
    assert len(run.data.tags["val/cfid_floor"].replace(".", "")) <= 6  # 6 digits, not 17
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert (config["train"]["steps"], config["data"]["parquet_dir"]) == (STEPS, str(mnist_parquet))
    assert not {"train/global_batch", "val/cfid_floor", "val/diversity_real"} & set(run.data.metrics)
    model = client.get_logged_model(run.data.tags["sd3ray.model_uri"].removeprefix("models:/"))
    assert model.name == "sd3ray-moved"  # after its run, not MLflow's default "model"


def test_the_model_loads_from_its_own_code_after_the_checkout_that_logged_it_is_gone(copied_store: dict,
                                                                                      tmp_path: Path) -> None:
    import mlflow

    client = MlflowClient(copied_store["uri"])
    model_uri = client.get_run(copied_store["run_id"]).data.tags["sd3ray.model_uri"]
    mlflow.set_tracking_uri(copied_store["uri"])
    location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    text = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel",
                                                    dst_path=str(tmp_path))).read_text()
    # nothing of the machine that logged it: not the checkout, not the temporary folder the weights came from
    assert copied_store["checkout"] not in text and "sd3ray-model-" not in text
    assert "model_code_path: pyfunc_entry.py" in text
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", LOAD_MODEL, model_uri], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**env, "MLFLOW_TRACKING_URI": copied_store["uri"]})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 1, 32, 32]
    # MLflow put the model's own copy of sd3ray first on the path: neither the deleted checkout nor this repository
    assert not report["sd3ray"].startswith((copied_store["checkout"], str(REPO_ROOT)))


def log_crowded_run(uri: str, experiment_id: str) -> str:
    """A run as sd3ray logged them before: every config value (~70) a param, beside a loss and a grid at step 0 and
    at the last step."""
    from mlflow.entities import Metric, Param

    from sd3ray.config import flatten, load_config

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name="crowded").info.run_id
    params = [Param(k, str(v)) for k, v in flatten(load_config(REPO_ROOT / "configs/mnist_tiny.yaml")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_batch(run_id, metrics=[Metric(key, 1.0 / step, 0, step) for step in (EVAL_EVERY, STEPS)
                                      for key in ("loss/train", "samples/accuracy")])
    grid = np.random.default_rng(0).integers(0, 256, (274, 274, 3), dtype=np.uint8)  # 8×8 digits of 32 px
    for step in (0, STEPS):
        client.log_image(run_id, grid, key="samples/grid", step=step)
    client.set_terminated(run_id)
    return run_id


def test_the_printed_link_opens_the_training_view_on_the_loss_then_the_grids(copied_store: dict,
                                                                              tmp_path: Path) -> None:
    from sd3ray.tracking.browser import Browser
    from sd3ray.tracking.mlflow_tracker import ui_url
    from sd3ray.tracking.ui_review import LOADING_JS, review_run

    uri, run_id = copied_store["uri"], copied_store["run_id"]
    # README's command: it exits 1 on any problem (a page still loading, the GenAI view, another first chart, a grid
    # not in view, not the latest)
    job = subprocess.run([sys.executable, str(REPO_ROOT / "jobs/review_ui.py"), run_id, "--tracking-uri", uri,
                          "--out", str(tmp_path / "shots")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr[-3000:]
    assert ("experiment opens in the training view; sections loss, samples, train, val, Model metrics; first chart "
            "loss/train; grid shown at open (") in job.stdout and f"step {STEPS} after one click" in job.stdout
    shots = job.stdout.split("sd3ray: screenshots ")[1].split()
    assert len(shots) == 4 and all(Path(s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for s in shots)
    # the check can fail: MLflow's own link, without the training view, opens the GenAI one; and a run with every
    # config value a param has its grid pushed out of the card's view by MLflow's list of the run's params
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    crowded = review_run(uri, experiment_id, log_crowded_run(uri, experiment_id), tmp_path / "crowded",
                         experiment_link=ui_url(uri, experiment_id).split("?")[0])
    problems = " ".join(crowded.problems())
    assert crowded.experiment_view == "genai" and "genai view" in problems
    assert crowded.grid_at_open.state == "image" and crowded.grid_at_open.shown < 0.1, crowded.grid_at_open
    assert "the sample grid's card shows no picture when the page opens" in problems
    # and a page is not taken for loaded the moment it opens
    with Browser() as page:
        page.open(ui_url(uri, experiment_id))
        assert page.settle(LOADING_JS, timeout_s=0)
