"""The jobs as a user runs them: real processes, real files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import MICRO, REPO_ROOT


def _run(*args: str, cwd: Path = REPO_ROOT, check: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_parquet: Path) -> Path:
    """A micro run trained by `jobs/train.py --local`, then continued with `--resume latest`."""
    out = tmp_path_factory.mktemp("cli")
    sets = [a for s in [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={out / 'runs'}",
                        "train.log_every=2", "train.ckpt_every=2", "train.eval_every=2"] for a in ("--set", s)]
    base = [str(REPO_ROOT / "jobs/train.py"), "--local", "--config", str(REPO_ROOT / "configs/mnist_tiny.yaml"),
            "--no-tracking", "--name", "cli", *sets]
    first = _run(*base, "--steps", "2", cwd=out)
    assert "step 2/2" in first.stdout and "done at step 2" in first.stdout
    second = _run(*base, "--steps", "4", "--resume", "latest", cwd=out)
    assert "resumed from" in second.stdout and "step 4/4" in second.stdout and "step 2/4" not in second.stdout
    return out / "runs/cli/checkpoints/step_00000004"


def test_sample_job_writes_files_and_is_deterministic(trained: Path, tmp_path: Path) -> None:
    args = [str(REPO_ROOT / "jobs/sample.py"), "--checkpoint", str(trained), "--prompt", "7", "--prompt", "three",
            "--num-samples", "3", "--steps", "3", "--guidance", "2", "--sampler", "heun"]
    _run(*args, "--seed", "1", "--output", str(tmp_path / "a"))
    _run(*args, "--seed", "1", "--output", str(tmp_path / "b"))
    _run(*args, "--seed", "2", "--output", str(tmp_path / "c"))
    a, b, c = (np.load(tmp_path / d / "samples.npz") for d in "abc")
    assert a["images"].shape == (6, 1, 32, 32) and a["images"].dtype == np.uint8
    assert list(a["prompts"]) == ["7"] * 3 + ["three"] * 3
    assert np.array_equal(a["images"], b["images"]) and not np.array_equal(a["images"], c["images"])
    assert (tmp_path / "a/grid.png").stat().st_size > 0
    assert (tmp_path / "a/prompts.txt").read_text().splitlines() == ["7"] * 3 + ["three"] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs/train.py", "--local", "--steps", "-3"], "--steps: must be a positive integer"),
        (["jobs/train.py", "--local", "--config", "configs/mnist_tiny.yaml", "--set", "model.width=102"],
         "model.width: 102 is not divisible"),
        (["jobs/sample.py", "--checkpoint", "x", "--prompt", "1", "--sampler", "ddim"],
         "invalid choice: 'ddim'"),
        (["jobs/sample.py", "--checkpoint", "x", "--prompt", "1", "--guidance", "-2"], "--guidance: must be >= 0"),
        (["jobs/sample.py", "--checkpoint", "nowhere", "--prompt", "1"], "neither an existing directory"),
    ],
)
def test_nonsense_cli_values_are_rejected(args: list[str], message: str) -> None:
    proc = _run(*args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def broken(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad inputs made from real ones: a corrupt checkpoint, a malformed YAML file, an empty folder."""
    import shutil

    root = tmp_path_factory.mktemp("broken")
    corrupt = Path(shutil.copytree(trained, root / "corrupt"))
    data = bytearray((corrupt / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.pt").write_bytes(bytes(data))
    (root / "bad.yaml").write_text("train:\n  steps: [1\n")
    (root / "empty").mkdir()
    (root / "bad_space.yaml").write_text("name: bad-space\nwidths: [32]\nspace:\n  sample.guidanse: [1.5, 2.5]\n")
    return {"corrupt": corrupt, "yaml": root / "bad.yaml", "space": root / "bad_space.yaml", "empty": root / "empty",
            "good": trained}


def _micro(mnist_parquet: Path, *extra: str) -> list[str]:
    return ["--config", "configs/mnist_tiny.yaml", "--no-tracking",
            *[a for s in [*MICRO, f"data.parquet_dir={mnist_parquet}", *extra] for a in ("--set", s)]]


@pytest.mark.parametrize("case", ["no MNIST", "unreachable MLflow", "corrupt checkpoint", "another model",
                                  "NaN loss", "missing checkpoint", "judge a corrupt checkpoint",
                                  "prepare without MNIST"])
def test_expected_errors_end_in_one_line_without_a_traceback(case: str, broken: dict[str, Path],
                                                             mnist_parquet: Path, tmp_path: Path) -> None:
    import os

    env = dict(os.environ)
    match case:
        case "no MNIST":
            args = ["jobs/train.py", "--local", "--data-root", str(broken["empty"]), "--parquet-dir",
                    str(tmp_path / "pq"), "--set", "data.download=false"]
            expected = "MNIST train files ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte') not found in"
        case "unreachable MLflow":
            env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
            args = ["jobs/train.py", "--local", "--config", "configs/mnist_tiny.yaml", "--parquet-dir",
                    str(mnist_parquet), "--steps", "1"]
            expected = "MLflow tracking server http://127.0.0.1:9 is unreachable"
        case "corrupt checkpoint":
            args = ["jobs/train.py", "--local", "--resume", str(broken["corrupt"]), *_micro(mnist_parquet)]
            expected = f"checkpoint {broken['corrupt']} is corrupt: model.pt is missing or does not match"
        case "another model":
            args = ["jobs/train.py", "--local", "--resume", str(broken["good"]),
                    *_micro(mnist_parquet, "model.width=64", "model.num_heads=4")]
            expected = "was trained with a different model"
        case "NaN loss":
            args = ["jobs/train.py", "--local", "--steps", "20",
                    *_micro(mnist_parquet, "train.lr=1e30", "train.warmup_steps=0", "train.log_every=1",
                            f"train.output_dir={tmp_path}")]
            expected = "stopped before saving"
        case "missing checkpoint":
            args = ["jobs/sample.py", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "7"]
            expected = "is neither an existing directory, a URI, nor an MLflow run id"
        case "judge a corrupt checkpoint":
            args = ["jobs/evaluate.py", "--checkpoint", str(broken["corrupt"]), "--num-samples", "10"]
            expected = "is corrupt"
        case "prepare without MNIST":
            args = ["jobs/prepare_data.py", "--data-root", str(broken["empty"]), "--out", str(tmp_path / "pq"),
                    "--no-download"]
            expected = "not found in"
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, f"{proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("sd3ray: error: ") == 1, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("sd3ray: error: "):]  # the end of stderr: nothing follows it
    assert expected in message, proc.stderr[-3000:]


@pytest.mark.parametrize(("args", "message"), [
    (["jobs/train.py", "--local", "--config", "BAD_YAML"], "is not valid YAML (line 3, column 1)"),
    (["jobs/tune.py", "--config", "BAD_YAML"], "is not valid YAML (line 3, column 1)"),
    (["jobs/tune.py", "--set", "asha.enabled=true", "--set", "asha.grace_period=5000"],
     "asha.grace_period (5000) must be between 1 and train.steps (1500)"),
    (["jobs/tune.py", "--config", "BAD_SPACE"], "space: sample.guidanse: unknown key"),
])
def test_bad_config_files_are_usage_errors(args: list[str], message: str, broken: dict[str, Path]) -> None:
    files = {"BAD_YAML": str(broken["yaml"]), "BAD_SPACE": str(broken["space"])}
    args = [files.get(a, a) for a in args]
    proc = _run(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_debug_shows_the_traceback_and_real_bugs_keep_theirs(broken: dict[str, Path], tmp_path: Path) -> None:
    debug = _run("jobs/sample.py", "--checkpoint", str(broken["corrupt"]), "--prompt", "7", "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    bug = tmp_path / "bug.py"
    bug.write_text("from sd3ray.cli import run_job\n\ndef main():\n    return {}['missing']\n\nrun_job(main)\n")
    proc = _run(str(bug), check=False, cwd=REPO_ROOT)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr


def test_math_and_loop_import_neither_ray_nor_mlflow() -> None:
    code = ("import sys, sd3ray.config, sd3ray.storage, sd3ray.core.flow, sd3ray.core.sampling, sd3ray.core.ema, "
            "sd3ray.model, sd3ray.model.tokenizer, sd3ray.data.format, sd3ray.data.mnist, sd3ray.data.prepare, "
            "sd3ray.data.batches, sd3ray.data.streaming, sd3ray.data.image_sets, sd3ray.checkpoint, sd3ray.inference, "
            "sd3ray.tracking.protocol, sd3ray.tracking.mlflow_tracker, sd3ray.evaluation.validation, "
            "sd3ray.evaluation.judge, sd3ray.training.loop, sd3ray.training.local; "
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; assert not bad, bad")
    _run("-c", code)


def test_a_worker_error_under_ray_ends_in_the_same_one_line(ray_head, mnist_parquet: Path, tmp_path: Path) -> None:
    """The loss diverges on a Ray Train worker: the driver unwraps Ray's error and prints sd3ray's message once.
    (Ray's own log lines around it show the worker's error as one frame.) The job joins the tier's Ray head, as
    after `ray start --head`; a run on a cluster of its own is README's first command (test_first_steps)."""
    proc = _run("jobs/train.py", "--cpu", "--steps", "20", "--storage-path", str(tmp_path / "ray"),
                *_micro(mnist_parquet, "train.lr=1e30", "train.warmup_steps=0", "train.log_every=1",
                        f"train.output_dir={tmp_path}"), check=False, env=ray_head["env"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.count("sd3ray: error: ") == 1
    message = proc.stderr[proc.stderr.index("sd3ray: error: "):].splitlines()[0]
    assert message.startswith("sd3ray: error: loss is ") and "stopped before saving" in message, message
