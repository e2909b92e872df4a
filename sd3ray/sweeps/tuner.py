"""The Ray Tune side of a sweep. Each trial is one Ray Train run (the Train V2 pattern: the trial function builds and
fits a TorchTrainer, and `TuneReportCallback` forwards rank 0's reports to Tune); this module sets the trials'
resources, how many run at once, and the ASHA scheduler.
"""

from __future__ import annotations

from typing import Any

from sd3ray.config import (
    ConfigError,
    build_dataclass,
)
from sd3ray.storage import join
from sd3ray.sweeps.spec import (
    SweepSpec,
    base_config,
    resolved_params,
    search_space,
    spec_dict,
    sweep_root,
    sweep_storage,
    trial_config,
    trial_label,
)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trial function: one TorchTrainer fit whose rank-0 reports reach Tune via TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sd3ray.cluster.trainer import build_trainer

    spec = build_dataclass(SweepSpec, config["spec"])
    params = resolved_params(spec, config["params"])
    label = trial_label(params)
    cfg = trial_config(spec, params,
                       [f"tracking.run_name={label}", f"tracking.parent_run_id={config['parent']}"])
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, f"{label}-{trial_id}", workers=spec.workers_per_trial, use_gpu=spec.use_gpu,
                            storage_path=join(config["storage"], "trials"), tracking=config["tracking"],
                            callbacks=[TuneReportCallback()], cpus_per_worker=spec.cpus_per_worker,
                            max_failures=spec.max_failures)
    trainer.fit()


# Ray's own name for a resource only the head node has (ray._common.constants.HEAD_NODE_RESOURCE_NAME)
HEAD_NODE_RESOURCE = "node:__internal_head__"


def trial_resources() -> dict[str, float]:
    """The trial function only waits on TorchTrainer.fit(); its workers hold the CPUs and GPUs. Tune cannot schedule
    a trial that asks for nothing, and even a sliver of CPU would stop trials from packing the cluster exactly, so
    the trial driver reserves a little memory instead.

    It runs on the head node (a thousandth of the head's marker, as Ray's own state actor asks): Train's controller
    follows its driver's node, so a trial driver on a worker node that is lost (a spot instance) fails a trial whose
    workers were elsewhere, and a sweep that loses the head is lost anyway."""
    return {"CPU": 0, "memory": 64 * 2**20, HEAD_NODE_RESOURCE: 0.001}


def concurrency(spec: SweepSpec) -> int:
    """How many trials fit at once on the cluster, each holding `workers_per_trial` workers."""
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    resources = ray.cluster_resources()
    if spec.use_gpu:
        return max(1, int(resources.get("GPU", 0) // spec.workers_per_trial))
    return max(1, int(resources.get("CPU", 0) // (spec.workers_per_trial * spec.cpus_per_worker)))


def build_tuner(spec: SweepSpec, parent_run_id: str, tracking: bool):
    """Tune's state and the trials' checkpoints go to `sweep_storage(spec)`, a folder or a URI."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base = base_config(spec)
    scheduler = FIFOScheduler()
    if spec.asha.enabled:
        # stop_last_trials=False: a trial that reaches max_t ends by itself. Ray's default stops it at its final
        # report, which kills its workers before they log the model and close the MLflow run: the best trial of
        # every ASHA sweep had no model to register and stayed RUNNING in MLflow
        scheduler = ASHAScheduler(time_attr="step", max_t=base.train.steps, grace_period=spec.asha.grace_period,
                                  reduction_factor=spec.asha.reduction_factor, stop_last_trials=False)
    search_alg = None
    if spec.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise ConfigError("search: optuna needs `pip install optuna`") from exc
        search_alg = OptunaSearch()
    trainable = tune.with_resources(run_trial, trial_resources())
    param_space = {**search_space(spec), "spec": spec_dict(spec), "parent": parent_run_id,
                   "storage": sweep_storage(spec), "tracking": tracking}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=spec.num_samples, max_concurrent_trials=concurrency(spec),
                                    trial_name_creator=lambda t: trial_label(resolved_params(spec,
                                                                                             t.config["params"]))),
        run_config=tune.RunConfig(name=spec.name, storage_path=sweep_root(spec),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )
