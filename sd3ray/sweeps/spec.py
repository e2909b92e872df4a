"""A sweep's spec: Ray Tune sweeps over model width and timestep-sampling scheme (SD3's central ablation), read from
YAML, validated against the config tree, and turned into each trial's config overrides and label.

Trials are ranked by a metric that does not depend on the scheme under test (the fixed-t validation loss or the
judge's scores), optionally with ASHA early stopping. One parent MLflow run holds the sweep; each trial is a nested
child run (`sd3ray.sweeps.tuner` runs them).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
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
    labels = [scheme.label for scheme in spec.schemes]
    if len(set(labels)) < len(labels):  # a trial's scheme is found by its label
        twice = sorted({label for label in labels if labels.count(label) > 1})
        raise ConfigError(f"schemes: {', '.join(twice)} is given twice; give each scheme once (seeds: N repeats it)")
    if spec.metric in RENAMED_METRICS:
        raise ConfigError(f"metric {spec.metric} is now called {RENAMED_METRICS[spec.metric]}: write metric: "
                          f"{RENAMED_METRICS[spec.metric]} in {path}")
    base = base_config(spec)  # fail now, not in every trial
    check_reports(spec, base)
    check_space(spec)
    check_points(spec)
    check_asha(spec.asha, base.train.steps)
    if spec.max_failures < 0:
        raise ConfigError(f"max_failures ({spec.max_failures}) must be >= 0 (0: a lost worker fails its trial)")
    return spec


def check_reports(spec: SweepSpec, cfg: Config) -> None:
    """A trial's config must put the ranking metric in every report Tune gets, or Tune fails the trial at its first
    report: reports happen at eval and checkpoint steps, and a judge metric needs the judge on."""
    if cfg.train.ckpt_every % cfg.train.eval_every:
        raise ConfigError(f"train.ckpt_every ({cfg.train.ckpt_every}) must be a multiple of train.eval_every "
                          f"({cfg.train.eval_every}) in a sweep, so every report carries {spec.metric}")
    if is_judge_metric(spec.metric) and cfg.eval.num_samples == 0:
        raise ConfigError(f"metric {spec.metric} needs the judge: set eval.num_samples > 0 in overrides")


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


# The trial's params that the named dimensions fill, and the config key each sets (width and scheme apart)
PARAM_KEYS = {"depth": "model.depth", "lr": "train.lr", "shift": "flow.shift", "seed": "train.seed"}


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
    if spec.head_dim < 1:  # heads = width // head_dim in every trial
        raise ConfigError(f"head_dim ({spec.head_dim}) must be a positive integer: each trial's model.num_heads is "
                          f"model.width / head_dim")
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


# Above this many grid points, each value is built once beside the others' first values instead of every
# combination: building a config takes a few milliseconds, and a sweep file should load in about a second
MAX_CHECKED_POINTS = 256


@dataclass(frozen=True)
class Axis:
    """One swept param as the check walks it: where the trial's params hold it (`param`, and `key` under "set"), the
    config key a person reads, and the values a trial may get, each with how it was chosen."""

    param: str
    key: str
    values: tuple[tuple[Any, str], ...]


def dimension_draws(dim: Dimension) -> list[tuple[Any, str]]:
    """The values of a `space:` entry that a trial may get, with a note for those a distribution draws: every value
    of a grid or choice; the ends of a range, as Tune draws them (uniform and loguniform give floats; randint
    excludes its high end)."""
    if dim.kind in ("grid", "choice"):
        return [(value, "") for value in dim.values]
    low, high = dim.values
    span = f"{dim.kind} {list(dim.values)}"
    if dim.kind == "randint":
        return [(low, f"the lowest draw of {span}"), (high - 1, f"the highest draw of {span}")]
    return [(float(low), f"the low end of {span}"), (float(high), f"the high end of {span}")]


def point_axes(spec: SweepSpec) -> list[Axis]:
    """Every dimension of the sweep, in the order of a trial's label."""
    shown = {"width": "model.width", "scheme": "flow", **PARAM_KEYS}
    axes = [Axis(name, shown[name], tuple((v, "") for v in values)) for name, values in named_values(spec).items()]
    axes += [Axis("set", dim.key, tuple(dimension_draws(dim))) for dim in spec.space]
    if spec.seeds > 1:
        axes.append(Axis("seed", "train.seed", tuple((seed, "") for seed in range(spec.seeds))))
    return axes


