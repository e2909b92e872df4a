"""`jobs/train.py` as a user runs it, given a tracking store that is not what its URI claims or an image set the model
cannot take: one line on stderr naming the problem and the fix, exit code 1, no traceback, and nothing built first
(no model, no data loading, no Ray: the Ray runs point RAY_ADDRESS at a dead address, so a job that reached Ray would
end in another message)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.data.image_sets import write_coloured_shapes
from tests.support import MICRO, REPO_ROOT

FITS_COLOUR16 = ["model.channels=3", "model.image_size=16"]
BUILT = ("MM-DiT", "the train split", "Ray Train run")  # what a job prints once it loads data, builds, or starts Ray


@pytest.fixture(scope="module")
def colour16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3×16×16 colour set made by the project's own writer (jobs/prepare_data.py --source shapes writes the
    same)."""
    return Path(write_coloured_shapes(tmp_path_factory.mktemp("colour") / "set", 32, image_size=16, num_test=16))


def train_job(colour16: Path, tmp_path: Path, *extra: str, local: bool = True, env: dict[str, str] | None = None,
              sets: list[str] = FITS_COLOUR16) -> str:
    """Run jobs/train.py on configs/mnist_tiny.yaml and the colour set; return the one error line it ended with."""
    overrides = [*MICRO, *sets, f"train.output_dir={tmp_path / 'runs'}"]
    args = [str(REPO_ROOT / "jobs/train.py"), *(["--local"] if local else ["--cpu"]), "--config",
            str(REPO_ROOT / "configs/mnist_tiny.yaml"), "--parquet-dir", str(colour16), "--steps", "1",
            *[a for s in overrides for a in ("--set", s)], *extra]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"RAY_ADDRESS": "127.0.0.1:1", **(env or {})})
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, f"{proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not any(line in proc.stdout + proc.stderr for line in BUILT), proc.stdout[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert sum(line.startswith("sd3ray: error: ") for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1].removeprefix("sd3ray: error: ")  # the last line: nothing follows it


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_a_colour_set_given_to_the_grey_model_is_refused_before_anything_is_built(colour16: Path, tmp_path: Path,
                                                                                  local: bool) -> None:
    message = train_job(colour16, tmp_path, "--no-tracking", local=local, sets=[])
    assert message == (
        f"the image set at {colour16} holds 3×16×16 images but the model takes 1×32×32 (model.channels=1, "
        f"model.image_size=32). Train on this set with --set model.channels=3 --set model.image_size=16 (or a config "
        f"made for it), or give --parquet-dir a set of 1×32×32 images (a folder that holds no set yet is built at "
        f"that size on first use)")


def test_a_text_file_given_as_sqlite_is_one_message(colour16: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("a file of text\n")
    message = train_job(colour16, tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{junk}"})
    assert message == (f"MLFLOW_TRACKING_URI sqlite:///{junk}: {junk} is not a SQLite database (it does not start "
                       f"with SQLite's header); name a new file (MLflow creates it) or the mlflow.db of an earlier "
                       f"run, or move this file away")


def test_a_folder_given_as_sqlite_is_one_message(colour16: Path, tmp_path: Path) -> None:
    folder = tmp_path / "somedir"
    folder.mkdir()
    message = train_job(colour16, tmp_path, "--tracking-uri", f"sqlite:///{folder}")
    assert message == (f"tracking.uri sqlite:///{folder} names the folder {folder}, not a SQLite file; name a file "
                       f"in it, e.g. sqlite:///{folder}/mlflow.db")


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_a_postgresql_server_that_refuses_is_one_message(colour16: Path, tmp_path: Path, local: bool) -> None:
    message = train_job(colour16, tmp_path, local=local,
                        env={"MLFLOW_TRACKING_URI": "postgresql://u:secret@127.0.0.2:1/db"})
    assert message == (
        "MLflow tracking store postgresql://u:***@127.0.0.2:1/db is unreachable: nothing accepts connections at "
        "127.0.0.2:1 (Connection refused). Start the database or correct the host and port in the URI "
        "(postgresql's default port is 5432), or log to a local file: --tracking-uri sqlite:///mlflow.db")
