"""A run folder belongs to one run.

`run.json` at the folder's root names the run that owns it (a random run id, written when the run starts) and
whether it finished. Every checkpoint records the same id in its `meta.json`, so whatever continues a folder
continues the run that wrote it, never the newest step of another one:

- a folder with no run: a new run claims it;
- a run that was interrupted (a signal, a crash, a lost node): running the same command again continues it;
- a run that finished: the same `--name` again is refused, naming `--resume latest` (to extend it with more
  steps) and another `--name`; `--resume latest` extends it.

The folder is a local path or a URI (Ray storage on S3): the record goes through `sd3ray.storage`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs

from sd3ray.checkpoint import MANIFEST, STEP_PREFIX, CheckpointError, list_checkpoints
from sd3ray.errors import Sd3rayError
from sd3ray.storage import is_uri, location_errors, open_folder, read_json, redact

RUN_RECORD = "run.json"
Status = Literal["running", "finished"]


class RunFinished(Sd3rayError):
    """The run folder holds a run that finished; continuing it needs `--resume latest`."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: Status
    step: int = 0  # where a finished run ended
    started: str = ""  # when the run first claimed the folder (UTC, ISO 8601)


@dataclass(frozen=True)
class Claim:
    """What a command does with its run folder."""

    record: RunRecord
    continues: bool  # the folder's run goes on (interrupted, or extended with --resume latest)
    line: str  # the console line that says so; "" for a new run


def _record_path(location: str) -> tuple[pafs.FileSystem, str]:
    fs, path = open_folder(location)
    return fs, f"{path}/{RUN_RECORD}"


def read_record(location: str) -> RunRecord | None:
    """The run that owns `location`, or None where no run has claimed it yet."""
    with location_errors(location, "read the run record in"):
        fs, path = _record_path(location)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            raw = f.read().decode("utf-8", errors="replace")
    try:
        fields = json.loads(raw)
        return RunRecord(**{k: fields[k] for k in ("run_id", "name", "status", "step", "started") if k in fields})
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"run record {redact(location)}/{RUN_RECORD} is damaged ({exc}); delete it to let the "
                              f"next run claim the folder, or give this run another --name") from None


def write_record(location: str, record: RunRecord) -> None:
    """Replace the record whole: a local file is renamed into place, an object store's put is atomic."""
    body = json.dumps(asdict(record), indent=2).encode()
    with location_errors(location, "write the run record in"):
        fs, path = _record_path(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if is_uri(location):
            with fs.open_output_stream(path) as f:
                f.write(body)
            return
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(body)
        tmp.replace(path)


def claim(location: str, name: str, resume: bool, steps: int, checkpoints_at: str, from_path: bool = False) -> Claim:
    """Decide, before anything trains, what this command does with the run folder at `location`.

    `resume`: the user asked to resume (continue or extend the folder's run). `steps`: the command's
    `train.steps`. `checkpoints_at`: the folder the run's `step_XXXXXXXX` checkpoints go to. A folder with
    checkpoints but no record was written before run records existed, and is taken as one interrupted run.
    `from_path`: the resume names a checkpoint folder itself (`--resume PATH`), which its loader checks.
    """
    record = read_record(location)
    legacy_step = newest_step(checkpoints_at) if record is None else None
    if record is None and legacy_step is None and resume and not from_path:
        raise CheckpointError(f"--resume latest: run '{name}' has no checkpoint in {redact(location)}; run the "
                              f"command without --resume to start it")
    if record is None:
        record = RunRecord(uuid.uuid4().hex, name, "running", 0, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_record(location, record)
        if legacy_step is None:
            return Claim(record, continues=False, line="")
        return Claim(record, True, f"continuing run '{name}' from its checkpoint at step {legacy_step}")
    if record.status == "finished":
        if not resume:
            raise RunFinished(
                f"run '{name}' in {redact(location)} finished at step {record.step}: run it with --resume latest "
                f"(and --steps above {record.step}) to extend it, or give a new run another --name")
        if steps <= record.step:
            raise RunFinished(f"run '{name}' already finished at step {record.step}, and train.steps is {steps}: "
                              f"give --steps above {record.step} to extend it")
        write_record(location, replace(record, status="running"))
        return Claim(record, True, f"extending run '{name}' from step {record.step} to {steps}")
    return Claim(record, True, f"continuing run '{name}', which stopped before it finished")


def newest_step(location: str) -> int | None:
    """The newest complete checkpoint's step (a `step_XXXXXXXX` folder holding its manifest) directly under
    `location`, a local folder or a URI; None where there is none."""
    with location_errors(location, "list the checkpoints in"):
        fs, path = open_folder(location)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return None
        steps = [int(info.base_name[len(STEP_PREFIX):]) for info in fs.get_file_info(pafs.FileSelector(path))
                 if info.type == pafs.FileType.Directory and info.base_name.startswith(STEP_PREFIX)
                 and info.base_name[len(STEP_PREFIX):].isdigit()
                 and fs.get_file_info(f"{info.path}/{MANIFEST}").type == pafs.FileType.File]
    return max(steps, default=None)


def finish(location: str, record: RunRecord, step: int) -> None:
    """The run ended by itself (its steps or its time budget): a rerun of its command is then refused."""
    write_record(location, replace(record, status="finished", step=step))


def checkpoints_of(root: Path, run_id: str) -> list[Path]:
    """Complete checkpoints under `root` written by run `run_id` (or by a run before run ids were recorded),
    oldest first; any other run's are left alone."""
    mine = []
    for checkpoint in list_checkpoints(root):
        try:
            owner = json.loads((checkpoint / "meta.json").read_text()).get("run_id", run_id)
        except (OSError, ValueError):
            continue  # verify() names what is wrong if this one is ever asked for
        if owner == run_id:
            mine.append(checkpoint)
    return mine


def check_owner(checkpoint: Path, run_id: str, location: str) -> None:
    """A checkpoint handed back to continue run `run_id` (Ray Train restores the newest one it knows under the
    run's name) must be that run's own."""
    owner = read_json(checkpoint / "meta.json", "checkpoint metadata", "delete it", CheckpointError).get("run_id")
    if run_id and owner and owner != run_id:
        raise CheckpointError(f"{redact(location)} holds checkpoints of another run ({owner}, not {run_id}); give "
                              f"this run another --name, or move that run's checkpoints away")
