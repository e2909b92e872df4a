"""A real CPU sweep on the shared Ray head: ASHA stops trials without leaking their resources, failures are
recorded without stopping the sweep, and the parent/child MLflow runs hold what a person reviews."""


import pytest

from sd3ray.sweeps.spec import load_sweep, trial_label, trial_overrides
from tests.support import sweep_file


def test_trial_settings_follow_the_sweep() -> None:
    params = {"width": 128, "scheme": {"scheme": "mode", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29},
              "lr": 0.002}
    assert trial_label(params) == "w128-mode(1.29)-lr0.002"
    assert trial_overrides(params, head_dim=32)[:2] == ["model.width=128", "model.num_heads=4"]
    assert "flow.scheme=mode" in trial_overrides(params, 32) and "train.lr=0.002" in trial_overrides(params, 32)


def test_sweep_specs_that_would_starve_tune_of_its_metric_are_refused(tmp_path, mnist_parquet) -> None:
    from sd3ray.config import ConfigError

    path = sweep_file(tmp_path, mnist_parquet, "bad", [32])
    with pytest.raises(ConfigError, match="must be a multiple of train.eval_every"):
        load_sweep(path, ["overrides=[train.eval_every=4, train.ckpt_every=2]"])
    with pytest.raises(ConfigError, match="needs the judge"):
        load_sweep(path, ["metric=samples/accuracy"])
    with pytest.raises(ConfigError, match="schemes\\[0\\].scheme: 'gauss' is not allowed"):
        load_sweep(path, ["schemes=[{scheme: gauss}]"])
