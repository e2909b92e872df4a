"""Frozen pretrained text encoders (text.encoder) on tiny randomly initialised CLIP and T5 models saved as real ones
are: the SD3 join against a reference written from the paper, frozen weights, each prompt encoded once, the
precomputed table, checkpoints that refuse other encoders, and one message for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from sd3ray.config import ConfigError, load_config
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.data.text_embeddings import read_table, use_precomputed, write_table
from sd3ray.inference import generate, load_ema_model
from sd3ray.model import Denoiser
from sd3ray.model.pretrained_text import PretrainedTextEncoder, TextEncoderError, inspect
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import MICRO, REPO_ROOT
from tests.text_encoders import make_encoders, make_t5
from tests.unit.test_train_loop import CrashAfterCheckpoint

PROMPTS = ["a red circle", "", "a large blue square on the left", "a red circle"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_coloured_shapes(tmp_path_factory.mktemp("shapes") / "set", 256, image_size=16, num_test=64))


def sd3_config(encoders, *overrides: str, parquet: Path | None = None, out: Path | None = None):
    """The micro model on 16² colour shapes, conditioned on CLIP-L + CLIP-G + T5 (context 24+16 = 40 padded to
    T5's 32 -> 40; pooled 20+12)."""
    return load_config(REPO_ROOT / "configs/shapes_tiny.yaml", [
        *MICRO, "model.image_size=16", "model.patch_size=4", "text.max_length=12",
        f"text.encoder={','.join(map(str, encoders))}", "model.context_dim=40", "model.pooled_dim=32",
        f"data.parquet_dir={parquet or 'unused'}", "data.loading=memory", f"train.output_dir={out or 'runs'}",
        "tracking.log_model=false", *overrides])


def reference_join(encoders, prompts: list[str], max_length: int):
    """SD3 §5.2 from the paper, written out: CLIP penultimate states side by side, zero-padded to T5's width (or the
    other way), CLIP then T5 along the sequence; pooled = the CLIP projections side by side."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    states, pooled, masks = [], [], []
    for folder in encoders[:2]:
        tok = AutoTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=max_length,
                                                    truncation=True, return_tensors="pt")
        out = CLIPTextModelWithProjection.from_pretrained(folder)(**tok, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
        masks.append(tok["attention_mask"].bool())
    tok = AutoTokenizer.from_pretrained(encoders[2])(prompts, padding="max_length", max_length=max_length,
                                                     truncation=True, return_tensors="pt")
    t5 = T5EncoderModel.from_pretrained(encoders[2])(**tok).last_hidden_state
    clip = torch.cat(states, -1)  # (B, L, 40)
    width = max(clip.shape[-1], t5.shape[-1])
    context = torch.cat([torch.nn.functional.pad(clip, (0, width - clip.shape[-1])),
                         torch.nn.functional.pad(t5, (0, width - t5.shape[-1]))], dim=1)
    mask = torch.cat([masks[0] | masks[1], tok["attention_mask"].bool()], dim=1)
    return context, torch.cat(pooled, -1), mask


def test_encoders_are_joined_as_sd3_joins_clip_l_clip_g_and_t5(encoders) -> None:
    model = Denoiser(sd3_config(encoders))
    cond = model.condition(PROMPTS)
    context, pooled, mask = reference_join(encoders, PROMPTS, max_length=12)
    torch.testing.assert_close(cond.context, context)
    torch.testing.assert_close(cond.pooled, pooled)
    assert torch.equal(cond.mask, mask) and cond.context.shape == (4, 24, 40) and cond.pooled.shape == (4, 32)


def test_a_t5_alone_pools_the_masked_mean_of_its_states(encoders) -> None:
    encoder = PretrainedTextEncoder(sd3_config([encoders[2]], "model.context_dim=32").text, 32, 32)
    context, pooled, mask = encoder.encode(["a red circle", ""])
    expected = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)
    assert mask[1].sum() == 1  # the empty prompt is T5's end token alone


def test_each_distinct_prompt_is_encoded_once_and_shared_with_the_ema_copy(encoders) -> None:
    import copy

    model = Denoiser(sd3_config(encoders))
    first = model.condition(PROMPTS)
    ema = copy.deepcopy(model)
    again = ema.condition(list(reversed(PROMPTS)))
    assert model.text_encoder.frozen.encoded == 3 and ema.text_encoder.frozen is model.text_encoder.frozen
    torch.testing.assert_close(again.context, first.context.flip(0))


def test_training_leaves_the_encoders_bit_identical_and_outside_the_weights(encoders, shapes, tmp_path) -> None:
    cfg = sd3_config(encoders, "train.steps=6", "train.ckpt_every=3", "train.eval_every=6", parquet=shapes,
                     out=tmp_path)
    from safetensors.torch import load_file

    before = {str(folder): load_file(folder / "model.safetensors") for folder in encoders}
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), NullTracker())
    model = result.model
    loaded = [m for _, _, m in model.text_encoder.frozen.models]
    for folder, encoder in zip(encoders, loaded):
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before[str(folder)].items())
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert list(model.text_encoder.parameters()) == [] and not any("text_encoder" in k for k in model.state_dict())
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert not any("text_encoder" in k for k in checkpoint.model) and checkpoint.step == 6
    assert [e["kind"] for e in checkpoint.meta["text_encoders"]] == ["clip", "clip", "t5"]


def test_resume_and_sampling_go_through_the_encoders_and_other_ones_are_refused(encoders, shapes, tmp_path) -> None:
    cfg = sd3_config(encoders, "train.steps=4", "train.ckpt_every=2", "train.eval_every=4", parquet=shapes,
                     out=tmp_path)
    whole = train(cfg, LocalContext(tmp_path / "whole", torch.device("cpu")), NullTracker())
    with pytest.raises(RuntimeError, match="crashed"):
        train(cfg, CrashAfterCheckpoint(tmp_path / "split", crash_step=2), NullTracker())
    resumed = train(cfg, LocalContext(tmp_path / "split", torch.device("cpu"),
                                      resume=latest_checkpoint(tmp_path / "split" / "checkpoints")), NullTracker())
    assert resumed.step == 4
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    final = latest_checkpoint(tmp_path / "whole" / "checkpoints")
    model, saved, _ = load_ema_model(str(final), torch.device("cpu"))
    images = generate(model, ["a red circle", "a blue square"], saved, seed=0, device=torch.device("cpu"))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8

    t5 = Path(encoders[2])
    shutil.move(t5, t5.with_name("t5-away"))
    try:
        with pytest.raises(TextEncoderError, match=f"{t5} is not a folder on this machine. Put the encoder there"):
            load_ema_model(str(final), torch.device("cpu"))
        make_t5(t5, seed=9)  # same shape, other weights
        with pytest.raises(CheckpointError, match="was trained with text encoders .* but text.encoder now finds"):
            load_ema_model(str(final), torch.device("cpu"))
    finally:
        shutil.rmtree(t5, ignore_errors=True)
        shutil.move(t5.with_name("t5-away"), t5)


def test_a_precomputed_table_fills_the_cache_without_loading_the_encoders(encoders, shapes, tmp_path) -> None:
    cfg = sd3_config(encoders)
    source = PretrainedTextEncoder(cfg.text, 40, 32)
    prompts = ["", "a red circle", "a blue square"]
    context, pooled, mask = source.encode(prompts)
    folder = tmp_path / "set"
    shutil.copytree(shapes, folder)
    write_table(folder, prompts, context.numpy(), pooled.numpy(), mask.numpy(), source.fingerprint())
    info, names, *_ = read_table(folder)
    assert names == prompts and info["context_dim"] == 40

    fresh = PretrainedTextEncoder(cfg.text, 40, 32)
    assert "3 prompt embeddings read from" in use_precomputed(fresh, folder)
    rows, got_mask = fresh.tokenize(["a blue square", "a red circle"])
    got_context, got_pooled = fresh(rows, got_mask)
    assert fresh.frozen.models is None and fresh.frozen.encoded == 0  # never loaded
    torch.testing.assert_close(got_context, context[[2, 1]])
    torch.testing.assert_close(got_pooled, pooled[[2, 1]])

    other = PretrainedTextEncoder(sd3_config(encoders[:1] + encoders[2:], "model.pooled_dim=20",
                                             "model.context_dim=32").text, 32, 20)
    assert "was made by other encoders" in use_precomputed(other, folder) and not other.frozen.rows


def test_text_encoder_config_reads_a_comma_separated_list_and_refuses_byte_with_others(encoders) -> None:
    cfg = sd3_config(encoders)
    assert cfg.text.encoder == tuple(map(str, encoders))
    with pytest.raises(ConfigError, match="`byte` cannot be joined"):
        load_config(None, [f"text.encoder=byte,{encoders[0]}"])


@pytest.mark.parametrize("overrides, message", [
    (["model.context_dim=64"], "model.context_dim: the encoders .clip 24 \\+ clip 16 \\+ t5 32. give 40-wide token "
                               "states, the config says 64; set model.context_dim=40"),
    (["model.pooled_dim=40"], "model.pooled_dim: the encoders give a 32-wide pooled vector, the config says 40; "
                              "set model.pooled_dim=32"),
])
def test_dimension_mismatches_name_the_key_and_the_value(encoders, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Denoiser(sd3_config(encoders, *overrides))


def test_a_folder_that_is_not_a_text_model_and_an_unreachable_hub_id_each_give_one_message(tmp_path) -> None:
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="is a 'vit' model, not a text encoder sd3ray joins"):
        inspect(str(tmp_path / "vit"))
    with pytest.raises(TextEncoderError, match="has no readable config.json, so it is not a Hugging Face text model"):
        inspect(str(tmp_path / "empty"))
    # tests run offline (HF_HUB_OFFLINE, tests/conftest.py): the hub answers at once that it cannot be reached
    with pytest.raises(TextEncoderError, match="could not fetch 'openai/clip-vit-large-patch14' from the Hugging "
                                               "Face hub .*hf download openai/clip-vit-large-patch14"):
        inspect("openai/clip-vit-large-patch14")
