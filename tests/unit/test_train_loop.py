import math
import signal
import time
from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import latest_checkpoint, load_checkpoint
from sd3ray.config import ConfigError, load_config
from sd3ray.core.ema import EMA
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import DecayHorizon, NonFiniteLossError, plan_step, train
from sd3ray.training.signals import Interrupted
from sd3ray.training.step import learning_rate_factor


class StepRecorder(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[tuple[int, float]] = []

    def log_metrics(self, metrics, step):
        if "loss/train" in metrics:
            self.losses.append((step, metrics["loss/train"]))


class CrashAfterCheckpoint(LocalContext):
    """A process that dies right after writing the checkpoint of `crash_step`."""

    def __init__(self, run_dir: Path, crash_step: int) -> None:
        super().__init__(run_dir, torch.device("cpu"), keep=10)
        self.crash_step = crash_step

    def save_and_report(self, data, metrics):
        where = super().save_and_report(data, metrics)
        if data is not None and data.step == self.crash_step:
            raise RuntimeError(f"crashed after the step-{data.step} checkpoint")
        return where


class LrRecorder(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def log_metrics(self, metrics, step):
        if "train/lr" in metrics:
            self.lrs.append(metrics["train/lr"])


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
    assert math.isfinite(result.metrics["loss/val"])


def test_crash_and_resume_gives_identical_weights(micro_config, tmp_path: Path) -> None:
    """6 steps straight == 3 steps, a crash, a resume from the step-3 checkpoint, 3 more steps."""
    common = ["train.steps=6", "train.ckpt_every=3", "train.log_every=3", "train.eval_every=100"]
    straight = _train(micro_config(*common), tmp_path / "a")
    with pytest.raises(RuntimeError, match="crashed after the step-3 checkpoint"):
        train(micro_config(*common), CrashAfterCheckpoint(tmp_path / "b", crash_step=3), NullTracker())
    checkpoint = latest_checkpoint(tmp_path / "b/checkpoints")
    assert checkpoint.name == "step_00000003"
    recorder = StepRecorder()
    resumed = _train(micro_config(*common), tmp_path / "b", resume=checkpoint, tracker=recorder)
    assert [step for step, _ in recorder.losses] == [6]  # it really continued from step 3
    a = load_checkpoint(Path(straight.checkpoint), weights_only_ok=False)
    b = load_checkpoint(Path(resumed.checkpoint), weights_only_ok=False)
    assert a.step == b.step == 6
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
        assert torch.equal(a.ema[key], b.ema[key]), key
    assert torch.equal(a.optimizer["state"][0]["exp_avg_sq"], b.optimizer["state"][0]["exp_avg_sq"])


def test_a_wsd_run_resumed_with_more_steps_takes_its_first_step_at_the_new_schedules_rate(
        micro_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 wsd steps, resumed with train.steps=4, equal 4 straight steps: the 2-step schedule had reached zero, and
    the step after the resume takes the 4-step schedule's full rate, not the zero the checkpoint's AdamW held."""
    common = ["train.lr_schedule=wsd", "train.warmup_steps=0", "train.ckpt_every=2", "train.log_every=2",
              "train.eval_every=100", "train.lr=0.003"]
    straight = _train(micro_config(*common, "train.steps=4"), tmp_path / "a")
    first = _train(micro_config(*common, "train.steps=2"), tmp_path / "b")
    capsys.readouterr()
    resumed = _train(micro_config(*common, "train.steps=4"), tmp_path / "b", resume=Path(first.checkpoint))
    a, b = (load_checkpoint(Path(r.checkpoint)) for r in (straight, resumed))
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert "wsd schedule now decays to zero at step 4, not 2: at step 2 the learning rate is 0.003, where the " \
           "checkpoint's schedule gave 0. The run had begun its decay at step 1" in capsys.readouterr().out


def test_a_resume_steps_at_the_configs_learning_rate(micro_config, tmp_path: Path) -> None:
    """A resume with train.lr=1e-30 leaves the weights where the checkpoint had them, to 1e-12: the steps after it
    take the config's rate, not the checkpoint's 0.003 (which moves them by ~1e-3)."""
    common = ["train.lr_schedule=constant", "train.warmup_steps=0", "train.ckpt_every=2", "train.log_every=2",
              "train.eval_every=100", "train.lr=0.003"]
    first = _train(micro_config(*common, "train.steps=2"), tmp_path)
    resumed = _train(micro_config(*common, "train.steps=4", "train.lr=1e-30"), tmp_path, resume=Path(first.checkpoint))
    before, after = (load_checkpoint(Path(r.checkpoint)) for r in (first, resumed))
    assert after.step == 4
    for key in before.model:
        torch.testing.assert_close(after.model[key], before.model[key], rtol=0, atol=1e-12, msg=key)


def test_nonfinite_loss_stops_without_checkpointing_it(micro_config, tmp_path: Path) -> None:
    cfg = micro_config("train.steps=6", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                       "train.log_every=1", "train.ckpt_every=1", "train.eval_every=100")
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is .*step_0000000") as err:
        _train(cfg, tmp_path)
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and str(saved) in str(err.value)
    bad_step = int(str(err.value).split(" at step ")[1].split(";")[0])
    assert load_checkpoint(saved).step == bad_step - 1  # nothing at or after the step whose loss was not finite


class StoppedRank(LocalContext):
    """One rank of a data-parallel run, reached by the driver's SIGTERM in its third step; it records its reports
    as (step, with a checkpoint)."""

    def __init__(self, run_dir: Path, main: bool) -> None:
        super().__init__(run_dir, torch.device("cpu"), keep=10)
        self.main, self.steps_checked = main, 0
        self.reports: list[tuple[int, bool]] = []

    @property
    def is_main(self) -> bool:
        return self.main

    def stop_signal(self) -> int | None:
        self.steps_checked += 1  # the loop asks once a step
        return signal.SIGTERM if self.steps_checked >= 3 else None

    def save_and_report(self, data, metrics):
        self.reports.append((metrics["step"], data is not None))
        return super().save_and_report(data, metrics)


@pytest.mark.parametrize("main", [True, False], ids=["rank 0", "rank 1"])
def test_on_a_stop_signal_every_rank_reports_and_rank_0_alone_writes_the_checkpoint(micro_config, tmp_path: Path,
                                                                                    main: bool) -> None:
    """Ranks that each wrote the stop step's checkpoint into one folder left a MANIFEST beside files of another rank
    (a corrupt checkpoint); Ray Train still needs a report from every rank."""
    cfg = micro_config("train.steps=100", "train.log_every=1", "train.ckpt_every=1000", "train.eval_every=1000")
    rank = StoppedRank(tmp_path, main)
    with pytest.raises(Interrupted, match="SIGTERM: stopped at step 3"):
        train(cfg, rank, NullTracker())
    assert rank.reports == [(3, main)]  # the stop's report, with the checkpoint on rank 0 only
    assert (latest_checkpoint(tmp_path / "checkpoints") is not None) == main


def test_wall_clock_budget_stops_cleanly_with_a_checkpoint(micro_config, tmp_path: Path) -> None:
    cfg = micro_config("train.steps=100000", "train.max_minutes=0.0001", "train.log_every=2", "train.ckpt_every=1000",
                       "train.eval_every=1000")
    result = _train(cfg, tmp_path)
    assert result.step == 2 and load_checkpoint(Path(result.checkpoint)).step == 2
    assert "loss/val" in result.metrics  # the final evaluation ran


def test_learning_rate_schedule() -> None:
    cfg = load_config(None, ["train.warmup_steps=10", "train.steps=110", "train.lr_schedule=cosine"]).train
    assert learning_rate_factor(0, cfg) == pytest.approx(0.1)
    assert learning_rate_factor(9, cfg) == pytest.approx(1.0)
    assert learning_rate_factor(60, cfg) == pytest.approx(0.5)
    assert learning_rate_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_warmup_stable_decay_is_constant_then_linear_to_zero_over_its_last_share() -> None:
    cfg = load_config(None, ["train.warmup_steps=10", "train.steps=100", "train.lr_schedule=wsd",
                             "train.decay_fraction=0.2"]).train
    assert learning_rate_factor(4, cfg) == pytest.approx(0.5)  # warmup as before
    assert [learning_rate_factor(s, cfg) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]  # stable
    assert learning_rate_factor(90, cfg) == pytest.approx(0.5) and learning_rate_factor(99, cfg) == pytest.approx(0.05)
    assert learning_rate_factor(100, cfg) == 0.0
    assert learning_rate_factor(450, cfg, horizon=500) == pytest.approx(0.5)  # a time budget's horizon moves it
    with pytest.raises(ConfigError, match="train.decay_fraction"):
        load_config(None, ["train.decay_fraction=0"])


def test_decay_horizon_follows_the_time_budget() -> None:
    """With max_minutes, the cosine ends where the clock will: 100 steps in 6 s of a 60 s budget -> step 1,000."""
    cfg = load_config(None, ["train.warmup_steps=10", "train.steps=100000", "train.lr_schedule=cosine",
                             "train.max_minutes=1", "train.lr_decay_to_budget=true"]).train
    horizon = DecayHorizon(cfg, start_step=0)
    assert horizon.steps == 100000
    horizon.project(100, elapsed_s=6.0)
    assert horizon.steps == 1000
    assert learning_rate_factor(505, cfg, horizon.steps) == pytest.approx(0.5)
    horizon.project(1200, elapsed_s=61.0)  # past the budget: decay ends at the next step
    assert horizon.steps == 1201
    horizon.resume(1200, 1201)  # a resumed session continues from the saved horizon and its own clock
    horizon.project(1300, elapsed_s=30.0)
    assert horizon.steps == 1400
    clock = DecayHorizon(cfg, start_step=0)  # the run stops at the last log step that fits in the budget
    assert not clock.last_log_step(20.0) and not clock.last_log_step(40.0)
    assert clock.last_log_step(51.0)  # 11 s per log interval: the next one would end at 62 s > 60 s
    no_budget = DecayHorizon(load_config(None, ["train.steps=500"]).train, start_step=0)
    no_budget.project(100, elapsed_s=6.0)
    assert no_budget.steps == 500  # without a budget the schedule is the step count's alone
    off = DecayHorizon(load_config(None, ["train.steps=500", "train.max_minutes=1"]).train, start_step=0)
    off.project(100, elapsed_s=6.0)
    assert off.steps == 500  # following the budget is opt-in
    assert off.end == 500  # ... but the console's ETA counts down to wherever the run will stop first
    slow = DecayHorizon(load_config(None, ["train.steps=5000", "train.max_minutes=1", "train.log_every=50"]).train,
                        start_step=0)
    slow.project(100, elapsed_s=12.0)  # 0.12 s a step: 500 steps fit in the minute, not 5,000
    assert (slow.steps, slow.end) == (5000, 500)
    off.resume(2, saved=2)  # a run resumed with more steps than its checkpoint's run had decays over them
    assert off.steps == 500
    short = DecayHorizon(load_config(None, ["train.steps=500", "train.max_minutes=60",
                                            "train.lr_decay_to_budget=true"]).train, start_step=0)
    short.project(100, elapsed_s=6.0)
    assert short.steps == 500  # train.steps comes first when the budget would allow more


def test_a_machine_that_slows_down_pulls_the_horizon_in_to_where_the_clock_stops_the_run() -> None:
    """0.05 s a step to step 400 (20 s), then 0.2 s a step (another job took a core). From step 450 the decay aims at
    step 550, where the stop rule (next interval 10 s + a 6 s save past the minute) ends the run; the session's
    mean alone (0.067 s a step) would aim at step 800 and leave the learning rate high at the stop."""
    cfg = load_config(None, ["train.steps=100000", "train.max_minutes=1", "train.log_every=50",
                             "train.lr_decay_to_budget=true"]).train
    horizon = DecayHorizon(cfg, start_step=0)
    horizon.last_log_s = 17.5  # step 350
    clock = [(400, 20.0), (450, 30.0), (500, 40.0), (550, 50.0)]
    stops, aims = [], []
    for step, spent in clock:
        stops.append(horizon.last_log_step(spent, reserve_s=6.0))
        horizon.project(step, elapsed_s=spent, reserve_s=6.0)
        aims.append(horizon.steps)
    assert stops == [False, False, False, True]
    assert aims == [1050, 550, 550, 551]  # 34 s left at 0.05 s a step; then 24 s, 14 s, 4 s left at 0.2 s a step


def test_budget_keeps_time_for_start_up_and_the_final_save() -> None:
    """Counted from the command, 10 s of start-up and a 6 s final evaluation + checkpoint leave 44 s of a minute
    to train: at 0.06 s a step the stop is projected at step 733 (log step 700), and a log step 9 s before the
    budget's end is the last when the save needs 6 s, but not when it needs none."""
    cfg = load_config(None, ["train.steps=100000", "train.max_minutes=1", "train.log_every=50"]).train
    horizon = DecayHorizon(cfg, start_step=0)
    horizon.project(100, elapsed_s=6.0, spent_s=16.0, reserve_s=6.0)
    assert horizon.end == 700
    horizon.last_log_s = 46.0
    assert horizon.last_log_step(51.0, reserve_s=6.0)  # 51 + 5 + 6 > 60
    horizon.last_log_s = 46.0
    assert not horizon.last_log_step(51.0, reserve_s=0.0)  # 51 + 5 < 60


def test_time_budget_decays_the_learning_rate_to_zero_by_its_end(micro_config, tmp_path: Path) -> None:
    """A 15 s budget: on a loaded machine the first two steps have taken 4.5 s, and a budget must leave room for
    more than one log interval after that for its schedule to be seen."""
    cfg = micro_config("train.steps=1000000", "train.max_minutes=0.25", "train.log_every=2", "train.ckpt_every=10000",
                       "train.eval_every=10000", "train.warmup_steps=2", "train.lr_schedule=cosine", "train.lr=0.001",
                       "train.lr_decay_to_budget=true")
    recorder = LrRecorder()
    result = _train(cfg, tmp_path, tracker=recorder)
    peak = max(recorder.lrs)
    assert result.step < 1000000 and peak == pytest.approx(0.001, rel=0.05)
    # over the step count, the lr at a 15 s stop would still be ~0.001; following the clock it ends near zero
    assert recorder.lrs[-1] < 0.1 * peak, recorder.lrs
    assert load_checkpoint(Path(result.checkpoint)).meta["lr_horizon"] <= result.step + 2  # within a log interval


def test_budget_counts_from_the_command_in_local_mode(micro_config, tmp_path: Path) -> None:
    """A command launched 20 s ago with a 15 s budget has spent it before the loop starts: the run stops at its
    first log step, still evaluated and checkpointed; the same budget counted from the loop trains on, to its
    step count (15 s: on a loaded machine the first two steps alone have taken 4.5 s)."""
    cfg = micro_config("train.steps=6", "train.max_minutes=0.25", "train.log_every=2", "train.ckpt_every=10000",
                       "train.eval_every=10000")
    late = LocalContext(tmp_path / "late", torch.device("cpu"), launched_at=time.monotonic() - 20.0)
    result = train(cfg, late, NullTracker())
    assert result.step == 2 and load_checkpoint(Path(result.checkpoint)).step == 2
    fresh = LocalContext(tmp_path / "fresh", torch.device("cpu"), launched_at=time.monotonic())
    assert train(cfg, fresh, NullTracker()).step == 6


class SlowImages(NullTracker):
    """Every sample grid takes `seconds`: an evaluation whose cost the first log step cannot know."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def log_image(self, key, image, step):
        time.sleep(self.seconds)


def test_a_save_that_uses_up_the_budget_is_the_final_one(micro_config, tmp_path: Path) -> None:
    """Step 4 evaluates (7 s) and checkpoints, unforeseen at its log step; a 12 s budget then has no room for
    another log interval and a second 7 s save, so the run ends at step 4 on that checkpoint instead of
    overrunning to a later log step."""
    cfg = micro_config("train.steps=1000000", "train.max_minutes=0.2", "train.log_every=2", "train.eval_every=4",
                       "train.ckpt_every=4")
    ctx = LocalContext(tmp_path / "run", torch.device("cpu"), launched_at=time.monotonic())
    result = train(cfg, ctx, SlowImages(7.0))
    assert result.step == 4 and load_checkpoint(Path(result.checkpoint)).step == 4
    horizon = DecayHorizon(cfg.train, start_step=0)
    horizon.interval_s = 1.0
    assert not horizon.no_room_after_save(4.0, reserve_s=7.0)  # 4 + 1 + 7 = 12: just fits
    assert horizon.no_room_after_save(4.5, reserve_s=7.0) and horizon.last_log_s == 4.5


def test_ema_follows_its_formula() -> None:
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)
    torch.testing.assert_close(ema.model.weight, before + 0.1 * (model.weight - before))
    assert ema.decay_at(0) == pytest.approx(0.1)  # warm-up: early EMA tracks the model closely


def _plans(cfg, budget_spent_at: int | None = None) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {"log": [], "evaluate": [], "checkpoint": [], "report": [], "stop": []}
    for step in range(1, cfg.steps + 1):
        plan = plan_step(step, cfg, budget_spent=step == budget_spent_at)
        for key in steps:
            if getattr(plan, key):
                steps[key].append(step)
        if plan.stop:
            break
    return steps


def test_step_plan_follows_the_intervals_and_always_ends_with_a_checkpoint() -> None:
    cfg = load_config(None, ["train.steps=10", "train.log_every=3", "train.eval_every=4", "train.ckpt_every=5"]).train
    plans = _plans(cfg)
    assert plans["checkpoint"] == [5, 10]
    assert plans["log"] == [3, 5, 6, 9, 10]  # a checkpoint step also logs: its report carries the latest loss
    assert plans["evaluate"] == [4, 8, 10]
    assert plans["report"] == [4, 5, 8, 10] and plans["stop"] == []


def test_a_spent_budget_stops_only_at_a_log_step_with_an_evaluation_and_a_checkpoint() -> None:
    cfg = load_config(None, ["train.steps=100", "train.log_every=3", "train.eval_every=50",
                             "train.ckpt_every=50"]).train
    plans = _plans(cfg, budget_spent_at=6)
    assert plans["stop"] == [6] and plans["checkpoint"] == [6] and plans["evaluate"] == [6]
    # the flag is only ever all-reduced at log steps; anywhere else it must not change the plan
    assert plan_step(7, cfg, budget_spent=True) == plan_step(7, cfg)
    # at the last step the run ends anyway: that is not a budget stop
    assert not plan_step(100, cfg, budget_spent=True).stop
