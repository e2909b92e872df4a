"""LoRA fine-tuning through PEFT: what trains, what is saved, what a checkpoint needs to load, and the merge."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from sd3ray.checkpoint import CheckpointData, CheckpointError, latest_checkpoint, load_checkpoint, write_checkpoint
from sd3ray.config import ConfigError, load_config
from sd3ray.inference import generate
from sd3ray.model import Denoiser
from sd3ray.model.interop import fingerprint
from sd3ray.model.lora import AdapterEMA, adapter_size, merged_state, scale
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from sd3ray.training.step import StepSettings, build_train_state, train_step
from tests.sd3_models import MICRO_SD3, MICRO_SD3_SETS, make_sd3

pytest.importorskip("peft")
CPU = torch.device("cpu")
ATTENTION = {"img_qkv.qkv", "ctx_qkv.qkv", "img_proj", "ctx_proj"}
MLP = {"img_mlp.0", "img_mlp.2", "ctx_mlp.0", "ctx_mlp.2"}


@pytest.fixture
def lora_config(micro_config, tmp_path: Path):
    """micro_config with a tiny diffusers SD3 base (the micro model's shape) under a rank-4 adapter, scale 2."""
    base = make_sd3(tmp_path / "base", MICRO_SD3)

    def build(*overrides: str):
        return micro_config(*MICRO_SD3_SETS, f"model.init_from={base}", "train.lora.rank=4", "train.lora.alpha=8",
                            "train.warmup_steps=0", "train.lr=0.01", *overrides)

    build.base = base
    return build


def _batch(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    ids, mask = torch.randint(0, 255, (4, 6), generator=g), torch.ones(4, 6, dtype=torch.bool)
    return x0, ids, mask, torch.rand(4, generator=g), eps


def _adapted(model: torch.nn.Module) -> set[str]:
    """MM-DiT module names (block-relative) that carry an adapter."""
    return {name.split(".", 2)[2] for name, _ in model.mmdit.named_modules() if name.endswith(".lora_A")
            for name in [name.removesuffix(".lora_A")]}


def test_the_adapter_sits_on_the_attention_and_mlp_linears_and_only_it_trains(lora_config) -> None:
    torch.manual_seed(0)
    state = build_train_state(lora_config(), CPU, StepSettings(None, "none", "test"))
    model = state.model
    assert _adapted(model) == ATTENTION | MLP
    assert not hasattr(model.mmdit.blocks[1], "ctx_proj")  # the last block's text stream has no output side
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("text_encoder.") for n in trained)
    assert any(n.startswith("text_encoder.") for n in trained)  # a byte encoder learns with the adapter
    held = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}  # the base is not the optimizer's
    mlp_only = build_train_state(lora_config("train.lora.targets=[mlp]"), CPU, StepSettings(None, "none", "test"))
    assert {name.split(".")[0] for name in _adapted(mlp_only.model)} == {"img_mlp", "ctx_mlp"}
    for built, cfg in ((model, lora_config()), (mlp_only.model, lora_config("train.lora.targets=[mlp]"))):
        # the size formula the memory benchmark and docs/finetune.md use is what PEFT adds
        added = sum(p.numel() for n, p in built.mmdit.named_parameters() if ".lora_" in n)
        assert added == adapter_size(Denoiser(cfg).mmdit, cfg.train.lora) > 0


def test_a_step_moves_the_adapter_alone_and_the_ema_shares_the_frozen_base(lora_config) -> None:
    torch.manual_seed(0)
    state = build_train_state(lora_config(), CPU, StepSettings(None, "none", "test"))
    base = {n: p.detach().clone() for n, p in state.model.mmdit.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in state.model.named_parameters() if p.requires_grad}
    for step in range(3):
        train_step(state, *_batch(), step)
    for name, p in state.model.mmdit.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    moved = [n for n, p in state.model.named_parameters() if p.requires_grad and not torch.equal(p, adapter[n])]
    assert any(".lora_B." in n for n in moved)  # B starts at zero: the update really moved off the base
    assert isinstance(state.ema, AdapterEMA)
    live, ema = dict(state.model.mmdit.named_parameters()), dict(state.ema.model.mmdit.named_parameters())
    for name in base:  # one copy of the pretrained weights, not two
        assert ema[name].data_ptr() == live[name].data_ptr()
    lora_b = next(n for n in moved if ".lora_B." in n)  # the EMA averages it: neither where it began nor live
    ema_b, live_b = ema[lora_b.removeprefix("mmdit.")], live[lora_b.removeprefix("mmdit.")]
    assert not torch.equal(ema_b, live_b) and not torch.equal(ema_b, adapter[lora_b])


