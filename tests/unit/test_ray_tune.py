"""Sweeps without Ray: the sweep file, each trial's overrides and label, the study over seeds and why ASHA stopped a
trial (the real sweep on a Ray head is tests/integration/test_ray_tune.py)."""


from pathlib import Path

import pytest

from sd3ray.sweeps.spec import load_sweep, trial_label, trial_overrides
from tests.support import sweep_file


def test_trial_settings_follow_the_sweep() -> None:
    params = {"width": 128, "scheme": {"scheme": "mode", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29},
              "lr": 0.002}
    assert trial_label(params) == "w128-mode(1.29)-lr0.002"
    assert trial_overrides(params, head_dim=32)[:2] == ["model.width=128", "model.num_heads=4"]
    assert "flow.scheme=mode" in trial_overrides(params, 32) and "train.lr=0.002" in trial_overrides(params, 32)


def test_tune_holds_each_scheme_as_its_label_and_a_trial_gets_its_flow_keys_back(tmp_path, mnist_parquet) -> None:
    """Tune's status table shows a param whole only when it is short: the label, not the dict's tail."""
    from ray.tune.search.variant_generator import generate_variants

    from sd3ray.config import ConfigError
    from sd3ray.sweeps.spec import resolved_params, search_space

    path = sweep_file(tmp_path, mnist_parquet, "labels", [32], asha={"enabled": False},
                      schemes=[{"scheme": "uniform"}, {"scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 0.6},
                               {"scheme": "mode", "mode_scale": 1.75}])
    spec = load_sweep(path)
    variants = [v["params"] for _, v in generate_variants(search_space(spec))]
    assert [v["scheme"] for v in variants] == ["uniform", "logit_normal(0.5,0.6)", "mode(1.75)"]
    trial = resolved_params(spec, variants[1])
    assert trial["scheme"] == {"scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 0.6, "mode_scale": 1.29}
    assert {"flow.scheme=logit_normal", "flow.logit_mean=0.5", "flow.logit_std=0.6"} <= set(
        trial_overrides(trial, spec.head_dim))
    assert trial_label(trial) == "w32-logit_normal(0.5,0.6)" and variants[1]["scheme"] == "logit_normal(0.5,0.6)"
    assert resolved_params(spec, trial) == trial  # a sweep saved with the dicts resumes as it was
    with pytest.raises(ConfigError, match=r"schemes: mode\(1.75\) is given twice"):
        load_sweep(path, ["schemes=[{scheme: mode, mode_scale: 1.75}, {scheme: mode, mode_scale: 1.75}]"])


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
    from sd3ray.sweeps.spec import Dimension, base_config, resolved_params, search_space

    path = sweep_file(tmp_path, mnist_parquet, "space", [32], seeds=2, asha={"enabled": False},
                      space={"sample.guidance": [1.5, 2.5], "train.ema_decay": {"uniform": [0.9, 0.99]},
                             "model.patch_size": {"choice": [2, 4]}})
    spec = load_sweep(path)
    dims = {dim.key: dim for dim in spec.space}
    assert dims["sample.guidance"] == Dimension("sample.guidance", (1.5, 2.5), "grid") and spec.seeds == 2
    assert dims["train.ema_decay"] == Dimension("train.ema_decay", (0.9, 0.99), "uniform")
    variants = [resolved_params(spec, v["params"]) for _, v in generate_variants(search_space(spec))]
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
    ({"model.num_heads": [2]}, "space: model.num_heads is swept by model.width"),
    ({"flow.logit_std": [0.6, 1.0]}, "space: flow.logit_std is swept by flow \\(a list of schemes\\)"),
    ({"model.width": [64]}, "space: model.width and widths: give these values once, under space: model.width"),
    ({"flow": {"scheme": "uniform"}}, "space: flow takes a list of values, e.g. flow: \\[{scheme: uniform}"),
    ({"train.lr_x": {"gaussian": [0, 1]}}, "space: train.lr_x: expected a list of values or one of"),
    ({"train.ema_decay": {"uniform": [0.99, 0.9]}}, "uniform takes \\[low, high\\] with low < high"),
    ({"train.weight_decay": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
])
def test_a_bad_space_entry_is_one_message_naming_its_key(tmp_path, mnist_parquet, space, message) -> None:
    from sd3ray.config import ConfigError

    path = sweep_file(tmp_path, mnist_parquet, "bad-space", [32], space=space)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_widths_and_schemes_written_in_space_are_the_named_dimensions(tmp_path) -> None:
    """configs/tune_mnist.yaml writes width × scheme under `space:`; it sweeps what the named form sweeps."""
    import yaml

    shipped = yaml.safe_load(Path("configs/tune_mnist.yaml").read_text())
    space = shipped.pop("space")
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({**shipped, "widths": space.pop("model.width"), "schemes": space.pop("flow"),
                                     "space": space}))
    from_space = load_sweep("configs/tune_mnist.yaml", [], ["data.download=false"])
    assert from_space == load_sweep(named, [], ["data.download=false"])
    assert from_space.widths == (64, 128) and [s.label for s in from_space.schemes] == [
        "uniform", "logit_normal(0,1)", "mode(1.29)", "cosmap"]
    assert from_space.space == ()  # nothing left over as a free-form key

    from sd3ray.config import ConfigError

    for entry, message in (({"model.width": [64, "wide"]}, r"space: model.width\[1\]: expected int"),
                           ({"flow": [{"scheme": "gauss"}]}, r"space: flow\[0\].scheme: 'gauss' is not allowed")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**shipped, "space": {**space, **entry}}))
        with pytest.raises(ConfigError, match=message):
            load_sweep(bad, [], ["data.download=false"])


