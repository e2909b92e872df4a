"""The GPU report: what one GPU does with sd3ray, in one command and one file.

Four sections, each written to the report as soon as it is measured (a run cut short keeps what it finished):
1. speed: the bf16 training step of sd3ray against diffusers' SD3Transformer2DModel, eager and compiled;
2. mfu: the largest batch that fits, found by doubling, with images/s, MFU and peak memory at each batch;
3. quality: the default model trained for a wall-clock budget, judged as it trains (prompt accuracy and
   classifier-FID against its floor), with the minutes at which each judgement was made, and the final model
   judged at several guidance scales;
4. levers: a config trained for a fixed number of steps under each of several sets of overrides (a levers file),
   judged along the way and at several guidance scales. Quality per optimizer step does not depend on the
   device, so a GPU compares in minutes the levers that a CPU's time budget (a known number of steps) would take
   hours to compare;
5. study: every trial of a sweep file with seeds (configs/sweeps/sd3_timesteps.yaml, SD3's timestep study) trained
   one after another, and the study's table of mean ± std over seeds per scheme beside SD3's Table 1 rank.

It needs torch and sd3ray's own dependencies only (no ray, no mlflow), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.speed import interleaved_seconds, mfu, model_step_rows
from benchmarks.step_speed import StepRunner
from sd3ray.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from sd3ray.data.format import read_split
from sd3ray.data.prepare import prepare_dataset
from sd3ray.evaluation.flops import peak_tflops, train_step_flops
from sd3ray.evaluation.judge import Reference, is_judge_metric, judge_settings, load_judge
from sd3ray.inference import load_ema_model
from sd3ray.sweeps.spec import SchemeSpec, SweepSpec, point_params, sweep_points, trial_config, trial_label
from sd3ray.sweeps.study import by_point, study_markdown, study_metrics
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train


@dataclass
class Report:
    """The report's sections as they are measured, saved as JSON and markdown after each one."""

    path: Path
    header: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, section: Any) -> None:
        self.sections[name] = section
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.header, **self.sections}, indent=2, default=str))
        self.path.with_suffix(".md").write_text(to_markdown(self.header, self.sections))


def speed_section(cfg: Config, device: torch.device, batch: int, context_len: int, with_diffusers: bool,
                  compile: bool, iters: int) -> list[dict[str, Any]]:
    """bf16 training-step rows: sd3ray and (when installed) diffusers, eager and compiled, timed in alternation."""
    rows = model_step_rows(cfg, batch, context_len, device, bf16=device.type == "cuda", compile=compile, warmup=2,
                           iters=iters, with_diffusers=with_diffusers)
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    for r in rows:
        r["mfu"] = mfu(cfg, batch, context_len, r["seconds_per_step"], peak) if peak else None
    return rows


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_batch_section(cfg: Config, device: torch.device, start: int, cap: int, iters: int,
                          compile_mode: str = "none") -> list[dict[str, Any]]:
    """The training step that trains (`sd3ray.training.step`, text encoder and real batches included, bf16 on a GPU)
    at batch start, 2·start, ... until it runs out of memory or reaches `cap`: images/s, MFU and peak memory."""
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    precision = "bf16" if device.type == "cuda" else "fp32"
    train_set = read_split(cfg.data.parquet_dir, "train")
    rows, batch = [], start
    while batch <= cap:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        batch_cfg = from_dict(apply_overrides(to_dict(cfg), [f"train.batch_size={batch}"]))
        try:
            runner = StepRunner(batch_cfg, train_set, compile_mode, precision, device)
            seconds = interleaved_seconds({"step": runner}, device, warmup=2, iters=iters)["step"]
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            rows.append({"batch": batch, "out_of_memory": True})
            break
        context_len = runner.batches.bank.ids.shape[1]
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        shown_mfu = train_step_flops(cfg, batch, context_len) / seconds / (peak * 1e12) if peak else None
        rows.append({"batch": batch, "out_of_memory": False, "images_per_s": batch / seconds, "mfu": shown_mfu,
                     "peak_memory_gib": memory, "compile": compile_mode})
        print(f"batch {batch}: {batch / seconds:.0f} images/s", flush=True)
        del runner
        batch *= 2
    return rows


