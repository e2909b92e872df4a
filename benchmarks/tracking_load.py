"""Many writers on one MLflow store, as a sweep's concurrent trials make them: each writer process opens its own
run and logs `batches` metric batches as fast as it can. Reports writes/s and failed writes, for the plain MLflow
client (every call straight to the store, as sd3ray logged before) and for sd3ray's tracker (writes through its
outbox, retried in order; the run opened with retries).

    python benchmarks/tracking_load.py --writers 8 --batches 200 --store sqlite:///load.db
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# mlflow-client: the writers race to create their (new) experiment, as parallel runs into a new experiment do;
# mlflow-client-existing: the experiment exists, so only the metric writes contend
MODES = ("mlflow-client", "mlflow-client-existing", "sd3ray-tracker")


def plain_client_writer(store: str, experiment: str, batches: int, start: mp.Event, out: mp.Queue) -> None:
    """Each call goes straight to the store; a failure is counted and the writer goes on."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    errors, kinds = 0, set()
    start.wait()
    began = time.perf_counter()
    try:
        client = MlflowClient(store)
        experiment_id = (client.get_experiment_by_name(experiment) or None)
        experiment_id = experiment_id.experiment_id if experiment_id else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id).info.run_id
    except Exception as exc:
        out.put((batches, 0.0, {type(exc).__name__ + ": " + str(exc).splitlines()[0][:80]}))
        return
    for step in range(batches):
        metrics = [Metric(f"m{i}", float(step), int(time.time() * 1000), step) for i in range(5)]
        try:
            client.log_batch(run_id, metrics=metrics)
        except Exception as exc:
            errors += 1
            kinds.add(type(exc).__name__ + ": " + str(exc).splitlines()[0][:80])
    client.set_terminated(run_id)
    out.put((errors, time.perf_counter() - began, kinds))


def tracker_writer(store: str, experiment: str, batches: int, start: mp.Event, out: mp.Queue) -> None:
    """The same writes through sd3ray's MlflowTracker; a write that never reached the store is a failure."""
    from sd3ray.config import load_config
    from sd3ray.tracking.mlflow_tracker import MlflowTracker

    cfg = load_config(None, [f"train.output_dir={tempfile.mkdtemp(prefix='sd3ray-load-')}"])
    tracker = MlflowTracker(store, experiment, flush_timeout_s=600, retry_s=0.5)
    start.wait()
    began = time.perf_counter()
    try:
        tracker.start(cfg)
    except Exception as exc:
        out.put((batches, 0.0, {type(exc).__name__ + ": " + str(exc).splitlines()[0][:80]}))
        return
    for step in range(batches):
        tracker.log_metrics({f"m{i}": float(step) for i in range(5)}, step)
    outbox = tracker._outbox
    tracker.finish()
    out.put((outbox.dropped + outbox.rejected, time.perf_counter() - began, set()))


def run(mode: str, store: str, writers: int, batches: int) -> dict[str, float | str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)  # the store exists first, as a sweep's driver makes it
    if mode == "mlflow-client-existing":
        client.create_experiment(f"load-{mode}")
    target = tracker_writer if mode == "sd3ray-tracker" else plain_client_writer
    start, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=target, args=(store, f"load-{mode}", batches, start, out)) for _ in range(writers)]
    for proc in procs:
        proc.start()
    time.sleep(5)  # let every writer import mlflow before the clock starts
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - began
    for proc in procs:
        proc.join()
    failed = sum(r[0] for r in results)
    kinds = sorted(set().union(*(r[2] for r in results)))
    total = writers * batches
    return {"mode": mode, "writers": writers, "writes": total, "failed": failed,
            "writes_per_s": (total - failed) / wall, "wall_s": wall, "errors": "; ".join(kinds)[:300]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--batches", type=int, default=200, help="metric batches per writer")
    parser.add_argument("--store", default="", help="tracking URI (default: a fresh SQLite file per row)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    print("| writer | writers | writes | failed | writes/s | wall s | errors |\n|---|---|---|---|---|---|---|")
    for writers in args.writers:
        for mode in args.modes:
            store = args.store or f"sqlite:///{tempfile.mkdtemp(prefix='sd3ray-load-')}/mlflow.db"
            row = run(mode, store, writers, args.batches)
            print(f"| {row['mode']} | {row['writers']} | {row['writes']} | {row['failed']} | "
                  f"{row['writes_per_s']:.0f} | {row['wall_s']:.1f} | {row['errors'] or '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
