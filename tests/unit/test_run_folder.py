"""A run folder belongs to one run (sd3ray.training.run_folder): a finished run is never restarted or mixed with
another by reusing its --name, and continuing a folder continues only the run that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd3ray.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from sd3ray.training.local import run_local
from sd3ray.training.run_folder import RUN_RECORD, RunFinished, check_owner, checkpoints_of, claim, finish, read_record


def _checkpoint(root: Path, step: int, run_id: str | None) -> Path:
    """A complete-looking checkpoint folder: its manifest and the meta that names its run."""
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "MANIFEST.json").write_text("{}")
    (folder / "meta.json").write_text(json.dumps({"step": step, **({"run_id": run_id} if run_id else {})}))
    return folder


def test_a_new_folder_is_claimed_and_a_finished_run_is_refused_without_resume(tmp_path: Path) -> None:
    run = claim(str(tmp_path / "a"), "a", resume=False, steps=30, checkpoints_at=str(tmp_path / "a/checkpoints"))
    assert not run.continues and run.record.status == "running"
    assert read_record(str(tmp_path / "a")) == run.record
    finish(str(tmp_path / "a"), run.record, 30)
    with pytest.raises(RunFinished, match=r"finished at step 30.*--resume latest.*another --name"):
        claim(str(tmp_path / "a"), "a", resume=False, steps=30, checkpoints_at=str(tmp_path / "a/checkpoints"))
    with pytest.raises(RunFinished, match="--steps above 30"):
        claim(str(tmp_path / "a"), "a", resume=True, steps=30, checkpoints_at=str(tmp_path / "a/checkpoints"))
    extended = claim(str(tmp_path / "a"), "a", resume=True, steps=50, checkpoints_at=str(tmp_path / "a/checkpoints"))
    assert extended.continues and extended.record.run_id == run.record.run_id
    assert read_record(str(tmp_path / "a")).status == "running"


def test_an_interrupted_run_continues_and_an_old_folder_is_adopted(tmp_path: Path) -> None:
    first = claim(str(tmp_path / "a"), "a", resume=False, steps=30, checkpoints_at=str(tmp_path / "a/ck"))
    again = claim(str(tmp_path / "a"), "a", resume=False, steps=30, checkpoints_at=str(tmp_path / "a/ck"))
    assert again.continues and again.record.run_id == first.record.run_id
    _checkpoint(tmp_path / "b/ck", 20, run_id=None)  # written before run records existed
    adopted = claim(str(tmp_path / "b"), "b", resume=False, steps=30, checkpoints_at=str(tmp_path / "b/ck"))
    assert adopted.continues and "step 20" in adopted.line
    with pytest.raises(CheckpointError, match="no checkpoint.*without --resume"):
        claim(str(tmp_path / "c"), "c", resume=True, steps=30, checkpoints_at=str(tmp_path / "c/ck"))


def test_continuing_takes_only_the_checkpoints_of_the_folders_run(tmp_path: Path) -> None:
    mine, other = _checkpoint(tmp_path, 10, "run-a"), _checkpoint(tmp_path, 30, "run-b")
    assert checkpoints_of(tmp_path, "run-a") == [mine]
    assert list_checkpoints(tmp_path)[-1] == other  # the newest step overall is the other run's
    check_owner(mine, "run-a", "runs/a")
    with pytest.raises(CheckpointError, match="another run"):
        check_owner(other, "run-a", "runs/a")


def test_a_damaged_record_is_one_message(tmp_path: Path) -> None:
    (tmp_path / RUN_RECORD).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{RUN_RECORD} is damaged.*another --name"):
        read_record(str(tmp_path))


def test_local_mode_refuses_to_restart_a_finished_run_and_extends_it_on_resume(micro_config) -> None:
    """The reported fault: the same --name again started from step 0 beside the finished run's checkpoints."""
    cfg = micro_config("train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.eval_every=100")
    first = run_local(cfg, "same", "same", tracking=False)
    run_dir = Path(cfg.train.output_dir) / "same"
    written = list_checkpoints(run_dir / "checkpoints")
    with pytest.raises(RunFinished, match="--resume latest"):
        run_local(cfg, "same", "same", tracking=False)
    assert list_checkpoints(run_dir / "checkpoints") == written  # nothing written by the refused run
    longer = micro_config("train.steps=6", "train.ckpt_every=2", "train.log_every=2", "train.eval_every=100")
    extended = run_local(longer, "same", "same", resume="latest", tracking=False)
    assert extended.step == 6
    record = read_record(str(run_dir))
    assert record.status == "finished" and record.step == 6
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        assert load_checkpoint(checkpoint).meta["run_id"] == record.run_id
    assert Path(first.checkpoint).parent == Path(extended.checkpoint).parent
