"""The training loop: `train(cfg, ctx, tracker)`, the same code in a local process and on every Ray Train worker.

It never imports ray (the context abstracts it) and only reaches mlflow through the tracker. The hot loop makes no
host syncs: losses and grad norms accumulate on the device and are read at log steps only. When to log, evaluate,
checkpoint and stop is decided in one place, `plan_step`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch

from sd3ray.checkpoint import CheckpointData, write_checkpoint
from sd3ray.config import Config, TrainConfig
from sd3ray.data.batches import BucketedBatches, TrainingBatches
from sd3ray.data.bucketed_sets import BucketedSet
from sd3ray.data.format import read_split
from sd3ray.data.latents import load_model_splits
from sd3ray.data.streaming import StreamedBatches, describe_choice, streams
from sd3ray.data.text_embeddings import use_precomputed
from sd3ray.errors import Sd3rayError
from sd3ray.evaluation.figures import make_grid
from sd3ray.evaluation.flops import peak_tflops, train_step_flops
from sd3ray.evaluation.judge import CONSTANT_METRICS, SampleJudge, is_digit_data
from sd3ray.evaluation.validation import GRID_SEED, ValidationSet, validation_losses
from sd3ray.inference import generate
from sd3ray.model import Denoiser, count_parameters
from sd3ray.model.pretrained_text import PretrainedTextEncoder
from sd3ray.model.vae import uses_vae
from sd3ray.storage import is_uri
from sd3ray.tracking.protocol import EVAL_SECONDS, Tracker
from sd3ray.training.context import RunContext
from sd3ray.training.machine import peak_memory_gib
from sd3ray.training.parallel import checkpoint_state, evaluation_model, restore_training_state, whole_state_dicts
from sd3ray.training.signals import Interrupted, signal_name
from sd3ray.training.step import (
    TrainState,
    build_train_state,
    moved_decay_notice,
    reschedule_after_resume,
    resolve_step_settings,
    train_step,
)


class NonFiniteLossError(Sd3rayError):
    """The loss became NaN or infinite; no checkpoint was written after it did."""


@dataclass
class TrainResult:
    step: int
    checkpoint: str | None
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    model: Denoiser | None = None  # the final (non-EMA) weights of this rank


@dataclass(frozen=True)
class StepPlan:
    """What the loop does after an optimizer step."""

    log: bool  # reduce the loss across ranks, print and log it, check the time budget
    evaluate: bool  # rank 0: validation loss, sample grid, judge
    checkpoint: bool  # rank 0 writes a checkpoint
    stop: bool  # the time budget is spent: evaluate, checkpoint and leave the loop

    @property
    def report(self) -> bool:
        """Every rank calls ctx.save_and_report at exactly these steps."""
        return self.evaluate or self.checkpoint


def plan_step(step: int, cfg: TrainConfig, budget_spent: bool = False) -> StepPlan:
    """The schedule after `step` optimizer steps (1-based: `step` steps are done).

    Rank symmetry: Ray Train's report is collective, so every rank must report the same number of times, at the
    same steps. The plan therefore depends only on the step, the config and `budget_spent`, and the loop only
    passes `budget_spent` after reducing it over all ranks (max), at log steps. Nothing one rank alone knows (its
    own clock, its own loss) may enter it.
    """
    last = step >= cfg.steps
    checkpoint_due = step % cfg.ckpt_every == 0 or last
    log = step % cfg.log_every == 0 or checkpoint_due
    stop = budget_spent and log and not last
    return StepPlan(log=log, evaluate=step % cfg.eval_every == 0 or last or stop,
                    checkpoint=checkpoint_due or stop, stop=stop)


class DecayHorizon:
    """The step at which the learning rate reaches zero: `train.steps`, or, with a time budget
    (`train.max_minutes`) and `train.lr_decay_to_budget`, the step the run is projected to stop at, if that comes
    first.

    A cosine or wsd decay laid over `train.steps` and cut off by the clock stops at a high learning rate; following
    the budget decays it fully. A cosine over the whole budget costs accuracy in budgets far too short to converge
    (measured on mnist_tiny at 5 minutes: 0.147 decayed against 0.249 constant); wsd's cooldown over the last 20%
    gained at 10 minutes (docs/quality.md). So it is opt-in, and mnist_tiny's wsd opts in. The run stops at
    the last log step after which the final evaluation and checkpoint still fit in the budget (`last_log_step`),
    and the projection aims there. It is re-projected at log steps only, from the elapsed time reduced over all
    ranks, so every rank keeps the same learning rate.
    """

    def __init__(self, cfg: TrainConfig, start_step: int, horizon: int | None = None) -> None:
        self.cfg, self.start_step = cfg, start_step
        self.steps = horizon or cfg.steps
        self.end = cfg.steps  # where the run is expected to stop: what the console's ETA counts down to
        self.last_log_s = 0.0  # budget seconds spent at the previous log step (or since its save)
        self.interval_s = 0.0  # training seconds between the last two log steps

    def project(self, step: int, elapsed_s: float, spent_s: float | None = None, reserve_s: float = 0.0) -> None:
        """`elapsed_s` seconds of this session trained steps start_step..step; `spent_s` of the budget are gone
        (default `elapsed_s`; more when the budget counts from the command), and `reserve_s` are kept for the final
        evaluation and checkpoint. The projected stop becomes the run's expected end whenever there is a budget,
        and the decay's horizon only when it follows the budget."""
        if self.cfg.max_minutes <= 0 or elapsed_s <= 0 or step <= self.start_step:
            return
        # the slower of the session's mean and the latest log interval: a machine that slows down (another job on
        # the cores) must pull the horizon in at once, and the stop rule (`no_room`) judges by that interval too, so
        # the projected stop and the actual one agree
        per_step = elapsed_s / (step - self.start_step)
        if self.interval_s > 0:
            per_step = max(per_step, self.interval_s / self.cfg.log_every)
        left_s = 60 * self.cfg.max_minutes - (elapsed_s if spent_s is None else spent_s) - reserve_s
        projected = step + int(max(0.0, left_s) / per_step)
        last_log = projected // self.cfg.log_every * self.cfg.log_every
        self.end = max(step, min(self.cfg.steps, last_log))
        if self.cfg.lr_decay_to_budget:
            self.steps = max(step + 1, min(self.cfg.steps, last_log))

    def last_log_step(self, spent_s: float, reserve_s: float = 0.0) -> bool:
        """At a log step, `spent_s` seconds into the budget: whether the next log step, and then the final
        evaluation and checkpoint (`reserve_s`, the longest one so far), would end past the budget (the time since
        the previous log step is the estimate), so this one is the run's last."""
        self.interval_s, self.last_log_s = spent_s - self.last_log_s, spent_s
        return self.no_room(spent_s, reserve_s)

    def no_room_after_save(self, spent_s: float, reserve_s: float) -> bool:
        """After an evaluation and checkpoint at a log step, now `spent_s` into the budget: whether another log
        interval and the final save no longer fit. That save took time the log step could not foresee (the
        first one's cost is unknown until it runs); the next interval is measured from here, training time only."""
        self.last_log_s = spent_s
        return self.no_room(spent_s, reserve_s)

    def no_room(self, spent_s: float, reserve_s: float) -> bool:
        return self.cfg.max_minutes > 0 and spent_s + self.interval_s + reserve_s > 60 * self.cfg.max_minutes

    def resume(self, step: int, saved: int | None) -> None:
        """Continue a run resumed at `step` from the checkpoint's horizon; this session's clock re-projects it."""
        follows_budget = self.cfg.lr_decay_to_budget and self.cfg.max_minutes > 0
        # without the decay to the budget the horizon is this config's train.steps, which a resume may raise
        self.start_step, self.steps = step, min(saved, self.cfg.steps) if saved and follows_budget else self.cfg.steps


