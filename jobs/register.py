"""Log a trained checkpoint as an MLflow model and register it: after the fact, for any checkpoint.

    python jobs/register.py --checkpoint runs/NAME/checkpoints/step_00003000 --name sd3ray-mnist
    python jobs/register.py --checkpoint MLFLOW_RUN_ID --name sd3ray-mnist --alias candidate

A run id logs the model into that run; a checkpoint folder or URI gets a new run (named register-STEP) in its
config's experiment. Prints the new version's URI (models:/NAME/VERSION); training runs do the same themselves
when tracking.registered_model is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import tempfile

from sd3ray.checkpoint import load_checkpoint
from sd3ray.cli import add_tracking_args, job_parser, run_job
from sd3ray.inference import RUN_ID, resolve_checkpoint


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a folder or a URI such as s3://...) or MLflow run id")
    parser.add_argument("--name", required=True, help="registered model name (created if new)")
    parser.add_argument("--alias", help="also point this alias (e.g. candidate) at the new version")
    add_tracking_args(parser, writes=False)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from sd3ray.storage import resolve_tracking_uri
    from sd3ray.tracking.mlflow_tracker import MlflowTracker

    uri = resolve_tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sd3ray-register-") as scratch:
        # a LoRA checkpoint stays its adapter (MBs, with its base's source and hash), as training registers it
        data = load_checkpoint(resolve_checkpoint(args.checkpoint, uri, Path(scratch)), merge=False)
    run_id = args.checkpoint if RUN_ID.match(args.checkpoint) and not Path(args.checkpoint).exists() else None
    tracker = MlflowTracker(uri, data.config.tracking.experiment, flush_timeout_s=data.config.tracking.flush_timeout_s)
    run_id = tracker.start(data.config, run_id, run_name=f"register-step{data.step}",
                           tags={"sd3ray.registered_checkpoint": args.checkpoint})
    tracker.log_model(data.config, data.step, data.ema, args.name)
    tracker.finish("FINISHED")
    client = MlflowClient(uri)
    registered = client.get_run(run_id).data.tags.get("sd3ray.registered_model")
    if registered is None:
        print(f"sd3ray: error: the model was not registered (see the warnings above); run {run_id}", file=sys.stderr)
        return 1
    if args.alias:
        client.set_registered_model_alias(args.name, args.alias, registered.rsplit("/", 1)[-1])
    print(f"registered {registered} (step {data.step}, run {run_id})"
          + (f"; {args.alias} -> this version" if args.alias else ""))
    return 0


if __name__ == "__main__":
    run_job(main)
