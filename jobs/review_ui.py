"""Open a run in MLflow's UI in headless Chromium, as a person would, and say what it shows; save screenshots.

    python jobs/review_ui.py RUN_ID                                   # ./mlflow.db (an `mlflow ui` starts itself)
    python jobs/review_ui.py RUN_ID --tracking-uri http://127.0.0.1:5000 --out runs/ui-review

It opens the experiment at the link sd3ray prints, then the run's Model metrics tab, scrolls to the sample grid
and clicks its slider's far end, taking each screenshot once its page has finished loading; it reports the view
that opened, the sections in order, the first chart, how much of the grid's picture is in view and the grid's steps,
and exits 1 when one of them is not what a person should see first or a page never finished loading. Needs Chromium
(Debian: apt-get install -y chromium; another one with --browser or $SD3RAY_BROWSER).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

from sd3ray.cli import add_tracking_args, job_parser, run_job


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("run_id", help="the MLflow run (its id, as the training run's last lines print it)")
    parser.add_argument("--out", type=Path, default=Path("runs/ui-review"), help="folder for the screenshots")
    parser.add_argument("--browser", default=None, help="Chromium to drive (default: chromium on PATH)")
    add_tracking_args(parser, writes=False)
    args = parser.parse_args()
    if args.browser:
        os.environ["SD3RAY_BROWSER"] = args.browser

    from mlflow.tracking import MlflowClient

    from sd3ray.errors import TrackingError
    from sd3ray.storage import redact, resolve_tracking_uri
    from sd3ray.tracking.ui_review import latest_eval_step, review_run, ui_for

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        experiment_id = MlflowClient(uri).get_run(args.run_id).info.experiment_id
    except Exception as exc:
        raise TrackingError(f"no run {args.run_id} at {redact(uri)} ({str(exc).splitlines()[0]}); pass the run id "
                            f"a training run printed, and its store with --tracking-uri") from exc
    with ui_for(uri) as base:
        review = review_run(base, experiment_id, args.run_id, args.out)
    grid = review.grid_at_open
    print(f"sd3ray: run {args.run_id} at {redact(uri)}: experiment opens in the {review.experiment_view} view; "
          f"sections {', '.join(review.sections)}; first chart {review.first_chart}; grid "
          f"{'shown' if grid.visible else 'not in view'} at open ({grid.shown:.0%} of its picture in view, "
          f"{grid.width}×{grid.height} px), step {review.latest_grid_step} after one click")
    print("sd3ray: screenshots " + " ".join(str(path) for path in review.screenshots))
    problems = review.problems(latest_step=latest_eval_step(uri, args.run_id))
    for problem in problems:
        print(f"sd3ray: problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    run_job(main)