class JudgementRecorder(NullTracker):
    """Keeps every evaluation's metrics with the wall-clock minutes since `started`."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started
        self.evaluations: list[dict[str, float]] = []
        self.constants: dict[str, float] = {}  # the judge's floor and the real data's diversity (params)

    def log_params(self, params: dict[str, float | int | str]) -> None:
        self.constants.update({k: float(v) for k, v in params.items() if is_judge_metric(k)})

    def set_tags(self, tags: dict[str, str]) -> None:  # the judge's constants (the floor) arrive as tags
        self.constants.update({k: float(v) for k, v in tags.items() if is_judge_metric(k)})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "loss/val" in metrics:
            self.evaluations.append({"step": step, "minutes": (time.monotonic() - self.started) / 60,
                                     **{k: v for k, v in metrics.items()
                                        if k == "loss/val" or (is_judge_metric(k) and "/accuracy_" not in k)},
                                     **self.constants})


def quality_config(cfg: Config, minutes: float, output_dir: str) -> Config:
    """The config trained against a wall-clock budget: enough steps that the budget, not the step count, ends it,
    and checkpoints only at the end (a mid-run 1 GB checkpoint would cost the budget time)."""
    steps = max(cfg.train.steps, 10**7)
    return from_dict(apply_overrides(to_dict(cfg), [f"train.max_minutes={minutes}", f"train.output_dir={output_dir}",
                                                    f"train.ckpt_every={steps}", "train.keep_checkpoints=1"]))


def reference_for(cfg: Config, device: torch.device) -> Reference:
    """The judge and the real features that `cfg`'s samples are compared with."""
    train_set, test_set = (read_split(cfg.data.parquet_dir, split) for split in ("train", "test"))
    return Reference(load_judge(train_set, device), train_set, test_set)


def judge_final(checkpoint: str | None, device: torch.device, guidances: list[float],
                reference: Reference) -> list[dict[str, float]]:
    """The run's final EMA weights judged at each guidance (the config's sampler and steps, same prompts and
    noise), so the guidance to ship is chosen on the same weights."""
    if not guidances or checkpoint is None:
        return []
    model, cfg, _ = load_ema_model(checkpoint, device)
    return judge_settings(model, cfg, reference, guidances, [cfg.sample.steps], cfg.eval.num_samples)


def quality_section(cfg: Config, minutes: float, device: torch.device,
                    guidances: list[float] = ()) -> dict[str, Any]:
    """Train `cfg` for `minutes` of wall clock (start-up, compilation and evaluations included) and return the
    judge's verdicts over time, the final one at `eval.num_samples` samples, then the final weights judged at
    each of `guidances` (after the clock stops)."""
    with tempfile.TemporaryDirectory(prefix="sd3ray-quality-") as tmp:
        run_cfg = quality_config(cfg, minutes, tmp)
        started = time.monotonic()
        prepare_dataset(run_cfg)
        recorder = JudgementRecorder(started)
        result = train(run_cfg, LocalContext(Path(tmp) / "run", device), recorder)
        wall = time.monotonic() - started
        final = judge_final(result.checkpoint, device, list(guidances), reference_for(run_cfg, device)) \
            if guidances else []
    return {"budget_minutes": minutes, "wall_minutes": wall / 60, "steps": result.step,
            "images_seen": result.step * cfg.train.batch_size, "guidance": cfg.sample.guidance,
            "sampler_steps": cfg.sample.steps, "num_samples": cfg.eval.num_samples,
            "evaluations": recorder.evaluations, "final_by_guidance": final}


@dataclass(frozen=True)
class LeverPlan:
    """A levers file: the config, the overrides every lever shares, the steps each trains, how often it is judged
    on the way, the guidances its final weights are judged at, and each lever's own overrides."""

    config: str
    base: list[str]
    steps: int
    judge_every: int
    guidances: list[float]
    levers: dict[str, list[str]]


def read_lever_plan(path: Path) -> LeverPlan:
    """Parse and check a levers file; every lever's config is built here, so a typo fails before any training."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"levers file {path}: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("levers"), dict) or not raw["levers"]:
        raise ConfigError(f"levers file {path}: needs a `levers:` mapping of label -> list of KEY=VALUE overrides")
    plan = LeverPlan(config=str(raw.get("config", "configs/mnist_tiny.yaml")), base=list(raw.get("base") or []),
                     steps=int(raw.get("steps", 1000)), judge_every=int(raw.get("judge_every", 0) or 0),
                     guidances=[float(g) for g in raw.get("guidances") or []],
                     levers={str(k): list(v or []) for k, v in raw["levers"].items()})
    for label in plan.levers:
        lever_config(plan, label, [])
    return plan


def lever_config(plan: LeverPlan, label: str, extra: list[str], output_dir: str = "runs") -> Config:
    """One lever's config: the plan's steps, judged every `judge_every` steps, one checkpoint at the end; the
    lever's overrides come last, so a lever may change the steps too."""
    steps = plan.steps
    sets = [f"train.steps={steps}", f"train.eval_every={plan.judge_every or steps}", f"train.ckpt_every={steps}",
            "train.keep_checkpoints=1", f"train.output_dir={output_dir}", *plan.base, *extra, *plan.levers[label]]
    try:
        cfg = load_config(plan.config, sets)
    except ConfigError as err:
        raise ConfigError(f"lever {label!r}: {err}") from None
    # a lever that changes the steps keeps one checkpoint, at its own end
    return from_dict(apply_overrides(to_dict(cfg), [f"train.ckpt_every={cfg.train.steps}"]))


