import math
from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import latest_checkpoint, load_checkpoint
from sd3ray.config import load_config
from sd3ray.context import LocalContext
from sd3ray.ema import EMA
from sd3ray.tracking import NullTracker
from sd3ray.train_loop import NonFiniteLossError, TrainingBatches, learning_rate_factor, train


class StepRecorder(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[tuple[int, float]] = []

    def log_metrics(self, metrics, step):
        if "train/loss" in metrics:
            self.losses.append((step, metrics["train/loss"]))


def _train(cfg, run_dir: Path, resume: Path | None = None, tracker: NullTracker | None = None):
    return train(cfg, LocalContext(run_dir, torch.device("cpu"), resume, keep=10), tracker or NullTracker())


def test_loss_falls_on_real_mnist(micro_config, tmp_path: Path) -> None:
    cfg = micro_config("train.steps=60", "train.log_every=10", "train.eval_every=60", "train.ckpt_every=60",
                       "train.lr=0.003", "train.lr_schedule=constant")
    recorder = StepRecorder()
    result = _train(cfg, tmp_path, tracker=recorder)
    losses = [loss for _, loss in recorder.losses]
    assert result.step == 60 and len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses
    assert math.isfinite(result.metrics["val/loss"])


def test_crash_and_resume_gives_identical_weights(micro_config, tmp_path: Path) -> None:
    """6 steps straight == 3 steps, a crash, a resume from the step-3 checkpoint, 3 more steps."""
    common = ["train.steps=6", "train.ckpt_every=3", "train.log_every=3", "train.eval_every=100"]
    straight = _train(micro_config(*common), tmp_path / "a")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        _train(micro_config(*common, "train.fail_at_step=3"), tmp_path / "b")
    checkpoint = latest_checkpoint(tmp_path / "b/checkpoints")
    assert checkpoint.name == "step_00000003"
    recorder = StepRecorder()
    resumed = _train(micro_config(*common), tmp_path / "b", resume=checkpoint, tracker=recorder)
    assert [step for step, _ in recorder.losses] == [6]  # it really continued from step 3
    a, b = load_checkpoint(Path(straight.checkpoint)), load_checkpoint(Path(resumed.checkpoint))
    assert a.step == b.step == 6
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key
    assert torch.equal(a.optimizer["state"][0]["exp_avg_sq"], b.optimizer["state"][0]["exp_avg_sq"])


def test_nonfinite_loss_stops_without_checkpointing_it(micro_config, tmp_path: Path) -> None:
    cfg = micro_config("train.steps=6", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                       "train.log_every=1", "train.ckpt_every=1", "train.eval_every=100")
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is .*step_0000000") as err:
        _train(cfg, tmp_path)
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and str(saved) in str(err.value)
    bad_step = int(str(err.value).split(" at step ")[1].split(";")[0])
    assert load_checkpoint(saved).step == bad_step - 1  # nothing at or after the step whose loss was not finite


def test_wall_clock_budget_stops_cleanly_with_a_checkpoint(micro_config, tmp_path: Path) -> None:
    cfg = micro_config("train.steps=100000", "train.max_minutes=0.0001", "train.log_every=2", "train.ckpt_every=1000",
                       "train.eval_every=1000")
    result = _train(cfg, tmp_path)
    assert result.step == 2 and load_checkpoint(Path(result.checkpoint)).step == 2
    assert "val/loss" in result.metrics  # the final evaluation ran


def test_batches_are_a_function_of_the_step(micro_config) -> None:
    from sd3ray.data import read_split

    cfg = micro_config("text.prompt_dropout=0.5")
    images = read_split(cfg.data.parquet_dir, "test")
    one = TrainingBatches(images, cfg, 0, 1, torch.device("cpu"))
    again = TrainingBatches(images, cfg, 0, 1, torch.device("cpu"))
    for x, y in zip(one.get(5), again.get(5)):
        assert torch.equal(x, y)
    x0, ids, mask, t, eps = one.get(5)
    assert x0.min() >= -1 and x0.max() <= 1 and x0.shape == (16, 1, 32, 32)
    empty = mask.sum(1) == 1  # only BOS: the dropped prompts
    assert 0 < empty.sum() < 16
    # halves of a 2-worker split are the two halves of the 1-worker batch of twice the size
    two = [TrainingBatches(images, micro_config("text.prompt_dropout=0.5", "train.batch_size=8"), r, 2,
                           torch.device("cpu")) for r in range(2)]
    for whole, parts in zip(one.get(9), zip(*(w.get(9) for w in two))):
        assert torch.equal(whole, torch.cat(parts))


def test_learning_rate_schedule() -> None:
    cfg = load_config(None, ["train.warmup_steps=10", "train.steps=110", "train.lr_schedule=cosine"]).train
    assert learning_rate_factor(0, cfg) == pytest.approx(0.1)
    assert learning_rate_factor(9, cfg) == pytest.approx(1.0)
    assert learning_rate_factor(60, cfg) == pytest.approx(0.5)
    assert learning_rate_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_ema_follows_its_formula() -> None:
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)
    torch.testing.assert_close(ema.model.weight, before + 0.1 * (model.weight - before))
    assert ema.decay_at(0) == pytest.approx(0.1)  # warm-up: early EMA tracks the model closely