def _row(scheme: str, seed: int, cfid: float, accuracy: float, loss: float, status: str = "finished") -> dict:
    return {"trial": f"w128-{scheme}-seed{seed}", "width": 128, "scheme": scheme, "seed": seed, "status": status,
            "step": 2000, "samples/cfid_ratio": cfid, "samples/accuracy": accuracy, "loss/val": loss}


def test_a_study_ranks_points_by_their_mean_over_seeds_beside_sd3s_table_1() -> None:
    import statistics

    from sd3ray.sweeps.spec import load_sweep
    from sd3ray.sweeps.study import by_point, study_markdown

    spec = load_sweep("configs/sweeps/sd3_timesteps.yaml", [], ["data.download=false"])
    assert len(spec.schemes) == 7 and spec.seeds == 3 and spec.metric == "samples/cfid_ratio"
    rows = [_row("uniform", s, c, a, 0.3) for s, c, a in [(0, 9.0, 0.9), (1, 11.0, 0.92), (2, 13.0, 0.94)]]
    rows += [_row("logit_normal(0,1)", s, c, 0.99, 0.28) for s, c in [(0, 5.0), (1, 6.0)]]
    rows += [_row("logit_normal(0,1)", 2, 50.0, 0.5, 0.9, status="failed")]  # not averaged: it never finished
    rows += [_row("logit_normal(-0.5,1)", 0, 7.0, 0.97, 0.29)]
    points = by_point(rows, spec)
    assert [p["point"] for p in points] == ["w128-logit_normal(0,1)", "w128-logit_normal(-0.5,1)", "w128-uniform"]
    best, _, uniform = points
    assert best["seeds"] == 2 and best["samples/cfid_ratio mean"] == 5.5
    assert best["samples/cfid_ratio std"] == statistics.stdev([5.0, 6.0])
    assert uniform["samples/accuracy mean"] == pytest.approx(0.92) and uniform["rank"] == 3
    assert (best["sd3 rank"], uniform["sd3 rank"], points[1]["sd3 rank"]) == (1.54, 5.67, None)
    table = study_markdown(points, spec)
    assert "| 1 | w128-logit_normal(0,1) | 2 | 5.5 ± 0.7071 |" in table and "not in Table 1" in table


def test_a_trial_asha_stopped_says_at_which_step_and_against_which_value() -> None:
    from sd3ray.sweeps.report import stop_reason
    from sd3ray.sweeps.spec import AshaSpec, SweepSpec

    spec = SweepSpec(metric="loss/val", mode="min", asha=AshaSpec(grace_period=2, reduction_factor=2))
    histories = {"a": [(2, 0.50), (4, 0.40)], "b": [(2, 0.60)], "c": [(2, 0.55), (4, 0.45)], "d": [(2, 0.70)]}
    reason = stop_reason({"trial": "b", "step": 2}, histories, spec)
    # at step 2 the four trials had 0.50 0.55 0.60 0.70: ASHA keeps the best half, the last kept being 0.55
    assert reason == ("ASHA at step 2: loss/val 0.6, outside the best 1/2 of the 4 trials that reached that step "
                      "(the last one kept: 0.55)")
    off = SweepSpec(asha=AshaSpec(enabled=False))
    assert "ASHA is off" in stop_reason({"trial": "b", "step": 2}, histories, off)


