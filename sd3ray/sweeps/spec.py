"""A sweep's spec: Ray Tune sweeps over model width and timestep-sampling scheme (SD3's central ablation), read from
YAML, validated against the config tree, and turned into each trial's config overrides and label.

Trials are ranked by a metric that does not depend on the scheme under test (the fixed-t validation loss or the
judge's scores), optionally with ASHA early stopping. One parent MLflow run holds the sweep; each trial is a nested
child run (`sd3ray.sweeps.tuner` runs them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sd3ray.config import (
    Config,
    ConfigError,
    FlowConfig,
    TimestepScheme,
    apply_overrides,
    build_dataclass,
    load_config,
    read_yaml_file,
)
from sd3ray.evaluation.judge import is_judge_metric
from sd3ray.storage import is_uri, join

# metric keys as sweep files named them before they were grouped for MLflow's UI (docs/tracking.md)
RENAMED_METRICS = {"val/loss": "loss/val", "train/loss": "loss/train", "judge/prompt_accuracy": "samples/accuracy",
                   "judge/fid_ratio": "samples/cfid_ratio", "judge/fid": "val/cfid",
                   "judge/diversity": "samples/diversity"}


@dataclass(frozen=True)
class SchemeSpec:
    """One timestep-sampling scheme with its parameters."""

    scheme: TimestepScheme
    # the defaults are the training config's, so a sweep's bare "logit_normal" is the scheme training would use
    logit_mean: float = FlowConfig.logit_mean
    logit_std: float = FlowConfig.logit_std
    mode_scale: float = FlowConfig.mode_scale

    @property
    def label(self) -> str:
        match self.scheme:
            case "logit_normal":
                return f"logit_normal({self.logit_mean:g},{self.logit_std:g})"
            case "mode":
                return f"mode({self.mode_scale:g})"
        return self.scheme


@dataclass(frozen=True)
class AshaSpec:
    enabled: bool = True
    grace_period: int = 100  # steps every trial runs before it can be stopped
    reduction_factor: int = 2


Distribution = Literal["grid", "choice", "uniform", "loguniform", "randint"]


@dataclass(frozen=True)
class Dimension:
    """One free-form dimension of `space:`: a dotted config key and its values (a list: grid) or a Tune
    distribution over them (`{choice: [...]}`, `{uniform: [a, b]}`, `{loguniform: [a, b]}`, `{randint: [a, b]}`)."""

    key: str
    values: tuple[Any, ...]
    kind: Distribution = "grid"

    @property
    def label(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SweepSpec:
    """configs/tune_*.yaml: the base training config plus the dimensions to sweep."""

    base_config: str = "configs/mnist_tiny.yaml"
    overrides: tuple[str, ...] = ()
    name: str = "tune-mnist"
    storage_path: str = "runs/tune"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1  # grid: repeats of the grid; random/optuna: total trials
    metric: str = "loss/val"
    mode: Literal["min", "max"] = "min"
    widths: tuple[int, ...] = (64, 128)
    head_dim: int = 32  # heads = width / head_dim: heads scale with width
    schemes: tuple[SchemeSpec, ...] = (SchemeSpec("uniform"), SchemeSpec("logit_normal"))
    depths: tuple[int, ...] = ()
    learning_rates: tuple[float, ...] = ()
    shifts: tuple[float, ...] = ()
    # any other config key: `space: {sample.guidance: [1.5, 2.5], train.lr: {loguniform: [1e-4, 1e-3]}}`
    space: tuple[Dimension, ...] = ()
    seeds: int = 1  # repeat every point with train.seed = 0 .. seeds-1
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    # restarts of a trial from its newest checkpoint when a worker (or its node) is lost; 0 = the trial fails
    max_failures: int = 0
    asha: AshaSpec = field(default_factory=AshaSpec)
    registered_model: str = ""  # register the best trial's model under this name when the sweep ends


def load_sweep(path: str | Path, overrides: list[str] | None = None, config_overrides: list[str] = ()) -> SweepSpec:
    """A sweep file with `--set` overrides of its own keys, and `config_overrides` appended to every trial's
    training config (the jobs' data flags)."""
    from dataclasses import replace

    data = apply_overrides(read_yaml_file(path, "sweep file", "configs/tune_*.yaml"), overrides or [])
    moved: dict[str, str] = {}  # named dimension -> the space: key it was written as
    if isinstance(data.get("space"), dict):
        data, moved = named_dimensions_from_space(data)
        data["space"] = [dimension_dict(key, value) for key, value in data["space"].items()]
    try:
        spec = build_dataclass(SweepSpec, data)
    except ConfigError as exc:  # name the entry as the file wrote it: space: flow[0].scheme, not schemes[0].scheme
        named = next((name for name in moved if str(exc).startswith(name)), None)
        if named is None:
            raise
        raise ConfigError(f"space: {moved[named]}{str(exc)[len(named):]}") from None
    spec = replace(spec, overrides=(*spec.overrides, *config_overrides))
    if not spec.widths or not spec.schemes:
        raise ConfigError("widths and schemes: give at least one value each")
    base = base_config(spec)  # fail now, not in every trial
    # Tune needs the ranking metric in every report; reports happen at eval and checkpoint steps.
    if base.train.ckpt_every % base.train.eval_every:
        raise ConfigError(f"train.ckpt_every ({base.train.ckpt_every}) must be a multiple of train.eval_every "
                          f"({base.train.eval_every}) in a sweep, so every report carries {spec.metric}")
    if spec.metric in RENAMED_METRICS:
        raise ConfigError(f"metric {spec.metric} is now called {RENAMED_METRICS[spec.metric]}: write metric: "
                          f"{RENAMED_METRICS[spec.metric]} in {path}")
    if is_judge_metric(spec.metric) and base.eval.num_samples == 0:
        raise ConfigError(f"metric {spec.metric} needs the judge: set eval.num_samples > 0 in overrides")
    check_space(spec)
    check_asha(spec.asha, base.train.steps)
    if spec.max_failures < 0:
        raise ConfigError(f"max_failures ({spec.max_failures}) must be >= 0 (0: a lost worker fails its trial)")
    return spec


def sweep_root(spec: SweepSpec) -> str:
    """`storage_path` as every node reads it: a URI as given, a folder made absolute."""
    return spec.storage_path if is_uri(spec.storage_path) else str(Path(spec.storage_path).resolve())


def sweep_storage(spec: SweepSpec) -> str:
    """Where the sweep keeps Tune's state and every trial's checkpoints: `storage_path/name`, a folder or a URI
    (`s3://bucket/x?endpoint_override=...` keeps its query)."""
    return join(sweep_root(spec), spec.name)


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")

# `space:` entries that are the named dimensions written in space's form: a width sets the heads with it
# (width / head_dim) and a scheme is several flow keys at once, so each stays one dimension with a readable label
SPACE_NAMED = {"model.width": ("widths", "[64, 128]"),
               "flow": ("schemes", "[{scheme: uniform}, {scheme: logit_normal, logit_mean: 0.0, logit_std: 1.0}]")}


def named_dimensions_from_space(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """`space: {model.width: [...], flow: [{scheme: ...}, ...]}` as the sweep's widths and schemes; also which
    named dimension came from which `space:` key."""
    space = dict(data["space"])
    out, moved = dict(data), {}
    for key, (named, example) in SPACE_NAMED.items():
        if key not in space:
            continue
        values = space.pop(key)
        if not isinstance(values, list):
            raise ConfigError(f"space: {key} takes a list of values, e.g. {key}: {example}; got {values!r}")
        if named in data:
            raise ConfigError(f"space: {key} and {named}: give these values once, under space: {key}")
        out[named], moved[named] = values, key
    out["space"] = space
    return out, moved


def dimension_dict(key: Any, value: Any) -> dict[str, Any]:
    """A `space:` entry as a Dimension's fields: a list is a grid, a one-key mapping a Tune distribution."""
    if isinstance(value, list):
        return {"key": key, "values": value, "kind": "grid"}
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
        kind, values = next(iter(value.items()))
        if not isinstance(values, list):
            raise ConfigError(f"space: {key}: {kind} takes a list, e.g. {{{kind}: [1, 2]}}")
        return {"key": key, "values": values, "kind": kind}
    raise ConfigError(f"space: {key}: expected a list of values or one of {{choice: [...]}}, {{uniform: [a, b]}}, "
                      f"{{loguniform: [a, b]}}, {{randint: [a, b]}}; got {value!r}")


# the keys the named dimensions set: sweeping one of them in `space:` too would make the trial's label lie
SCHEMES = "flow (a list of schemes)"
NAMED_KEYS = {"model.num_heads": "model.width (heads follow width / head_dim)", "flow.scheme": SCHEMES,
              "flow.logit_mean": SCHEMES, "flow.logit_std": SCHEMES, "flow.mode_scale": SCHEMES,
              "model.depth": "depths", "train.lr": "learning_rates", "flow.shift": "shifts", "train.seed": "seeds"}


def check_space(spec: SweepSpec) -> None:
    """Every `space:` key must be a config key that takes every value it may get; the same one-line errors as
    `--set KEY=VALUE`, naming the key."""
    if spec.seeds < 1:
        raise ConfigError(f"seeds ({spec.seeds}) must be at least 1")
    named = {"model.depth": spec.depths, "train.lr": spec.learning_rates, "flow.shift": spec.shifts,
             "train.seed": spec.seeds > 1}
    seen = set()
    for dim in spec.space:
        if dim.key in seen:
            raise ConfigError(f"space: {dim.key} is given twice")
        seen.add(dim.key)
        if dim.key in NAMED_KEYS and named.get(dim.key, True):
            raise ConfigError(f"space: {dim.key} is swept by {NAMED_KEYS[dim.key]}: give its values there")
        if not dim.values:
            raise ConfigError(f"space: {dim.key}: give at least one value")
        if dim.kind in ("uniform", "loguniform", "randint"):
            if len(dim.values) != 2 or not all(isinstance(v, (int, float)) for v in dim.values) \
                    or not dim.values[0] < dim.values[1]:
                raise ConfigError(f"space: {dim.key}: {dim.kind} takes [low, high] with low < high; got "
                                  f"{list(dim.values)}")
            if dim.kind == "loguniform" and dim.values[0] <= 0:
                raise ConfigError(f"space: {dim.key}: loguniform needs low > 0; got {dim.values[0]}")
            if dim.kind == "randint" and not all(isinstance(v, int) for v in dim.values):
                raise ConfigError(f"space: {dim.key}: randint takes integer bounds; got {list(dim.values)}")
        for value in dim.values:  # the config checks the key and the value's type, as for --set
            try:
                load_config(spec.base_config, [*spec.overrides, f"{dim.key}={json.dumps(value)}"])
            except ConfigError as exc:
                raise ConfigError(f"space: {exc}") from None


def check_asha(asha: AshaSpec, steps: int) -> None:
    """Ray Tune asserts these deep inside the first trial; say it when the sweep file loads instead."""
    if not asha.enabled:
        return
    if not 1 <= asha.grace_period <= steps:
        raise ConfigError(f"asha.grace_period ({asha.grace_period}) must be between 1 and train.steps ({steps}): "
                          f"every trial runs at least that many steps. Lower asha.grace_period or raise train.steps")
    if asha.reduction_factor < 2:
        raise ConfigError(f"asha.reduction_factor ({asha.reduction_factor}) must be at least 2 (ASHA keeps 1 in "
                          f"reduction_factor trials at each rung)")


def trial_overrides(params: dict[str, Any], head_dim: int) -> list[str]:
    """The --set overrides one trial applies to the base config."""
    width = params["width"]
    out = [f"model.width={width}", f"model.num_heads={max(1, width // head_dim)}"]
    if width % head_dim:
        raise ConfigError(f"width {width} is not a multiple of head_dim {head_dim}: heads would not divide it")
    out += [f"flow.{k}={v}" for k, v in params["scheme"].items()]
    for key, name in (("depth", "model.depth"), ("lr", "train.lr"), ("shift", "flow.shift"), ("seed", "train.seed")):
        if key in params:
            out.append(f"{name}={params[key]}")
    out += [f"{key}={json.dumps(value)}" for key, value in params.get("set", {}).items()]
    return out


def trial_label(params: dict[str, Any]) -> str:
    label = f"w{params['width']}-{SchemeSpec(**params['scheme']).label}"
    for key in ("depth", "lr", "shift"):
        if key in params:
            label += f"-{key}{params[key]:g}"
    for key, value in params.get("set", {}).items():
        label += f"-{key.rsplit('.', 1)[-1]}{value:.3g}" if isinstance(value, float) else \
            f"-{key.rsplit('.', 1)[-1]}{value}"
    if "seed" in params:
        label += f"-seed{params['seed']}"
    return label


def search_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    dims: dict[str, list[Any]] = {
        "width": list(spec.widths),
        "scheme": [{k: v for k, v in vars(s).items()} for s in spec.schemes],
    }
    for key, values in (("depth", spec.depths), ("lr", spec.learning_rates), ("shift", spec.shifts)):
        if values:
            dims[key] = list(values)
    pick = tune.grid_search if spec.search == "grid" else tune.choice
    params: dict[str, Any] = {k: pick(v) for k, v in dims.items()}
    distributions = {"grid": pick, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
                     "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    if spec.space:
        params["set"] = {dim.key: distributions[dim.kind](list(dim.values)) for dim in spec.space}
    if spec.seeds > 1:  # every point, seeds times, whatever the search
        params["seed"] = tune.grid_search(list(range(spec.seeds)))
    return {"params": params}


def spec_dict(spec: SweepSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(spec)))


def base_config(spec: SweepSpec) -> Config:
    return load_config(spec.base_config, list(spec.overrides))
