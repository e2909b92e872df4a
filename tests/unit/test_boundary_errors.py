"""Errors of the libraries at sd3ray's edges (file decoding, pyarrow, MLflow URIs) become one sd3ray message that
names the file or URI and the fix. Each test plants the fault."""

from pathlib import Path

import pytest

from sd3ray.checkpoint import CheckpointError, verify
from sd3ray.config import ConfigError, load_config
from sd3ray.data.format import read_metadata
from sd3ray.data.image_sets import read_captions
from sd3ray.data.prepare import prepare_dataset
from sd3ray.errors import DataError, StorageError, TrackingError
from sd3ray.inference import download_folder
from sd3ray.storage import open_folder, resolve_tracking_uri
from sd3ray.tracking.replay import read_records, run_folders


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/mlruns"])
def test_an_unknown_tracking_scheme_is_refused_with_the_ones_that_work(uri: str, monkeypatch) -> None:
    with pytest.raises(TrackingError, match=r"tracking.uri .*cannot open a \w+:// store; use http\(s\)://"):
        resolve_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI "):
        resolve_tracking_uri("")


@pytest.mark.parametrize("uri", ["sqlite:///x.db", "http://127.0.0.1:5000", "postgresql+psycopg2://u@h/db", "mlruns"])
def test_the_stores_mlflow_opens_pass(uri: str) -> None:
    assert resolve_tracking_uri(uri).endswith(uri.split("///")[-1])


# ---- planted faults in the files and locations users hand sd3ray: each ends in one sd3ray error naming it

UNREACHABLE_S3 = "s3://bucket/set?endpoint_override=127.0.0.1:1&scheme=http"  # nothing listens on port 1


def test_a_config_that_is_a_folder_or_not_utf8_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder; name a YAML file in it"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train: {steps: 5}  # r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 22"):
        load_config(latin)


def test_a_damaged_checkpoint_manifest_or_a_file_for_a_folder_names_the_checkpoint(tmp_path: Path) -> None:
    step = tmp_path / "step_00000004"
    step.mkdir()
    (step / "MANIFEST.json").write_text('{"model.pt": {"size": 1')  # cut short
    with pytest.raises(CheckpointError, match=r"MANIFEST.json is damaged .*earlier checkpoint"):
        verify(step)
    with pytest.raises(CheckpointError, match="is a file; a checkpoint is a folder"):
        verify(step / "MANIFEST.json")


def test_a_damaged_image_set_names_its_metadata_and_the_rebuild(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text("{'channels': 1}")
    with pytest.raises(DataError, match=r"metadata.json is damaged .*python jobs/prepare_data.py --out"):
        read_metadata(tmp_path)


def test_a_file_given_as_the_image_set_folder_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    stray = tmp_path / "mnist.parquet"
    stray.write_text("not a folder")
    cfg = load_config(None, [f"data.parquet_dir={stray}", f"data.raw_root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError, match="mnist.parquet is a file; it names the folder of an image set"):
        prepare_dataset(cfg)
    assert stray.read_text() == "not a folder"


def test_an_unreachable_object_store_is_one_storage_error_naming_the_uri(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot read the image set at s3://bucket/set\?endpoint_override"):
        read_metadata(UNREACHABLE_S3)
    with pytest.raises(StorageError, match=r"cannot read the checkpoint at s3://bucket/set"):
        download_folder(UNREACHABLE_S3, tmp_path / "copy")
    with pytest.raises(DataError, match="cannot open s4://b/x .*use a local folder or a URI"):
        open_folder("s4://b/x")


def test_a_captions_file_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    captions = tmp_path / "captions.csv"
    captions.write_bytes(b"file,caption\na.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"captions.csv is not UTF-8 text \(byte 22"):
        read_captions(captions)


def test_a_replay_of_a_folder_without_saved_writes_says_which_folder_to_give(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="holds no undelivered.jsonl: give the folder"):
        run_folders(tmp_path)
    run = tmp_path / ("0" * 32)
    run.mkdir()
    (run / "undelivered.jsonl").write_text('{"step": 1, "timestamp": 0, "metrics": {"a": 1}}\n{"step": 2, "tim')
    assert run_folders(tmp_path) == [run]
    assert read_records(run / "undelivered.jsonl") == [{"step": 1, "timestamp": 0, "metrics": {"a": 1}}]  # cut line