def grid_shapes(data: BucketedSet, cfg: Config, most: int = 3) -> list[tuple[int, int]]:
    """The shapes of a bucketed set's `most` largest buckets other than the square grid's."""
    square = (cfg.model.image_size, cfg.model.image_size)
    ranked = sorted(zip(data.buckets, data.parts), key=lambda pair: -len(pair[1]))
    return [bucket for bucket, _ in ranked if bucket != square][:most]


def in_memory_batches(train_set: Any, cfg: Config, rank: int, world_size: int, device: torch.device,
                      tokenize: Any) -> TrainingBatches | BucketedBatches:
    """A square set's batches, or an aspect-ratio bucketed set's (one bucket a step)."""
    if isinstance(train_set, BucketedSet):
        return BucketedBatches(train_set, cfg, rank, world_size, device, tokenize)
    return TrainingBatches(train_set, cfg, rank, world_size, device, tokenize)


def niceness() -> str:
    """', nice N' when this process runs below normal priority (it then loses every CPU contest), else ''."""
    nice = os.nice(0) if hasattr(os, "nice") else 0
    return f", nice {nice}: below normal CPU priority" if nice > 0 else ""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Progress:
    """The console line (step, loss, images/s, ETA, and MFU on a GPU whose peak is known) and the matching
    train/* speed metrics."""

    def __init__(self, start_step: int, global_batch: int, device: torch.device,
                 step_flops: Callable[[int], float]) -> None:
        self.global_batch, self.device, self.step_flops = global_batch, device, step_flops
        self.peak_flops = (peak_tflops(torch.cuda.get_device_name(device)) or 0) * 1e12 \
            if device.type == "cuda" else 0.0
        self.last_step, self.last_time = start_step, time.perf_counter()

    def restart(self, step: int) -> None:
        """Exclude evaluation and checkpoint time from the training rate."""
        self.last_step, self.last_time = step, time.perf_counter()

    def tick(self, step: int, total: int, loss: float, lr: float, context_len: int) -> dict[str, float]:
        """`total`: the step the run will end at (with a time budget, the projected one); `context_len`: the text
        tokens of the latest batch, which its FLOPs count."""
        now = time.perf_counter()
        step_time = (now - self.last_time) / max(1, step - self.last_step)
        self.last_step, self.last_time = step, now
        eta = step_time * (total - step)
        metrics = {"train/images_per_s": self.global_batch / step_time, "train/step_time_s": step_time,
                   "train/peak_memory_gib": peak_memory_gib(self.device)}
        shown_mfu = ""
        if self.peak_flops:  # this worker's FLOPs over its own share of the step
            metrics["train/mfu"] = self.step_flops(context_len) / step_time / self.peak_flops
            shown_mfu = f" | MFU {metrics['train/mfu']:.1%}"
        print(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {self.global_batch / step_time:.0f} img/s"
              f"{shown_mfu} | ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        return metrics


def validate_and_judge(ema_model: Denoiser, val: ValidationSet, cfg: Config, device: torch.device, tracker: Tracker,
                  step: int, judge: SampleJudge | None) -> dict[str, float]:
    """Rank 0: fixed-t validation loss, the sample grid, and judge metrics with a confusion matrix."""
    metrics = validation_losses(ema_model, val)
    started = time.perf_counter()
    grid = generate(ema_model, val.grid_prompts, cfg, GRID_SEED, device)
    tracker.log_image("samples/grid", make_grid(grid), step)
    for height, width in val.grid_shapes:  # the same prompts at the buckets' shapes, two rows each
        shaped = generate(ema_model, val.grid_prompts[:16], cfg, GRID_SEED, device, size=(height, width))
        tracker.log_image(f"samples/grid_{height}x{width}", make_grid(shaped), step)
    if judge is not None:
        report = judge(ema_model, step)
        metrics.update(report.metrics)
        for key, image in report.images.items():
            tracker.log_image(key, image, step)
    metrics[EVAL_SECONDS] = time.perf_counter() - started
    # tags, not params: MLflow's image card prints every param above the sample grid (docs/tracking.md)
    tracker.set_tags({key: f"{metrics[key]:.6g}" for key in CONSTANT_METRICS if key in metrics})
    tracker.log_metrics({k: v for k, v in metrics.items() if k not in CONSTANT_METRICS}, step)
    return metrics


def train(cfg: Config, ctx: RunContext, tracker: Tracker) -> TrainResult:
    """Train `cfg.train.steps` steps (or until `train.max_minutes`), resuming from `ctx.resume_from()`.

    The data must already be prepared (`sd3ray.data.prepare.prepare_dataset`, the driver's job); the loop only reads it.
    """
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device, tc = ctx.device, cfg.train
    streaming = streams(cfg)
    if ctx.is_main:
        print(describe_choice(cfg), flush=True)
    train_set, test_set = (None, read_split(cfg.data.parquet_dir, "test")) if streaming \
        else load_model_splits(cfg, ctx.is_main)
    horizon = DecayHorizon(tc, start_step=0)
    settings = resolve_step_settings(cfg, device)
    state = build_train_state(cfg, device, settings, lambda: horizon.steps, ctx.prepare_model)
    model, scheduler = state.model, state.scheduler
    text = model.text_encoder
    if isinstance(text, PretrainedTextEncoder):
        line = use_precomputed(text, cfg.data.parquet_dir)
        if ctx.is_main:
            print(f"sd3ray: {line}", flush=True)
    batches = StreamedBatches(ctx.train_stream(cfg), cfg, ctx.rank, ctx.world_size, device, text.tokenize) \
        if streaming else in_memory_batches(train_set, cfg, ctx.rank, ctx.world_size, device, text.tokenize)
    step, meta = 0, {}
    if (resume := ctx.resume_from()) is not None:
        step, meta = restore(resume, cfg, state)
        horizon.resume(step, meta.get("lr_horizon"))
        reschedule_after_resume(state, tc)
        if ctx.is_main and (notice := moved_decay_notice(tc, step, meta.get("lr_horizon"), horizon.steps)):
            print(f"sd3ray: {notice}", flush=True)
    run_id, seconds_before = meta.get("mlflow_run_id"), float(meta.get("train_seconds", 0.0))
    run_id = tracker.start(cfg, run_id, tags={"sd3ray.world_size": str(ctx.world_size), **ctx.run_tags})
    run_ref = {"mlflow_run_id": run_id} if run_id else {}  # in every report: the Ray driver names the run at the end
    if resume is not None:  # the run's page says it was restarted, and from which step (the latest restart)
        tracker.set_tags({"sd3ray.resumed_at_step": str(step)})
    if ctx.is_main:
        mmdit_m, text_m = count_parameters(model.mmdit) / 1e6, count_parameters(model.text_encoder) / 1e6
        texts = f"{text_m:.2f}M text params" if text_m else "frozen " + "+".join(s.kind for s in text.specs)
        print(f"sd3ray: {mmdit_m:.2f}M MM-DiT + {texts} | {ctx.world_size} worker(s) × batch "
              f"{tc.batch_size} on {device} ({torch.get_num_threads()} threads{niceness()}) | from step {step}",
              flush=True)
        print(f"sd3ray: step {settings.reason}", flush=True)
        print(f"sd3ray: {state.plan.reason}", flush=True)
    tracker.log_params({"global_batch": batches.global_batch})
    shapes = grid_shapes(train_set, cfg) if isinstance(train_set, BucketedSet) else []
    if isinstance(test_set, BucketedSet):  # the validation loss and the grid at the most common shape
        test_set = test_set.largest()
    val = ValidationSet.build(test_set, cfg, device) if ctx.is_main else None
    if val is not None:
        val.grid_shapes = shapes
    if step == 0:  # every rank: a sharded EMA is gathered onto rank 0 (evaluation_model)
        # the untrained model's grid: MLflow's image card opens at step 0, so it shows a grid at once (and the
        # slider's far end the latest one) rather than "No image logged at this step"
        with evaluation_model(state) as ema_model:
            if val is not None:
                tracker.log_image("samples/grid",
                                  make_grid(generate(ema_model, val.grid_prompts, cfg, GRID_SEED, device)), 0)
    # the judge's classifier reads 32×32 digits: pixel space only (a latent set's test split holds latents)
    judged = ctx.is_main and cfg.eval.num_samples > 0 and not uses_vae(cfg.vae) and is_digit_data(test_set)
    judge = SampleJudge(cfg, train_set or read_split(cfg.data.parquet_dir, "train"), test_set, device) \
        if judged else None
    step_flops = partial(train_step_flops, cfg, tc.batch_size)  # of text length L: this worker's share of a step
    progress, started = Progress(step, batches.global_batch, device, step_flops), time.monotonic()
    budget_started = min(started, ctx.launched_at or started)  # local mode: the budget began with the command
    horizon.last_log_s = started - budget_started
    # the longest evaluation and checkpoint so far: the budget keeps their sum for the final step, which does both
    eval_s, save_s = 0.0, 0.0
    loss_sum, grad_sum, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    metrics: dict[str, float] = {}  # the latest log step's training metrics
    evaluated: dict[str, float] = {}  # the latest evaluation: every report carries it, so Tune always sees it
    checkpoint: str | None = str(resume) if resume is not None else None
    saved_step = step  # a resumed run's checkpoint is at its first step

    def checkpoint_data(at_step: int) -> CheckpointData | None:
        """What this rank writes at a save: the whole checkpoint on rank 0 and nothing on the others; or, sharded
        (FSDP), every rank its own shards, which the checkpoint backend writes as one checkpoint with one MANIFEST."""
        if not ctx.is_main and not state.plan.sharded:
            return None
        if ctx.is_main:
            tracker.flush()  # a run resumed from this checkpoint must find every step up to it logged
        return CheckpointData(at_step, cfg, *checkpoint_state(state), scheduler.state_dict(), rng_state(),
                              {"mlflow_run_id": run_id, "samples_seen": at_step * batches.global_batch,
                               **({"run_id": ctx.run_id} if ctx.run_id else {}),
                               "train_seconds": seconds_before + time.monotonic() - started,
                               "lr_horizon": horizon.steps}, sharded=state.plan.sharded)

    def stop_on_signal(signum: int, at_step: int, last_saved: int, last: str | None) -> NoReturn:
        """Save unless the last checkpoint is under a log interval old, then end the run naming what to resume."""
        if at_step - last_saved >= tc.log_every or (last is None and at_step > 0):
            report = {**metrics, **evaluated, **run_ref, "step": at_step}
            last = ctx.save_and_report(checkpoint_data(at_step), report) or last
            kept = f"saved {last}" if ctx.is_main else "rank 0 saved the checkpoint"
        else:
            kept = f"kept the checkpoint of step {last_saved}, less than train.log_every={tc.log_every} steps old" \
                if last else "nothing to save yet"
        resume = f"; continue with --resume {last}" if last and ctx.is_main else ""
        raise Interrupted(f"{signal_name(signum)}: stopped at step {at_step} and {kept}{resume}", signum)

    try:
        while step < tc.steps:
            batch = batches.get(step)
            loss, grad_norm = train_step(state, *batch, step)
            step += 1
            loss_sum, grad_sum, count = loss_sum + loss, grad_sum + grad_norm, count + 1
            budget_spent = False
            if plan_step(step, tc).log:
                mean_loss = ctx.all_reduce_mean(loss_sum / count).item()
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss is {mean_loss} at step {step}; stopped before saving. The last good checkpoint is "
                        f"{checkpoint or 'none (no checkpoint yet)'}. Lower train.lr or raise train.warmup_steps.")
                lr = scheduler.get_last_lr()[0]
                metrics = {"loss/train": mean_loss, "train/lr": lr, "train/grad_norm": (grad_sum / count).item()}
                now = time.monotonic()
                # reduced over ranks (max), so every rank projects the same stop and learning rate
                clocks = torch.tensor([now - started, now - budget_started, eval_s + save_s], dtype=torch.float64)
                elapsed, spent, reserve = ctx.all_reduce_max(clocks.to(device)).tolist()
                budget_spent = horizon.last_log_step(spent, reserve)  # measures the interval project() reads
                horizon.project(step, elapsed, spent, reserve)
                text_len = batch[1].shape[1]
                metrics.update(progress.tick(step, horizon.end, mean_loss, lr, text_len) if ctx.is_main else {})
                tracker.log_metrics(metrics, step)
                loss_sum, grad_sum, count = loss_sum * 0, grad_sum * 0, 0
            plan = plan_step(step, tc, budget_spent)
            if plan.evaluate:  # every rank: a sharded EMA is gathered onto rank 0
                eval_started = time.monotonic()
                with evaluation_model(state) as ema_model:
                    if ctx.is_main:
                        evaluated = validate_and_judge(ema_model, val, cfg, device, tracker, step, judge)
                eval_s = max(eval_s, time.monotonic() - eval_started)
            if plan.report:
                save_started = time.monotonic()
                data = checkpoint_data(step) if plan.checkpoint else None
                checkpoint = ctx.save_and_report(data, {**metrics, **evaluated, **run_ref, "step": step}) or checkpoint
                if plan.checkpoint:
                    save_s, saved_step = max(save_s, time.monotonic() - save_started), step
                progress.restart(step)
                if plan.log and plan.evaluate and plan.checkpoint and not plan.stop and tc.max_minutes > 0:
                    # this save may have used the room the log step saw; if so, it was the final one
                    clocks = torch.tensor([time.monotonic() - budget_started, eval_s + save_s], dtype=torch.float64)
                    spent, reserve = ctx.all_reduce_max(clocks.to(device)).tolist()
                    plan = replace(plan, stop=horizon.no_room_after_save(spent, reserve) and step < tc.steps)
            if (signum := ctx.stop_signal()) is not None:
                stop_on_signal(signum, step, saved_step, checkpoint)
            if plan.stop:
                print(f"sd3ray: train.max_minutes={tc.max_minutes} ends the run at step {step} (the next log step "
                      f"and the final save would pass it); stopped cleanly", flush=True)
                break
        exported = cfg.tracking.log_model or cfg.tracking.log_checkpoints != "none"
        weights, ema_weights = whole_state_dicts(state) if exported else ({}, {})  # FSDP: gathered on rank 0
        if ctx.is_main:
            finish_run(cfg, tracker, weights, ema_weights, step, checkpoint)
    except Interrupted:
        tracker.finish("KILLED")  # MLflow's status for a run a person stopped
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return TrainResult(step, checkpoint, run_id, {**metrics, **evaluated}, model)


