"""The judge and its metrics against known cases, and the paths that log them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from sd3ray.data import read_split
from sd3ray.judge import Reference, eval_prompts, frechet_distance, judge_images, judge_outputs, load_judge
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def splits(mnist_parquet: Path):
    return read_split(mnist_parquet, "train"), read_split(mnist_parquet, "test")


@pytest.fixture(scope="module")
def reference(splits) -> Reference:
    train, test = splits
    return Reference(load_judge(train), train, test)


def test_judge_reaches_992_on_the_real_test_set(reference: Reference, splits) -> None:
    _, test = splits
    preds, feats = judge_outputs(reference.judge, test.images)
    assert (preds == test.labels).double().mean() >= 0.992
    assert feats.shape == (10000, 128)


def test_judge_reads_shifted_digits(reference: Reference, splits) -> None:
    _, test = splits
    shifted = torch.roll(test.images[:2000], shifts=(2, -2), dims=(2, 3))  # the 2-px margin allows this
    preds, _ = judge_outputs(reference.judge, shifted)
    assert (preds == test.labels[:2000]).double().mean() >= 0.98


def _held_out(splits, n: int = 1000):
    """A random sample of real training digits that the floor's sample does not contain. (A contiguous slice
    would not do: MNIST's training file is not shuffled by writer, and its last 1000 score 3× the floor.)"""
    train, _ = splits
    floor_sample = set(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].tolist())
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist()
    index = torch.tensor([i for i in order if i not in floor_sample][:n])
    images, digits = train.images[index], train.labels[index]
    return images, digits, [str(int(d)) for d in digits]


def test_real_images_score_near_the_floor(reference: Reference, splits) -> None:
    images, digits, prompts = _held_out(splits)
    m = judge_images(reference, images, digits, prompts).metrics
    assert m["judge/prompt_accuracy"] >= 0.99
    assert m["judge/fid_ratio"] < 1.6, m
    assert m["judge/diversity"] == pytest.approx(m["judge/diversity_real"], rel=0.1)


def test_shuffled_labels_score_chance(reference: Reference, splits) -> None:
    images, digits, prompts = _held_out(splits)
    shuffled = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
    accuracy = judge_images(reference, images, shuffled, prompts).metrics["judge/prompt_accuracy"]
    assert 0.05 < accuracy < 0.16


def test_a_single_repeated_image_scores_a_huge_fid(reference: Reference, splits) -> None:
    images, digits, prompts = _held_out(splits)
    m = judge_images(reference, images[:1].repeat(1000, 1, 1, 1), digits, prompts).metrics
    assert m["judge/fid_ratio"] > 50 and m["judge/diversity"] == 0


def test_frechet_distance_matches_the_sqrtm_reference() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.5
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_eval_prompts_balance_digits_and_forms() -> None:
    prompts, digits = eval_prompts(40)
    assert torch.equal(torch.bincount(digits), torch.full((10,), 4))
    assert prompts[:3] == ["0", "1", "2"] and prompts[10:12] == ["zero", "one"]


def test_training_logs_judge_metrics_and_a_confusion_matrix(micro_config, tmp_path: Path, reference) -> None:
    from sd3ray.context import LocalContext
    from sd3ray.tracking import NullTracker
    from sd3ray.train_loop import train

    logged: dict[str, list] = {"metrics": [], "images": []}

    class Recorder(NullTracker):
        def log_metrics(self, metrics, step):
            logged["metrics"].append((step, metrics))

        def log_image(self, key, image, step):
            logged["images"].append((key, step, image.shape))

    cfg = micro_config("train.steps=2", "train.eval_every=2", "eval.num_samples=20")
    train(cfg, LocalContext(tmp_path, torch.device("cpu")), Recorder())
    judged = [m for _, m in logged["metrics"] if "judge/prompt_accuracy" in m]
    assert judged and {"judge/fid", "judge/fid_floor", "judge/accuracy_word", "judge/diversity"} <= set(judged[0])
    assert ("confusion", 2) in [(k, s) for k, s, _ in logged["images"]]
    assert ("samples", 2) in [(k, s) for k, s, _ in logged["images"]]


def test_evaluate_job_prints_a_table_and_logs_a_nested_run(micro_config, tmp_path: Path, reference) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.context import LocalContext
    from sd3ray.tracking import MlflowTracker
    from sd3ray.train_loop import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = micro_config("train.steps=2", "train.eval_every=2", f"tracking.uri={uri}")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), MlflowTracker(uri, "eval-test"))
    proc = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--checkpoint", result.checkpoint, "--guidance", "1", "3", "--steps", "2",
         "--num-samples", "20", "--tracking-uri", uri, "--output", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| guidance | steps | prompt acc" in proc.stdout and "| 3 | 2 |" in proc.stdout
    assert (tmp_path / "out/results.json").is_file()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(runs) == 1 and "eval/g3_s2/prompt_accuracy" in runs[0].data.metrics