def sweep_points(spec: SweepSpec) -> Iterator[list[tuple[Axis, Any, str]]]:
    """Each point a trial may run at, as (axis, value, note) triples: every combination of the axes, or past
    MAX_CHECKED_POINTS every value of each axis once, beside the first value of every other."""
    axes = point_axes(spec)
    if math.prod(len(axis.values) for axis in axes) <= MAX_CHECKED_POINTS:
        for combo in itertools.product(*(axis.values for axis in axes)):
            yield [(axis, value, note) for axis, (value, note) in zip(axes, combo)]
        return
    for i, axis in enumerate(axes):
        for value, note in axis.values:
            yield [(other, *(other.values[0] if j != i else (value, note))) for j, other in enumerate(axes)]


def point_params(point: list[tuple[Axis, Any, str]]) -> dict[str, Any]:
    """A point as the params Tune hands the trial (`search_space`'s layout)."""
    params: dict[str, Any] = {}
    for axis, value, _ in point:
        if axis.param == "set":
            params.setdefault("set", {})[axis.key] = value
        else:
            params[axis.param] = value
    return params


def point_text(point: list[tuple[Axis, Any, str]]) -> str:
    """`model.width=130, flow=uniform, train.lr=0.0001 (the low end of loguniform [0.0001, 0.001])`"""
    def shown(axis: Axis, value: Any) -> str:
        return SchemeSpec(**value).label if axis.param == "scheme" else json.dumps(value).strip('"')

    return ", ".join(f"{axis.key}={shown(axis, value)}" + (f" ({note})" if note else "") for axis, value, note in point)


def check_points(spec: SweepSpec) -> None:
    """Build each point's training config as its trial will (`trial_config`), with the same checks, so a point no
    trial can run stops the sweep file from loading instead of failing its trials one by one in Tune."""
    for point in sweep_points(spec):
        try:
            check_reports(spec, trial_config(spec, point_params(point)))
        except ConfigError as exc:
            raise ConfigError(f"sweep point {point_text(point)} cannot run: {exc}") from None


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
        raise ConfigError(f"model.width: {width} is not a multiple of head_dim {head_dim}, so the heads (width / "
                          f"head_dim) would not divide it; sweep widths that are multiples of {head_dim} or change "
                          f"head_dim")
    out += [f"flow.{k}={v}" for k, v in params["scheme"].items()]
    for key, name in PARAM_KEYS.items():
        if key in params:
            out.append(f"{name}={params[key]}")
    out += [f"{key}={json.dumps(value)}" for key, value in params.get("set", {}).items()]
    return out


def trial_config(spec: SweepSpec, params: dict[str, Any], extra: Sequence[str] = ()) -> Config:
    """One trial's training config: the base config, the sweep's overrides, the trial's point, then `extra`."""
    return load_config(spec.base_config, [*spec.overrides, *trial_overrides(params, spec.head_dim), *extra])


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


def resolved_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as Tune holds them, with the scheme's label turned back into its flow keys (a sweep saved
    before labels were used holds the dict itself)."""
    if not isinstance(params["scheme"], str):
        return params
    schemes = {scheme.label: vars(scheme) for scheme in spec.schemes}
    return {**params, "scheme": dict(schemes[params["scheme"]])}


def named_values(spec: SweepSpec) -> dict[str, list[Any]]:
    """The named dimensions as the trial's params hold them: width, scheme (a dict of flow keys), depth, lr, shift."""
    dims: dict[str, list[Any]] = {
        "width": list(spec.widths),
        "scheme": [{k: v for k, v in vars(s).items()} for s in spec.schemes],
    }
    for key, values in (("depth", spec.depths), ("lr", spec.learning_rates), ("shift", spec.shifts)):
        if values:
            dims[key] = list(values)
    return dims


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param space. A scheme is there as its label (`logit_normal(0,1)`), which Tune's status table shows
    whole; its dict of flow keys would be cut to its tail. `resolved_params` turns the label back."""
    from ray import tune

    pick = tune.grid_search if spec.search == "grid" else tune.choice
    values = {**named_values(spec), "scheme": [scheme.label for scheme in spec.schemes]}
    params: dict[str, Any] = {k: pick(v) for k, v in values.items()}
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
