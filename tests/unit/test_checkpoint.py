import json
from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import (
    CheckpointData,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sd3ray.config import load_config


def _data(step: int, cfg=None) -> CheckpointData:
    cfg = cfg or load_config("configs/mnist_tiny.yaml")
    weights = {"w": torch.full((3,), float(step))}
    rng = {"torch": torch.get_rng_state()}
    meta = {"mlflow_run_id": "abc"}
    return CheckpointData(step, cfg, weights, weights, {"state": {}}, {"last_epoch": step}, rng, meta)


def test_save_load_round_trip_and_keep_last_k(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, _data(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path), expected=load_config("configs/mnist_tiny.yaml"),
                             weights_only_ok=False)
    assert loaded.step == 40 and torch.equal(loaded.model["w"], torch.full((3,), 40.0))
    assert loaded.meta["mlflow_run_id"] == "abc" and loaded.scheduler == {"last_epoch": 40}


def test_a_crash_mid_write_leaves_nothing_resume_would_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _data(10))
    real_save, calls = torch.save, []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # model.pt written, optimizer.pt not
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _data(20))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]  # no step_20, no temp dir left behind
    assert latest_checkpoint(tmp_path).name == "step_00000010"


def test_partial_directory_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _data(10))
    (path / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _data(10))
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt is missing or does not match its checksum"):
        load_checkpoint(path)


def test_different_model_config_names_the_mismatched_keys(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _data(10))
    other = load_config("configs/mnist_tiny.yaml", ["model.depth=6", "train.lr=0.5"])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected=other)
    assert "model.depth: checkpoint has 4, config has 6" in str(err.value)
    assert "train.lr" not in str(err.value)  # training settings may change on resume


def test_a_checkpoint_from_a_newer_sd3ray_says_so_and_names_the_key_it_does_not_know(tmp_path: Path) -> None:
    import hashlib

    import yaml

    path = save_checkpoint(tmp_path, _data(10))
    saved = yaml.safe_load((path / "config.yaml").read_text())
    saved["train"]["a_later_option"] = 1  # what a newer sd3ray's config would hold, with an intact manifest
    (path / "config.yaml").write_text(yaml.safe_dump(saved))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    data = (path / "config.yaml").read_bytes()
    manifest["config.yaml"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    for weights_only_ok in (True, False):  # sampling and evaluation, resume
        with pytest.raises(CheckpointError, match=r"written by a newer sd3ray: its config has train.a_later_option, "
                                                  r"which this version does not know\. Update sd3ray"):
            load_checkpoint(path, weights_only_ok=weights_only_ok)


def test_meta_records_step_and_config_hash(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _data(7))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and len(meta["config_hash"]) == 12 and meta["weights_only"] is False


class RunsCode:
    """What a crafted pickle holds: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _plant(checkpoint: Path, name: str, payload: object) -> None:
    """Replace one file with `payload` and rewrite the manifest to match, as whoever wrote both could."""
    import hashlib

    torch.save(payload, checkpoint / name)
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    data = (checkpoint / name).read_bytes()
    manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rng.pt"])
def test_a_planted_pickle_is_refused_by_resume_sampling_and_evaluation_and_runs_nothing(
        name: str, tmp_path: Path, micro_config) -> None:
    from sd3ray.inference import load_ema_model
    from sd3ray.tracking.protocol import NullTracker
    from sd3ray.training.context import LocalContext
    from sd3ray.training.loop import train

    cfg = micro_config("train.steps=2", "train.ckpt_every=2", "train.log_every=2", "train.eval_every=100")
    checkpoint = Path(train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), NullTracker()).checkpoint)
    marker = tmp_path / "pwned"
    _plant(checkpoint, name, {"optimizer": RunsCode(marker), "scheduler": {}, "model": RunsCode(marker)})
    with pytest.raises(CheckpointError, match=f"{name} holds something other than tensors"):
        train(micro_config("train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.eval_every=100"),
              LocalContext(tmp_path / "run", torch.device("cpu"), checkpoint), NullTracker())
    if name == "model.pt":  # sampling and evaluation read the weights alone
        with pytest.raises(CheckpointError, match="holds something other than tensors"):
            load_ema_model(str(checkpoint), torch.device("cpu"))
    else:
        load_ema_model(str(checkpoint), torch.device("cpu"))  # never opens the training state
    assert not marker.exists()
