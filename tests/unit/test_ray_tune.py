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


def test_a_free_form_space_and_seeds_become_each_trials_overrides_and_label(tmp_path, mnist_parquet) -> None:
    from ray.tune.search.variant_generator import generate_variants

    from sd3ray.config import load_config
    from sd3ray.sweeps.spec import Dimension, base_config, search_space

    path = sweep_file(tmp_path, mnist_parquet, "space", [32], seeds=2, asha={"enabled": False},
                      space={"sample.guidance": [1.5, 2.5], "train.ema_decay": {"uniform": [0.9, 0.99]},
                             "model.patch_size": {"choice": [2, 4]}})
    spec = load_sweep(path)
    dims = {dim.key: dim for dim in spec.space}
    assert dims["sample.guidance"] == Dimension("sample.guidance", (1.5, 2.5), "grid") and spec.seeds == 2
    assert dims["train.ema_decay"] == Dimension("train.ema_decay", (0.9, 0.99), "uniform")
    variants = [v["params"] for _, v in generate_variants(search_space(spec))]
    # 1 width × 2 schemes × 2 guidances × 2 seeds grid points; the distributions are drawn for each
    assert len(variants) == 8
    assert {(v["set"]["sample.guidance"], v["seed"]) for v in variants} == {(1.5, 0), (1.5, 1), (2.5, 0), (2.5, 1)}
    assert all(0.9 <= v["set"]["train.ema_decay"] <= 0.99 and v["set"]["model.patch_size"] in (2, 4)
               for v in variants)
    params = variants[0]
    cfg = load_config(spec.base_config, [*spec.overrides, *trial_overrides(params, spec.head_dim)])
    assert (cfg.sample.guidance, cfg.train.seed, cfg.model.patch_size) == (params["set"]["sample.guidance"],
                                                                           params["seed"],
                                                                           params["set"]["model.patch_size"])
    assert cfg.train.ema_decay == pytest.approx(params["set"]["train.ema_decay"])
    label = trial_label(params)
    assert label.startswith("w32-") and f"-guidance{params['set']['sample.guidance']:.3g}" in label
    assert label.endswith(f"-seed{params['seed']}")
    assert base_config(spec).train.seed == 0  # the base is untouched


@pytest.mark.parametrize(("space", "message"), [
    ({"sample.guidanse": [1.5]}, "space: sample.guidanse: unknown key"),
    ({"sample.guidance": ["high"]}, "space: sample.guidance: expected float"),
    ({"model.num_heads": [2]}, "space: model.num_heads is swept by widths"),
    ({"model.width": [64]}, "space: model.width is swept by widths"),
    ({"train.lr_x": {"gaussian": [0, 1]}}, "space: train.lr_x: expected a list of values or one of"),
    ({"train.ema_decay": {"uniform": [0.99, 0.9]}}, "uniform takes \\[low, high\\] with low < high"),
    ({"train.weight_decay": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
])
def test_a_bad_space_entry_is_one_message_naming_its_key(tmp_path, mnist_parquet, space, message) -> None:
    from sd3ray.config import ConfigError

    path = sweep_file(tmp_path, mnist_parquet, "bad-space", [32], space=space)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)
