"""How much of the sample grid MLflow's image card shows as the page opens, for each set of params a run might carry.
MLflow prints every param of a run above the picture, inside a scroll area shorter than the picture's box, so each
line of params pushes part of the grid out of view; tags are not printed. Uses the installed MLflow and Chromium.

    python -m benchmarks.grid_in_card            # docs/tracking.md's table, for the installed MLflow

Each setup is one run in a throwaway store: its params (and tags), a loss and a random 274×274 grid (8×8 digits of
32 px) at steps 0 and 6, reviewed at 1600×1000 by `review_run`, as `jobs/review_ui.py` does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIG = {"model.width": "32", "flow.scheme": "logit_normal", "train.lr": "0.003", "sample.guidance": "2.0"}
CONSTANTS = {"val/cfid_floor": "112.011", "val/cfid_floor_std": "4.76545", "val/diversity_real": "16.3837"}
SETUPS: dict[str, tuple[dict[str, str], dict[str, str]]] = {  # name: (params, tags)
    "4 config keys + global_batch + 3 constants": ({**CONFIG, "global_batch": "16", **CONSTANTS}, {}),
    "4 config keys + global_batch, constants as tags": ({**CONFIG, "global_batch": "16"}, CONSTANTS),
    "none": ({}, {}),
}


def log_run(client, experiment_id: str, params: dict[str, str], tags: dict[str, str]) -> str:
    from mlflow.entities import Metric, Param

    run_id = client.create_run(experiment_id, run_name="moved", tags=tags).info.run_id
    if params:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_batch(run_id, metrics=[Metric("loss/train", 1.0 / step, 0, step) for step in (3, 6)])
    grid = np.random.default_rng(0).integers(0, 256, (274, 274, 3), dtype=np.uint8)
    for step in (0, 6):
        client.log_image(run_id, grid, key="samples/grid", step=step)
    client.set_terminated(run_id)
    return run_id


def main() -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.ui_review import review_run, ui_for

    root = Path(tempfile.mkdtemp(prefix="grid-in-card-"))
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("grid-in-card", artifact_location=str(root / "artifacts"))
    runs = {name: log_run(client, experiment_id, *setup) for name, setup in SETUPS.items()}
    print(f"python -m benchmarks.grid_in_card | MLflow {mlflow.__version__}, Chromium at 1600×1000")
    print("| params | grid in view at open |\n|---|---|")
    with ui_for(uri) as base:
        for name, run_id in runs.items():
            review = review_run(base, experiment_id, run_id, root / run_id)
            print(f"| {name} | {review.grid_at_open.shown:.0%} |", flush=True)
    print(f"screenshots under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