def restore(path: Path, cfg: Config, state: TrainState) -> tuple[int, dict[str, Any]]:
    """Continue from a checkpoint of either layout, under any parallel plan (sd3ray.training.parallel)."""
    data = restore_training_state(path, cfg, state)
    torch.set_rng_state(data.rng["torch"])
    if "cuda" in data.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(data.rng["cuda"])
    print(f"sd3ray: resumed from {path} at step {data.step}", flush=True)
    return data.step, data.meta


def finish_run(cfg: Config, tracker: Tracker, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], step: int,
               checkpoint: str | None) -> None:
    """Record where the full checkpoint lives and, per tracking.log_checkpoints, upload the final weights."""
    if checkpoint:  # absolute: the tag is read from other folders and machines than the one that trained
        tracker.set_tags({"sd3ray.checkpoint_uri": checkpoint if is_uri(checkpoint) else
                          str(Path(checkpoint).resolve())})
    if cfg.tracking.log_model:
        tracker.log_model(cfg, step, ema, cfg.tracking.registered_model)
    if cfg.tracking.log_checkpoints == "none":
        return
    with tempfile.TemporaryDirectory() as tmp:
        export = CheckpointData(step, cfg, model, ema)
        tracker.log_artifact(write_checkpoint(Path(tmp) / "checkpoint", export, weights_only=True), "checkpoint")