def test_a_sweep_on_object_storage_keeps_the_uri_and_its_query_for_every_trial(tmp_path) -> None:
    from sd3ray.sweeps.spec import SweepSpec, sweep_root, sweep_storage

    uri = "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&scheme=http"
    spec = SweepSpec(name="study", storage_path=uri)
    assert sweep_root(spec) == uri
    assert sweep_storage(spec) == "s3://bucket/sweeps/study?endpoint_override=127.0.0.1:9000&scheme=http"
    local = SweepSpec(name="study", storage_path="runs/tune")
    assert sweep_storage(local) == f"{(tmp_path.cwd() / 'runs/tune').resolve()}/study"


def _sweep_in_space_form(tmp_path: Path, mnist_parquet: Path, space: dict, **extra) -> Path:
    """A sweep file that writes its widths under `space: model.width`, as configs/tune_mnist.yaml does."""
    import yaml

    path = sweep_file(tmp_path, mnist_parquet, "points", [32], asha={"enabled": False}, **extra)
    data = yaml.safe_load(path.read_text())
    widths = data.pop("widths")
    data["space"] = {"model.width": widths, **space}
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_width_the_heads_cannot_divide_is_refused_when_the_sweep_loads_naming_its_point(tmp_path,
                                                                                          mnist_parquet) -> None:
    from sd3ray.config import ConfigError

    path = _sweep_in_space_form(tmp_path, mnist_parquet, {"model.width": [64, 130]}, head_dim=32)
    with pytest.raises(ConfigError) as refused:
        load_sweep(path)
    assert str(refused.value) == (
        "sweep point model.width=130, flow=uniform cannot run: model.width: 130 is not a multiple of head_dim 32, so "
        "the heads (width / head_dim) would not divide it; sweep widths that are multiples of 32 or change head_dim")
    # the training config's own checks run on every point too: here, its head dim must be even
    with pytest.raises(ConfigError, match=r"^sweep point model.width=66, flow=uniform cannot run: model.width: head "
                                          r"dim \(width / num_heads\) must be even"):
        load_sweep(_sweep_in_space_form(tmp_path, mnist_parquet, {"model.width": [66]}, head_dim=33))
    with pytest.raises(ConfigError, match=r"^head_dim \(0\) must be a positive integer"):
        load_sweep(path, ["head_dim=0"])


def test_every_combination_of_the_grid_is_built_and_a_bad_one_names_all_its_values(tmp_path, mnist_parquet) -> None:
    from sd3ray.config import ConfigError

    # each value is fine on its own (the base has eval_every = ckpt_every = 2); only eval 4 with ckpt 6 is not
    path = _sweep_in_space_form(tmp_path, mnist_parquet, {"train.eval_every": [2, 4], "train.ckpt_every": [4, 6]})
    with pytest.raises(ConfigError) as refused:
        load_sweep(path)
    assert str(refused.value) == (
        "sweep point model.width=32, flow=uniform, train.ckpt_every=6, train.eval_every=4 cannot run: "
        "train.ckpt_every (6) must be a multiple of train.eval_every (4) in a sweep, so every report carries loss/val")


def test_a_valid_grid_loads_after_every_point_and_each_ranges_ends_are_built(tmp_path, mnist_parquet,
                                                                            monkeypatch) -> None:
    from sd3ray.sweeps import spec as spec_module
    from sd3ray.sweeps.spec import point_params, sweep_points, trial_config

    path = _sweep_in_space_form(tmp_path, mnist_parquet, {
        "model.width": [32, 48], "sample.guidance": [1.5, 2.5], "train.ema_decay": {"uniform": [0.9, 0.99]},
        "model.depth": {"randint": [1, 4]}}, seeds=2)
    spec = load_sweep(path)
    built = []
    monkeypatch.setattr(spec_module, "trial_config", lambda s, params: built.append(params) or trial_config(s, params))
    spec_module.check_points(spec)
    # 2 widths × 2 schemes × 2 guidances × 2 ends of the uniform × 2 ends of the randint × 2 seeds
    assert len(built) == 64
    assert {p["set"]["model.depth"] for p in built} == {1, 3}  # randint excludes its high end, as Tune draws it
    assert {p["set"]["train.ema_decay"] for p in built} == {0.9, 0.99}
    assert all(isinstance(p["set"]["train.ema_decay"], float) for p in built)
    assert {(p["width"], p["set"]["sample.guidance"], p["seed"]) for p in built} == {
        (w, g, s) for w in (32, 48) for g in (1.5, 2.5) for s in (0, 1)}
    first = next(sweep_points(spec))
    assert point_params(first) == built[0]

    # past the cap, each value is built once beside the others' first values, and a bad one is still found
    monkeypatch.setattr(spec_module, "MAX_CHECKED_POINTS", 4)
    assert len(list(sweep_points(spec))) == 2 + 2 + 2 + 2 + 2 + 2
    bad = _sweep_in_space_form(tmp_path, mnist_parquet, {"model.width": [32, 48, 40], "sample.guidance": [1.5, 2.5]},
                               head_dim=16)
    from sd3ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"^sweep point model.width=40, flow=uniform, sample.guidance=1.5 cannot"):
        load_sweep(bad)


