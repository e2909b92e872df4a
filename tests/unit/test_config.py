from pathlib import Path

import pytest

from sd3ray.config import Config, ConfigError, config_hash, flatten, from_dict, load_config, to_dict, to_yaml
from tests.support import REPO_ROOT

SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))
CONFIGS = [p for p in SHIPPED if not p.name.startswith("tune_")]
SWEEPS = [p for p in SHIPPED if p.name.startswith("tune_")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_load(path: Path) -> None:
    from sd3ray.sweeps.spec import load_sweep

    spec = load_sweep(path)
    assert spec.widths and spec.schemes


def test_round_trip_dict_and_yaml(tmp_path: Path) -> None:
    cfg = load_config("configs/mnist_tiny.yaml", ["model.width=96", "flow.scheme=cosmap"])
    assert from_dict(to_dict(cfg)) == cfg
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert flatten(cfg)["model.width"] == 96


def test_overrides_parse_yaml_values_and_change_hash() -> None:
    base = load_config("configs/mnist_tiny.yaml")
    cfg = load_config("configs/mnist_tiny.yaml", ["train.lr=0.002", "model.qk_norm=false", "train.steps=7"])
    assert (cfg.train.lr, cfg.model.qk_norm, cfg.train.steps) == (0.002, False, 7)
    assert config_hash(cfg) != config_hash(base)


def test_int_and_exponent_strings_are_accepted_for_float() -> None:
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.widht=3"], "model.widht: unknown key; allowed keys here: image_size"),
        (["nonsense.x=1"], "nonsense: unknown key"),
        (["model.width=wide"], "model.width: expected int, got str"),
        (["model.qk_norm=3"], "model.qk_norm: expected bool"),
        (["model.width=100"], "model.width: 100 is not divisible by model.num_heads=6"),
        (["model.image_size=31"], "model.image_size: 31 is not divisible by model.patch_size=2"),
        (["flow.scheme=laplace"], "flow.scheme: 'laplace' is not allowed; expected one of 'uniform', 'logit_normal'"),
        (["model.channels=2"], "model.channels: must be 1 or 3"),
        (["train.steps=-5"], "train.steps: must be >= 0"),
        (["sample.guidance=-1"], "sample.guidance: must be >= 0"),
        (["sample.sampler=ddim"], "sample.sampler: 'ddim' is not allowed; expected one of 'euler', 'heun'"),
        (["flow.mode_scale=3"], "flow.mode_scale: must be in [-1, 1.75]"),
        (["text.width=64"], "model.context_dim: must equal text.width (64)"),
        (["model.width"], "expected KEY=VALUE"),
        (["model.conv_head_layers=2"], "model.conv_head_layers: a head of 2 convolutions needs its per-pixel "
                                       "channels: set model.conv_head too"),
        (["model.conv_head=8", "model.conv_head_layers=3"], "model.conv_head_layers: must be 1 (one convolution) "
                                                            "or 2"),
        (["model.long_skips=true", "model.depth=1"], "model.long_skips: needs model.depth >= 2"),
        (["train.adam_beta2=1"], "train.adam_beta2: must be in (0, 1), e.g. 0.95 or 0.999; got 1.0"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
