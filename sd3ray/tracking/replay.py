"""Sending what a tracking server never took, later: the writes a run saved in
`train.output_dir/mlflow-undelivered/RUN_ID/undelivered.jsonl` go to that run, in the order they were made.

Exactly once: `undelivered.sent` beside the file counts the records that reached the server, rewritten atomically
after each one, so a replay that stops half-way (the server went down again) resumes after the last record sent,
and a replay of a folder already sent sends nothing. The one record that may be in flight when a replay is killed
is sent again; MLflow keeps a metric row with the same key, step, timestamp and value once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd3ray.errors import TrackingError
from sd3ray.storage import redact
from sd3ray.tracking.mlflow_tracker import UNDELIVERED_FILE, check_reachable, limit_client_retries

SENT_FILE = "undelivered.sent"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Replayed:
    run_id: str
    sent: int  # records sent by this replay
    skipped: list[str]  # what cannot be sent after the fact, and what to do instead
    total: int  # records in the file


def run_folders(folder: Path) -> list[Path]:
    """`folder` itself when it holds saved writes, else its RUN_ID subfolders that do (a whole mlflow-undelivered/)."""
    if (folder / UNDELIVERED_FILE).is_file():
        return [folder]
    runs = sorted(p for p in folder.glob("*") if (p / UNDELIVERED_FILE).is_file()) if folder.is_dir() else []
    if not runs:
        raise TrackingError(f"{folder} holds no {UNDELIVERED_FILE}: give the folder a run named when the tracking "
                            f"server did not take its writes (train.output_dir/mlflow-undelivered/RUN_ID)")
    return runs


def read_records(path: Path) -> list[dict[str, Any]]:
    records, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # a line cut short by a crash while saving: everything before it is whole
            raise TrackingError(f"{path}:{number} is not a saved write ({exc.msg}); the file is damaged") from None
    return records


def _sent(folder: Path) -> int:
    try:
        return int((folder / SENT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _mark_sent(folder: Path, count: int) -> None:
    partial = folder / f"{SENT_FILE}.partial"
    partial.write_text(str(count))
    os.replace(partial, folder / SENT_FILE)


def sender(client: Any, run_id: str, folder: Path) -> Callable[[dict[str, Any]], str | None]:
    """A function that sends one saved record to the run and returns None, or returns why it cannot be sent."""
    from mlflow.entities import Metric, Param

    def send(record: dict[str, Any]) -> str | None:
        if "metrics" in record:
            step = record["step"] if "step" in record else record["system_step"]
            client.log_batch(run_id, metrics=[Metric(k, float(v), record["timestamp"], step)
                                              for k, v in record["metrics"].items()])
        elif "image" in record:
            if "image_file" not in record:
                return f"image {record['image']} of step {record['step']} (saved without its pixels)"
            image = np.load(folder / record["image_file"], allow_pickle=False)
            client.log_image(run_id, image, key=record["image"], step=record["step"])
        elif "artifact" in record:
            copy = Path(record["artifact"])
            if not copy.exists():
                return f"artifact {copy.name} (its saved copy {copy} is gone)"
            log = client.log_artifacts if copy.is_dir() else client.log_artifact
            log(run_id, str(copy), record.get("artifact_path"))
        elif "params" in record:
            client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
        elif "tags" in record:
            for key, value in record["tags"].items():
                client.set_tag(run_id, key, value)
        elif "status" in record:
            client.set_terminated(run_id, record["status"])
        elif "model_of_step" in record:
            return (f"the pyfunc model of step {record['model_of_step']}: log it from the run's checkpoint with "
                    f"python jobs/register.py --checkpoint CHECKPOINT --name NAME")
        else:
            return f"{record.get('what', 'a write')} (sd3ray saved no payload for it)"
        return None

    return send


def replay(folder: Path, uri: str, say: Callable[[str], None] = print) -> Replayed:
    """Send the writes saved in `folder` (a RUN_ID folder) to that run at `uri`, resuming after the last one sent."""
    from mlflow.tracking import MlflowClient

    run_id = folder.name
    if not RUN_ID.match(run_id):
        raise TrackingError(f"{folder}: the folder's name must be the run id the writes belong to")
    check_reachable(uri)
    limit_client_retries(uri)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"run {run_id} is not at {redact(uri)} ({str(exc).splitlines()[0]}); point "
                            f"--tracking-uri (or MLFLOW_TRACKING_URI) at the server the run was logged to") from None
    records, done = read_records(folder / UNDELIVERED_FILE), _sent(folder)
    send, skipped = sender(client, run_id, folder), []
    for index in range(done, len(records)):
        try:
            why_not = send(records[index])
        except Exception as exc:
            raise TrackingError(f"{redact(uri)} did not take write {index + 1} of {len(records)} of run {run_id} "
                                f"({str(exc).splitlines()[0]}); {index - done} sent now, {index} in all. Run the "
                                f"same command again when the server answers: it goes on from there") from None
        if why_not:
            skipped.append(why_not)
            say(f"sd3ray: skipped {why_not}")
        _mark_sent(folder, index + 1)
    return Replayed(run_id, len(records) - done, skipped, len(records))