def test_merged_weights_compute_what_the_adapter_computes(lora_config) -> None:
    """W + (alpha/rank)·B·A in a plain Denoiser gives PEFT's forward (scale 2 here, so a wrong scale shows)."""
    cfg = lora_config()
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    for step in range(3):
        train_step(state, *_batch(), step)
    model = state.model.eval()
    from sd3ray.model.interop import load_pretrained

    plain = Denoiser(cfg)
    plain.load_state_dict(merged_state(load_pretrained(cfg.model), model.state_dict(), scale(cfg.train.lora)))
    x0, ids, mask, t, _ = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x0, t, ids, mask), model(x0, t, ids, mask), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.mmdit.blocks[0].img_proj.weight,
                                  model.mmdit.blocks[0].img_proj.base_layer.weight)


def _train(cfg, run_dir: Path, resume: Path | None = None):
    return train(cfg, LocalContext(run_dir, CPU, resume, keep=10), NullTracker())


def test_lora_checkpoints_hold_the_adapter_name_the_base_and_resume_exactly(lora_config, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then a resume for 2 more; the checkpoint holds the adapter (and the byte text
    encoder) with the base's source and hash, and loads for sampling as base + adapter."""
    common = ["train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.eval_every=100"]
    straight = _train(lora_config(*common), tmp_path / "a")
    _train(lora_config(*common[1:], "train.steps=2"), tmp_path / "b")
    resumed = _train(lora_config(*common), tmp_path / "b", resume=latest_checkpoint(tmp_path / "b/checkpoints"))
    a = load_checkpoint(Path(straight.checkpoint), weights_only_ok=False)
    b = load_checkpoint(Path(resumed.checkpoint), weights_only_ok=False)
    assert a.step == b.step == 4 and a.model.keys() == b.model.keys()
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]) and torch.equal(a.ema[key], b.ema[key]), key
    assert all(".lora_" in k or k.startswith("text_encoder.") for k in a.model)  # no base weight in it
    assert a.meta["base_model"] == fingerprint(lora_config.base.as_posix())
    base_bytes = (lora_config.base / "diffusion_pytorch_model.safetensors").stat().st_size
    adapter_bytes = sum(torch.numel(v) * 4 for k, v in a.ema.items() if ".lora_" in k)
    assert adapter_bytes < 0.5 * base_bytes
    # sampling loads base + adapter folded: a plain Denoiser computes what the trained LoRA model computes
    merged = load_checkpoint(Path(straight.checkpoint))
    plain = Denoiser(merged.config)
    plain.load_state_dict(merged.model)  # the live weights, folded
    x0, ids, mask, t, _ = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x0, t, ids, mask), straight.model.eval()(x0, t, ids, mask),
                                   atol=1e-5, rtol=1e-5)
    return_cfg = lora_config(*common, "train.lora.rank=8")
    with pytest.raises(CheckpointError, match="train.lora.rank: checkpoint has 4, config has 8"):
        load_checkpoint(Path(straight.checkpoint), expected=return_cfg, weights_only_ok=False)


def test_an_adapter_for_another_base_is_one_message(lora_config, tmp_path: Path) -> None:
    cfg = lora_config()
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    checkpoint = write_checkpoint(tmp_path / "ckpt", CheckpointData(0, cfg, {}, state.ema.model.state_dict()),
                                  weights_only=True)
    make_sd3(lora_config.base, {**MICRO_SD3}, seed=7)  # other weights at the same path
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter for the base model .*base \(sha256 [0-9a-f]{16}\), "
                                              r"but model.init_from .* now holds other weights"):
        load_checkpoint(checkpoint)


def test_the_pyfunc_model_loads_base_and_adapter(lora_config, tmp_path: Path) -> None:
    """The logged model holds the adapter; loading it reads the base from model.init_from and draws what the
    trained model draws."""
    from sd3ray.tracking.pyfunc import CHECKPOINT_ARTIFACT, Sd3rayModel, requirements

    cfg = lora_config("sample.steps=2")
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    for step in range(2):
        train_step(state, *_batch(), step)
    ema = state.ema.model.state_dict()
    folder = write_checkpoint(tmp_path / CHECKPOINT_ARTIFACT, CheckpointData(2, cfg, {}, ema), weights_only=True)
    base_bytes = (lora_config.base / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (folder / "model.pt").stat().st_size < base_bytes
    model = Sd3rayModel()
    model.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(folder)}))
    images = model.predict(None, pd.DataFrame({"prompt": ["3", "seven"]}), {"seed": 5, "guidance": 1.0})
    expected = generate(state.ema.model, ["3", "seven"], cfg, 5, CPU, guidance=1.0)
    assert (abs(images.astype(int) - expected.numpy().astype(int)) <= 1).all()
    assert "safetensors" in requirements(cfg)


def test_lora_without_a_base_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.lora.rank: a LoRA adapter trains on frozen pretrained weights"):
        load_config(None, ["train.lora.rank=4"])
    with pytest.raises(ConfigError, match="train.lora.targets\\[0\\]: 'qkv' is not allowed"):
        load_config(None, ["train.lora.targets=[qkv]"])