def levers_section(plan: LeverPlan, device: torch.device, extra: list[str] = (), max_minutes: float = 0.0,
                   on_lever: Callable[[dict[str, Any]], None] = lambda section: None) -> dict[str, Any]:
    """Train each lever of `plan` from scratch and judge it; levers not started within `max_minutes` (0: no
    limit) are listed as skipped, so a report cut to fit a machine's time still says what it left out.
    `on_lever` gets the section so far after each lever (the report saves it: a killed run keeps those)."""
    started, rows, reference = time.monotonic(), [], None
    section = {"config": plan.config, "base": plan.base, "steps": plan.steps, "levers": rows}
    for label, overrides in plan.levers.items():
        if max_minutes and time.monotonic() - started > 60 * max_minutes:
            rows.append({"label": label, "overrides": overrides, "skipped": True})
            continue
        with tempfile.TemporaryDirectory(prefix="sd3ray-lever-") as tmp:
            cfg = lever_config(plan, label, list(extra), tmp)
            prepare_dataset(cfg)
            reference = reference or reference_for(cfg, device)
            lever_started = time.monotonic()
            recorder = JudgementRecorder(lever_started)
            result = train(cfg, LocalContext(Path(tmp) / "run", device), recorder)
            seconds = time.monotonic() - lever_started
            final = judge_final(result.checkpoint, device, plan.guidances, reference)
        rows.append({"label": label, "overrides": overrides, "skipped": False, "steps": result.step,
                     "train_seconds": seconds, "guidance": cfg.sample.guidance, "num_samples": cfg.eval.num_samples,
                     "evaluations": recorder.evaluations, "final_by_guidance": final})
        print(f"lever {label}: {result.step} steps in {seconds:.0f} s", flush=True)
        on_lever(section)
    return section


