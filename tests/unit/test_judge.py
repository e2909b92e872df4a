"""The judge and its metrics against known cases, and the paths that log them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from sd3ray.data.format import ImageSet
from sd3ray.evaluation import judge as judge_module
from sd3ray.evaluation.judge import Reference, eval_prompts, frechet_distance, judge_images, judge_outputs
from tests.support import REPO_ROOT


def test_judge_reaches_992_on_the_real_test_set(judge_reference: Reference, mnist_splits) -> None:
    _, test = mnist_splits
    preds, feats = judge_outputs(judge_reference.judge, test.images)
    assert (preds == test.labels).double().mean() >= 0.992
    assert feats.shape == (10000, 128)


def test_judge_reads_shifted_digits(judge_reference: Reference, mnist_splits) -> None:
    _, test = mnist_splits
    shifted = torch.roll(test.images[:2000], shifts=(2, -2), dims=(2, 3))  # the 2-px margin allows this
    preds, _ = judge_outputs(judge_reference.judge, shifted)
    assert (preds == test.labels[:2000]).double().mean() >= 0.98


def _held_out(mnist_splits, n: int = 1000):
    """A random sample of real training digits, with their natural digit counts. (A contiguous slice would not do:
    MNIST's training file is not shuffled by writer, and its last 1000 score 3× the floor.)"""
    train, _ = mnist_splits
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:n]
    images, digits = train.images[index], train.labels[index]
    return images, digits, [str(int(d)) for d in digits]


def test_real_images_score_near_the_floor(judge_reference: Reference, mnist_splits) -> None:
    images, digits, prompts = _held_out(mnist_splits)
    m = judge_images(judge_reference, images, digits, prompts).metrics
    assert m["samples/accuracy"] >= 0.99
    assert m["samples/cfid_ratio"] < 1.6, m
    assert m["samples/diversity"] == pytest.approx(m["val/diversity_real"], rel=0.1)


def test_shuffled_labels_score_chance(judge_reference: Reference, mnist_splits) -> None:
    images, digits, prompts = _held_out(mnist_splits)
    shuffled = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
    accuracy = judge_images(judge_reference, images, shuffled, prompts).metrics["samples/accuracy"]
    assert 0.05 < accuracy < 0.16


def test_a_single_repeated_image_scores_a_huge_fid(judge_reference: Reference, mnist_splits) -> None:
    images, digits, prompts = _held_out(mnist_splits)
    m = judge_images(judge_reference, images[:1].repeat(1000, 1, 1, 1), digits, prompts).metrics
    assert m["samples/cfid_ratio"] > 50 and m["samples/diversity"] == 0


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


def test_training_logs_judge_metrics_and_a_confusion_matrix(micro_config, tmp_path: Path, judge_reference) -> None:
    from sd3ray.tracking.protocol import NullTracker
    from sd3ray.training.context import LocalContext
    from sd3ray.training.loop import train

    logged: dict[str, list] = {"metrics": [], "images": [], "params": [], "tags": []}

    class Recorder(NullTracker):
        def log_metrics(self, metrics, step):
            logged["metrics"].append((step, metrics))

        def log_params(self, params):
            logged["params"].append(params)

        def set_tags(self, tags):
            logged["tags"].append(tags)

        def log_image(self, key, image, step):
            logged["images"].append((key, step, image.shape))

    cfg = micro_config("train.steps=2", "train.eval_every=2", "eval.num_samples=20")
    train(cfg, LocalContext(tmp_path, torch.device("cpu")), Recorder())
    judged = [m for _, m in logged["metrics"] if "samples/accuracy" in m]
    assert judged and {"val/cfid", "samples/cfid_ratio", "val/accuracy_word", "samples/diversity"} <= set(judged[0])
    # what is the same at every evaluation is a param or a tag, not a flat chart
    params = {k: v for p in logged["params"] for k, v in p.items()}
    tags = {k: v for t in logged["tags"] for k, v in t.items()}
    assert "global_batch" in params and {"val/cfid_floor", "val/diversity_real"} <= set(tags)
    assert not any({"val/cfid_floor", "val/diversity_real", "global_batch"} & set(m) for _, m in logged["metrics"])
    assert ("samples/confusion", 2) in [(k, s) for k, s, _ in logged["images"]]
    assert ("samples/grid", 2) in [(k, s) for k, s, _ in logged["images"]]