@pytest.mark.parametrize(("space", "message"), [
    # Tune's randint never draws 4: its highest draw, 3, does not divide the checkpoint interval 2
    ({"train.eval_every": {"randint": [1, 4]}},
     "sweep point model.width=32, flow=uniform, train.eval_every=3 (the highest draw of randint [1, 4]) cannot run: "
     "train.ckpt_every (2) must be a multiple of train.eval_every (3) in a sweep, so every report carries loss/val"),
    # uniform draws floats, which an integer key refuses
    ({"train.batch_size": {"uniform": [8, 16]}},
     "sweep point model.width=32, flow=uniform, train.batch_size=8.0 (the low end of uniform [8, 16]) cannot run: "
     "train.batch_size: expected int, got float 8.0"),
    ({"train.ckpt_every": {"choice": [2, 3]}},
     "sweep point model.width=32, flow=uniform, train.ckpt_every=3 cannot run: train.ckpt_every (3) must be a "
     "multiple of train.eval_every (2)"),
])
def test_a_distribution_a_trial_cannot_run_at_is_refused_naming_the_draw(tmp_path, mnist_parquet, space,
                                                                         message) -> None:
    from sd3ray.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_sweep(_sweep_in_space_form(tmp_path, mnist_parquet, space))
    assert str(refused.value).startswith(message)


def test_the_summary_names_each_failed_trial_and_only_an_all_failed_sweep_is_an_error() -> None:
    from sd3ray.errors import DataError
    from sd3ray.sweeps.report import SweepFailed, check_some_trial_ran, error_line, summary_text
    from sd3ray.sweeps.spec import SweepSpec

    wrapped = RuntimeError("Traceback (most recent call last):\n  ...\nray.exceptions.RayTaskError: lost")
    wrapped.__cause__ = DataError("no Parquet image set at /data/b (metadata.json missing)")
    assert error_line(wrapped) == "DataError: no Parquet image set at /data/b (metadata.json missing)"
    assert error_line(ValueError("Traceback ...\n  File x\nValueError: boom  ")) == "ValueError: boom"

    class RayTaskErrorLike(DataError):  # what Ray raises for a trial's DataError: also a DataError, its text a trace
        def __init__(self, cause: DataError) -> None:
            super().__init__(f"ray::ImplicitFunc.train()\nTraceback ...\nsd3ray.errors.DataError: {cause}")
            self.cause = cause

    assert error_line(RayTaskErrorLike(DataError("no set at /a"))) == "DataError: no set at /a"

    def row(trial: str, status: str, error: str = "") -> dict:
        return {"trial": trial, "status": status, "error": error}

    spec = SweepSpec(name="s")
    mixed = [row("w64-uniform", "finished"), row("w40-uniform", "failed", "DataError: a")]
    check_some_trial_ran(mixed, spec, "/runs/tune/s")  # some trained: the sweep stands, its failures listed
    assert summary_text(mixed).splitlines()[-2:] == ["sd3ray: 1 of 2 trials failed:", "  w40-uniform: DataError: a"]
    failed = [row("w32-uniform", "failed", "DataError: a"), row("w48-uniform", "failed", "DataError: b")]
    assert summary_text(failed).splitlines()[-3:] == [
        "sd3ray: 2 of 2 trials failed:", "  w32-uniform: DataError: a", "  w48-uniform: DataError: b"]
    with pytest.raises(SweepFailed) as ended:
        check_some_trial_ran(failed, spec, "/runs/tune/s")
    assert str(ended.value).startswith("all 2 trials of sweep 's' failed (each is listed above with its error; "
                                       "tracebacks are in the trials' error.txt under /runs/tune/s). The first: "
                                       "w32-uniform: DataError: a. Fix that")
    assert "failed" not in summary_text([row("w64-uniform", "finished")])