def study_section(spec: SweepSpec, device: torch.device, extra: list[str] = (), max_minutes: float = 0.0,
                  on_trial: Callable[[dict[str, Any]], None] = lambda section: None) -> dict[str, Any]:
    """A sweep file's trials (SD3's timestep study: each scheme × seeds) trained here one after another, without
    Ray or MLflow, each judged at its end as `jobs/tune.py` judges it; then the study's table, mean ± std over seeds
    per point beside SD3's Table 1 rank (sd3ray.sweeps.study). Trials not started within `max_minutes` are listed
    as skipped and left out of the means."""
    if any(dim.kind != "grid" for dim in spec.space):
        raise ConfigError("the GPU report runs a sweep's grid only: give every space: entry as a list of values")
    started, rows = time.monotonic(), []
    section: dict[str, Any] = {"sweep": spec.name, "metric": spec.metric, "trials": rows, "table": ""}
    for point in sweep_points(spec):
        params = point_params(point)
        row = {"trial": trial_label(params), "width": params["width"],
               "scheme": SchemeSpec(**params["scheme"]).label, "seed": params.get("seed", 0)}
        if max_minutes and time.monotonic() - started > 60 * max_minutes:
            rows.append({**row, "status": "skipped"})
            continue
        with tempfile.TemporaryDirectory(prefix="sd3ray-study-") as tmp:
            cfg = trial_config(spec, params, [f"train.output_dir={tmp}", "train.keep_checkpoints=1", *extra])
            prepare_dataset(cfg)
            trial_started = time.monotonic()
            recorder = JudgementRecorder(trial_started)
            result = train(cfg, LocalContext(Path(tmp) / "run", device), recorder)
        final = recorder.evaluations[-1] if recorder.evaluations else {}
        rows.append({**row, "status": "finished" if result.step >= cfg.train.steps else "stopped early",
                     "step": result.step, "train_seconds": time.monotonic() - trial_started,
                     **{key: final.get(key) for key in study_metrics(spec)}})
        print(f"study {row['trial']}: {result.step} steps in {rows[-1]['train_seconds']:.0f} s, "
              f"{spec.metric} {final.get(spec.metric)}", flush=True)
        section["table"] = study_markdown(by_point(rows, spec), spec)
        on_trial(section)
    section["minutes"] = (time.monotonic() - started) / 60
    return section


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def to_markdown(header: dict[str, Any], sections: dict[str, Any]) -> str:
    lines = [f"# sd3ray GPU report: {header['device']}", "",
             f"torch {header['torch']}, config {header['config']}, {header['date']}", ""]
    if speed := sections.get("speed"):
        eager = next((r for r in speed if r["model"] == "diffusers" and not r["compiled"]), None)
        lines += [f"## The MM-DiT alone under the library's training step, {header['precision']}, "
                  f"batch {header['batch']}", "",
                  "| model | compiled | images/s | vs diffusers eager | MFU |", "|---|---|---|---|---|"]
        for r in speed:
            ratio = f"{r['images_per_s'] / eager['images_per_s']:.2f}×" if eager else "-"
            lines.append(f"| {r['model']} | {r['compiled']} | {r['images_per_s']:.0f} | {ratio} | "
                         f"{_fmt(r.get('mfu'), '.1%')} |")
        lines.append("")
    if mfu_rows := sections.get("mfu"):
        lines += [f"## Largest batch: the training step (sd3ray.training.step, text encoder included), "
                  f"{header['precision']}, compile {mfu_rows[0].get('compile', 'none')}", "",
                  "| batch | images/s | MFU | peak memory (GiB) |", "|---|---|---|---|"]
        for r in mfu_rows:
            if r["out_of_memory"]:
                lines.append(f"| {r['batch']} | out of memory | | |")
            else:
                lines.append(f"| {r['batch']} | {r['images_per_s']:.0f} | {_fmt(r['mfu'], '.1%')} | "
                             f"{_fmt(r['peak_memory_gib'], '.1f')} |")
        lines.append("")
    if quality := sections.get("quality"):
        lines += [f"## Time to quality: {quality['budget_minutes']:g} minutes of wall clock", "",
                  f"{quality['steps']} steps, {quality['images_seen']} images, {quality['wall_minutes']:.1f} min "
                  f"from start to final checkpoint; judged at guidance {quality['guidance']:g}, "
                  f"{quality['sampler_steps']} Euler steps, {quality['num_samples']} samples", "",
                  "| step | minutes | val loss | prompt accuracy | cFID | floor | cFID / floor |",
                  "|---|---|---|---|---|---|---|"]
        for e in quality["evaluations"]:
            lines.append(f"| {e['step']} | {e['minutes']:.1f} | {e['loss/val']:.4f} | "
                         f"{_fmt(e.get('samples/accuracy'), '.3f')} | {_fmt(e.get('val/cfid'), '.2f')} | "
                         f"{_fmt(e.get('val/cfid_floor'), '.2f')} | {_fmt(e.get('samples/cfid_ratio'), '.2f')} |")
        lines += guidance_table(quality.get("final_by_guidance") or [], "the run")
        lines.append("")
    if section := sections.get("levers"):
        levers = section["levers"]
        base = " ".join(f"`{o}`" for o in section["base"]) or "none"
        lines += [f"## Levers: {section['config']}, quality per optimizer step", "",
                  f"Every lever trains {section['steps']} steps unless it says otherwise; shared overrides: {base}.",
                  "",
                  "| lever | overrides | step | val loss | prompt accuracy | cFID | cFID / floor | diversity |",
                  "|---|---|---|---|---|---|---|---|"]
        for lever in levers:
            overrides = " ".join(f"`{o}`" for o in lever["overrides"]) or "-"
            if lever["skipped"]:
                lines.append(f"| {lever['label']} | {overrides} | not run (time) | | | | | |")
            for e in lever.get("evaluations", []):
                lines.append(f"| {lever['label']} | {overrides} | {e['step']} | {e['loss/val']:.4f} | "
                             f"{_fmt(e.get('samples/accuracy'), '.3f')} | {_fmt(e.get('val/cfid'), '.1f')} | "
                             f"{_fmt(e.get('samples/cfid_ratio'), '.2f')} | "
                             f"{_fmt(e.get('samples/diversity'), '.2f')} |")
        lines.append("")
        for lever in levers:
            lines += guidance_table(lever.get("final_by_guidance") or [], f"lever {lever['label']}")
        lines.append("")
    if study := sections.get("study"):
        done = sum(t["status"] == "finished" for t in study["trials"])
        took = f", {study['minutes']:.1f} min" if "minutes" in study else ""
        lines += [f"## Study: {study['sweep']}, {done} of {len(study['trials'])} trials finished{took}", "",
                  study["table"], ""]
    return "\n".join(lines)


def guidance_table(rows: list[dict[str, float]], what: str) -> list[str]:
    if not rows:
        return []
    lines = ["", f"Final weights of {what} at each guidance ({rows[0]['steps']} sampler steps):", "",
             "| guidance | prompt accuracy | cFID | cFID / floor | diversity (real) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']:g} | {r['samples/accuracy']:.3f} | {r['val/cfid']:.1f} | "
                     f"{r['samples/cfid_ratio']:.2f} | {r['samples/diversity']:.2f} ({r['val/diversity_real']:.2f}) |")
    return lines
