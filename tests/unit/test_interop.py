"""sd3ray's MM-DiT and diffusers' SD3Transformer2DModel: the same function of the same weights, both ways.

Tiny random SD3 transformers are built from config dicts and saved with save_pretrained (tests/sd3_models.py); both
models get the same tensors directly (no text encoders) and are compared in fp32."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import CheckpointData
from sd3ray.config import ConfigError, ModelConfig, load_config
from sd3ray.model.embeddings import crop_positions, sincos_position_embedding
from sd3ray.model.interop import (
    InteropError,
    load_pretrained,
    locate,
    model_keys,
    read_config,
    read_weights,
    save_diffusers,
)
from sd3ray.model.lora import load_into
from sd3ray.model.mmdit import MMDiT
from sd3ray.training.step import StepSettings, build_train_state, train_step
from tests.sd3_models import VARIANTS, diffusers_velocity, make_sd3, tiny_sd3_config
from tests.support import MICRO, REPO_ROOT
from tests.vae_models import make_vae

pytest.importorskip("diffusers")
CPU = torch.device("cpu")


def _inputs(cfg: ModelConfig, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([0.0, 0.37, 1.0])  # both ends of the flow and a point between
    return x, t, torch.randn(3, 5, cfg.context_dim, generator=g), torch.randn(3, cfg.pooled_dim, generator=g)


def _imported(folder: Path, image_size: int = 8) -> tuple[MMDiT, ModelConfig]:
    keys = model_keys(read_config(locate(str(folder))), str(folder))
    cfg = ModelConfig(image_size=image_size, init_from=str(folder), **keys)
    model = MMDiT(cfg).eval()
    load_into(model, load_pretrained(cfg), cfg.init_from)
    return model, cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_imported_sd3_transformer_computes_what_diffusers_computes(variant: str, tmp_path: Path) -> None:
    """SD3 Medium (no QK-norm), SD3.5 Large (RMS QK-norm) and SD3.5 Medium (dual attention, here also in the last
    block) in miniature, read from a pipeline folder's `transformer` subfolder; 4×4 tokens cropped from a 6×6
    table, at t = 0, 0.37 and 1."""
    from diffusers import SD3Transformer2DModel

    folder = make_sd3(tmp_path / "pipeline" / "transformer", tiny_sd3_config(**VARIANTS[variant]))
    ours, cfg = _imported(tmp_path / "pipeline")
    assert cfg.qk_norm == (variant != "sd3-medium") and cfg.dual_attention_layers == \
        VARIANTS[variant]["dual_attention_layers"]
    theirs = SD3Transformer2DModel.from_pretrained(folder).eval()
    x, t, context, pooled = _inputs(cfg)
    with torch.no_grad():
        expected = diffusers_velocity(theirs, x, t, context, pooled)
        torch.testing.assert_close(ours(x, t, context, pooled), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().mean() > 0.05  # random weights everywhere: a wrong mapping cannot hide behind zeros


def test_export_then_reimport_gives_identical_tensors(tmp_path: Path) -> None:
    """Import -> export writes diffusers' very tensors and a config.json that describes them; diffusers loads the
    folder with no missing or unexpected key, and importing it again gives the same sd3ray state."""
    from diffusers import SD3Transformer2DModel

    source = make_sd3(tmp_path / "source", tiny_sd3_config(qk_norm="rms_norm", dual_attention_layers=(1,)))
    ours, cfg = _imported(source)
    state = ours.state_dict()
    out = save_diffusers(state, cfg, tmp_path / "exported")
    mode = (out / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "config.json").stat().st_mode & 0o777  # readable as any file written here, not owner-only
    original, exported = read_weights(source), read_weights(out)
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    config = read_config(out)
    assert {k: config[k] for k in tiny_sd3_config() if k != "sample_size"} == \
        {k: v for k, v in read_config(source).items() if k in tiny_sd3_config() and k != "sample_size"}
    _, info = SD3Transformer2DModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = load_pretrained(ModelConfig(**{**cfg.__dict__, "init_from": str(out)}))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_an_sd3ray_trained_model_exported_runs_in_diffusers_with_sd3rays_output(tmp_path: Path) -> None:
    """The micro model (computed sin-cos positions, QK-norm, a byte text encoder) trained three steps, exported by
    jobs/export.py's own function: diffusers draws the same velocities from the exported folder."""
    from diffusers import SD3Transformer2DModel

    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*MICRO, "train.warmup_steps=0", "train.lr=0.01"])
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    ids, mask = torch.randint(0, 255, (4, 6), generator=g), torch.ones(4, 6, dtype=torch.bool)
    for step in range(3):
        train_step(state, x0, ids, mask, torch.rand(4, generator=g), eps, step)
    ema = state.ema.model.state_dict()
    export = runpy.run_path(str(REPO_ROOT / "jobs/export.py"))["export"]
    folder = export(CheckpointData(3, cfg, {}, ema), "diffusers", tmp_path / "exported")
    single = export(CheckpointData(3, cfg, {}, ema), "safetensors", tmp_path / "ema.safetensors")
    from safetensors.torch import load_file

    assert load_file(single).keys() == ema.keys()  # the whole Denoiser, text encoder included, under sd3ray's names
    theirs = SD3Transformer2DModel.from_pretrained(folder).eval()
    x, t, context, pooled = _inputs(cfg.model)
    with torch.no_grad():
        ours = state.ema.model.mmdit(x, t, context, pooled)
        torch.testing.assert_close(diffusers_velocity(theirs, x, t, context, pooled), ours, atol=1e-5, rtol=1e-5)
    assert ours.abs().mean() > 0  # three steps moved the zero-initialised output layers