def _count_trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    trained: list[int] = []
    real_train = judge_module.train_judge

    def counting(train: ImageSet, *args, **kwargs):
        trained.append(len(train))
        return real_train(train, *args, **kwargs)

    monkeypatch.setattr(judge_module, "train_judge", counting)
    return trained


def test_real_mnist_gets_the_shipped_judge_without_training(mnist_splits, monkeypatch, tmp_path: Path) -> None:
    # the shipped file is named by the hash of the recipe and the data: a changed recipe (JUDGE_VERSION, epochs) or
    # a changed MNIST conversion no longer finds it, and this fails until the judge is retrained and shipped again
    monkeypatch.setenv("SD3RAY_CACHE", str(tmp_path / "cache"))
    trained = _count_trainings(monkeypatch)
    train, _ = mnist_splits
    judge = judge_module.load_judge(train)
    assert trained == [] and not (tmp_path / "cache").exists()
    assert judge_module.shipped_judge_path(train).parent == judge_module.SHIPPED_DIR
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())


def test_any_other_digit_set_trains_its_own_judge_once_then_loads_it_from_the_cache(
        mnist_splits, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SD3RAY_CACHE", str(tmp_path / "cache"))
    trained = _count_trainings(monkeypatch)
    train, _ = mnist_splits
    subset = ImageSet(train.images[:512], train.labels[:512], None)
    assert judge_module.shipped_judge_path(subset) is None
    first = judge_module.load_judge(subset)
    second = judge_module.load_judge(subset)
    assert trained == [512]  # trained once, then read back from the cache
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"judge-{judge_module.judge_cache_key(subset)}.pt"]
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_the_floor_draws_real_digits_as_the_samples_were_prompted(judge_reference: Reference, mnist_splits) -> None:
    """The floor matches how samples are drawn (eval_prompts: exactly 100 of each digit at 1,000), so it carries
    none of the noise of natural class counts: below a natural draw's FID, and steady across its three draws."""
    from sd3ray.evaluation.judge import balanced_draw

    train, test = mnist_splits
    _, digits = eval_prompts(1000)
    index = balanced_draw(train.labels, digits, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(train.labels[index], minlength=10), torch.full((10,), 100))
    assert len(set(index.tolist())) == 1000  # without replacement
    floor, spread = judge_reference.floor(digits)
    natural = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1000]
    _, feats = judge_outputs(judge_reference.judge, train.images[natural])
    natural_fid = frechet_distance(feats.numpy(), judge_reference.test_features.numpy())
    assert floor < natural_fid, (floor, natural_fid)
    assert 0 < spread < 0.3 * floor
    assert judge_reference.floor(digits[:250])[0] > floor  # fewer samples, a higher floor


def test_a_sweep_trains_its_judge_once_before_any_trial_and_only_for_digits(mnist_splits, monkeypatch,
                                                                             tmp_path: Path) -> None:
    """Trials that start together would each train the judge of a set sd3ray ships none for."""
    from sd3ray.config import load_config
    from sd3ray.data.format import write_split
    from sd3ray.sweeps.driver import prepare_judge

    monkeypatch.setenv("SD3RAY_CACHE", str(tmp_path / "cache"))
    trained = _count_trainings(monkeypatch)
    train, test = mnist_splits
    digits = tmp_path / "digits"
    write_split(digits, "train", train.images[:512].numpy(), train.labels[:512].numpy())
    write_split(digits, "test", test.images[:64].numpy(), test.labels[:64].numpy())
    colour = tmp_path / "colour"
    write_split(colour, "train", np.zeros((8, 3, 32, 32), np.uint8), np.zeros(8, np.int64))
    write_split(colour, "test", np.zeros((8, 3, 32, 32), np.uint8), np.zeros(8, np.int64))

    def config(folder: Path, *extra: str):
        return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [f"data.parquet_dir={folder}", *extra])

    prepare_judge(config(digits, "eval.num_samples=0"))  # no judge asked for
    prepare_judge(config(colour))  # nothing the judge can read
    assert trained == []
    prepare_judge(config(digits))
    prepare_judge(config(digits))
    assert trained == [512]
    subset = ImageSet(train.images[:512], train.labels[:512], None)
    assert (tmp_path / "cache" / f"judge-{judge_module.judge_cache_key(subset)}.pt").is_file()
