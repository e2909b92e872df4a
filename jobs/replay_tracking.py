"""Send the tracking writes a run saved when its MLflow server did not take them, to the run they belong to.

    python jobs/replay_tracking.py runs/mlflow-undelivered/RUN_ID
    python jobs/replay_tracking.py runs/mlflow-undelivered            # every run saved there

Each write is sent once: running it again sends only what is left (nothing, once all went through). The tracking
URI is --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db: the server the run was logged to.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

from sd3ray.cli import add_tracking_args, job_parser, run_job


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("folder", type=Path, help="a run's mlflow-undelivered/RUN_ID folder, or mlflow-undelivered/")
    add_tracking_args(parser, writes=False)
    args = parser.parse_args()

    from sd3ray.storage import redact, resolve_tracking_uri
    from sd3ray.tracking.replay import replay, run_folders

    uri = resolve_tracking_uri(args.tracking_uri)
    for folder in run_folders(args.folder):
        done = replay(folder, uri)
        left = f", {len(done.skipped)} skipped (above)" if done.skipped else ""
        sent = f"sent {done.sent} saved write(s)" if done.sent else "nothing left to send"
        print(f"sd3ray: run {done.run_id} at {redact(uri)}: {sent} ({done.total} in all{left})")
    return 0


if __name__ == "__main__":
    run_job(main)