def test_the_position_table_is_centre_cropped_and_the_default_positions_are_unchanged() -> None:
    """A table as large as the grid crops to itself (today's computed positions); a larger one gives its centre."""
    table = sincos_position_embedding(8, 6)  # (36, 8)
    grid = sincos_position_embedding(8, 4)
    torch.testing.assert_close(crop_positions(grid, 4, 4, 4), grid)
    crop = crop_positions(table, 6, 4, 4)
    assert torch.equal(crop[0], table[1 * 6 + 1]) and torch.equal(crop[-1], table[4 * 6 + 4])
    plain = MMDiT(ModelConfig(width=32, depth=1, num_heads=2, context_dim=8, pooled_dim=8))
    assert "pos_embed" not in plain.state_dict()  # computed, as before: checkpoints of earlier runs still load
    assert "pos_embed" in MMDiT(ModelConfig(width=32, depth=1, num_heads=2, context_dim=8, pooled_dim=8,
                                            pos_embed_max_size=20)).state_dict()


# --------------------------------------------------------------------------------- one message per fault


def test_keys_that_do_not_map_are_one_error_listing_them(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = make_sd3(tmp_path / "m", tiny_sd3_config())
    weights = read_weights(folder)
    weights["transformer_blocks.0.attn.extra_proj.weight"] = torch.zeros(2, 2)
    weights["image_proj.proj.weight"] = torch.zeros(2, 2)  # an IP-Adapter's projection: nothing in sd3ray holds it
    del weights["proj_out.bias"]
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(InteropError, match=r"2 diffusers key\(s\) with no sd3ray counterpart: image_proj.proj.weight, "
                                           r"transformer_blocks.0.attn.extra_proj.weight; 1 key\(s\) missing: "
                                           r"proj_out.bias"):
        _imported(folder)


def test_a_config_that_differs_from_the_checkpoint_is_one_message_with_the_values_to_set(tmp_path: Path) -> None:
    folder = make_sd3(tmp_path / "m", tiny_sd3_config(qk_norm="rms_norm", dual_attention_layers=(0,)))
    keys = model_keys(read_config(folder), "m")
    cfg = ModelConfig(**{**keys, "width": 48, "depth": 2, "qk_norm": False, "dual_attention_layers": (), "channels": 3,
                         "image_size": 8, "init_from": str(folder)})
    with pytest.raises(InteropError) as err:
        load_pretrained(cfg)
    message = str(err.value)
    for line in ("model.width: the checkpoint has 32, the config 48", "model.depth: the checkpoint has 3",
                 "model.qk_norm: the checkpoint has True", "model.dual_attention_layers: the checkpoint has (0,)",
                 "--set model.width=32 model.depth=3 model.channels=4 model.qk_norm=true "
                 "model.dual_attention_layers=[0]"):
        assert line in message, message
    assert "Note: it works on 4-channel latents" in message  # sd3ray's training data is pixels: say so at once
    with pytest.raises(InteropError, match="model.image_size 16 is 8 patches per side, more than the 6 positions"):
        load_pretrained(ModelConfig(**{**keys, "image_size": 16, "init_from": str(folder)}))


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "is not a folder on this machine"),
    ("empty", "holds no config.json, nor a transformer/config.json"),
    ("pickle", "it has diffusion_pytorch_model.bin: sd3ray reads safetensors only"),
    ("flux", "holds a FluxTransformer2DModel, not an SD3Transformer2DModel"),
    ("layer_norm", "qk_norm='layer_norm' \\(sd3ray has RMS QK-norm or none\\)"),
    ("hub", "could not fetch 'stabilityai/stable-diffusion-3-medium-diffusers' from the Hugging Face hub "
            ".*hf download"),
])
def test_a_wrong_folder_or_an_offline_hub_id_is_one_message(setup: str, message: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    if setup not in ("missing", "hub"):
        folder.mkdir()
    if setup in ("pickle", "flux", "layer_norm"):
        config = tiny_sd3_config(qk_norm="layer_norm") if setup == "layer_norm" else tiny_sd3_config()
        config["_class_name"] = "FluxTransformer2DModel" if setup == "flux" else "SD3Transformer2DModel"
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    # tests run offline (HF_HUB_OFFLINE, tests/conftest.py): the hub answers at once that it cannot be reached
    source = "stabilityai/stable-diffusion-3-medium-diffusers" if setup == "hub" else str(folder)
    cfg = ModelConfig(**{**model_keys(tiny_sd3_config(), "x"), "image_size": 8, "init_from": source})
    with pytest.raises(InteropError, match=message):
        load_pretrained(cfg)


def test_config_refuses_impossible_pretrained_settings() -> None:
    with pytest.raises(ConfigError, match="model.pos_embed_max_size: 4 positions per side cannot cover"):
        load_config(None, ["model.pos_embed_max_size=4"])
    with pytest.raises(ConfigError, match=r"model.dual_attention_layers: \[12\] are not blocks"):
        load_config(None, ["model.dual_attention_layers=[0, 12]"])


@pytest.mark.parametrize("name", ["SD3 Medium (2B)", "SD3.5 Medium"])
def test_the_memory_formulas_count_the_parameters_diffusers_counts(name: str) -> None:
    """benchmarks.finetune_memory's shapes of the SD3 family (docs/finetune.md's table) are diffusers' models:
    the same parameter count on the meta device (SD3 Medium: 2,028,328,000)."""
    from diffusers import SD3Transformer2DModel

    from benchmarks.finetune_memory import SD3_FAMILY
    from sd3ray.model.interop import diffusers_config

    cfg = SD3_FAMILY[name]
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
        ours = MMDiT(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_the_jobs_model_config_follows_the_checkpoints_config_json(tmp_path: Path) -> None:
    """jobs' config_from_args: model.init_from fills model.* from the transformer's config.json (over the YAML's own
    model), a key the user sets to another value is one message naming it, and a latent-space transformer is
    refused for training with what it would need."""
    import argparse

    from sd3ray.cli import config_from_args
    from sd3ray.model.interop import InteropError
    from tests.sd3_models import MICRO_SD3

    folder = make_sd3(tmp_path / "sd3", {**MICRO_SD3, "num_layers": 3, "qk_norm": None})
    parser = argparse.ArgumentParser()
    text = [o for o in MICRO if o.startswith("text.")]  # the byte text encoder's width is the context's, 32
    args = argparse.Namespace(config=str(REPO_ROOT / "configs/mnist_tiny.yaml"),
                              overrides=[*text, f"model.init_from={folder}"])
    cfg = config_from_args(parser, args)  # mnist_tiny's own model is width 128, depth 4, QK-norm on
    assert (cfg.model.width, cfg.model.depth, cfg.model.num_heads, cfg.model.qk_norm) == (32, 3, 2, False)
    assert (cfg.model.pos_embed_max_size, cfg.model.context_dim, cfg.model.patch_size) == (10, 32, 4)
    with pytest.raises(InteropError, match=r"model.depth: the checkpoint has 3, the config 5"):
        config_from_args(parser, argparse.Namespace(config=args.config, overrides=[*args.overrides, "model.depth=5"]))
    latent = make_sd3(tmp_path / "latent", tiny_sd3_config())
    with pytest.raises(InteropError, match="4-channel latents: train it in latent space.*vae.source=PIPELINE"):
        config_from_args(parser, argparse.Namespace(config=args.config, overrides=[*text, f"model.init_from={latent}"]))
    vae = make_vae(tmp_path / "vae")  # through a VAE of its 4 latent channels it is the model's shape at once
    latent = make_sd3(tmp_path / "latent32", tiny_sd3_config(joint_attention_dim=32, pooled_projection_dim=32))
    cfg = config_from_args(parser, argparse.Namespace(config=args.config, overrides=[
        *text, f"model.init_from={latent}", f"vae.source={vae}", "model.image_size=8"]))
    assert (cfg.model.channels, cfg.model.image_size, cfg.model.patch_size) == (4, 8, 2)


@pytest.mark.parametrize("extra", [{"long_skips": True}, {"conv_head": 8, "conv_head_layers": 2}])
def test_a_model_with_parts_diffusers_lacks_is_refused_export_naming_them(extra: dict, tmp_path: Path) -> None:
    """Long skips and a pixel head have no SD3Transformer2DModel weights: exporting drops nothing silently. Importing
    into such a config names the keys to reset."""
    from sd3ray.model.interop import diffusers_config

    with pytest.raises(InteropError, match="has no SD3Transformer2DModel form: it needs model.conv_stem=0, "
                                           "model.conv_head=0, model.long_skips=false"):
        diffusers_config(ModelConfig(**extra))
    folder = make_sd3(tmp_path / "m", tiny_sd3_config())
    keys = model_keys(read_config(folder), "m")
    with pytest.raises(InteropError, match="model.(long_skips|conv_head): the checkpoint has (False|0)"):
        load_pretrained(ModelConfig(**{**keys, **extra, "init_from": str(folder)}))
