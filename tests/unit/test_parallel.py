"""Data parallelism in one process: the plan and its memory model, activation checkpointing, the sharded checkpoint
backend (written and read without a process group), and FSDP2 over a group of this process alone. Two processes
and Ray Train are the integration tier's (test_fsdp.py, test_ray_train.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from sd3ray.checkpoint import (
    CheckpointData,
    CheckpointError,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
)
from sd3ray.config import ConfigError, load_config
from sd3ray.core.flow import flow_loss
from sd3ray.model import Denoiser
from sd3ray.training.parallel import (
    CHECKPOINT_PREFIX,
    checkpoint_interval,
    checkpoint_state,
    evaluation_model,
    resolve_parallel,
    restore_training_state,
    state_bytes,
    whole_state_dicts,
)
from sd3ray.training.step import StepSettings, build_train_state, train_step

CPU = torch.device("cpu")
FP32 = StepSettings(None, "none", "test")


def _batch(cfg, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x0 = torch.randn(n, m.channels, m.image_size, m.image_size, generator=g)
    ids, mask = torch.randint(1, 200, (n, 5), generator=g), torch.ones(n, 5, dtype=torch.bool)
    return x0, ids, mask, torch.rand(n, generator=g), torch.randn(x0.shape, generator=g)


# ------------------------------------------------------------------------------------------------- the plan


def test_activation_checkpointing_takes_none_blocks_or_every_n() -> None:
    assert [checkpoint_interval(load_config(None, [f"train.activation_checkpointing={v}"]).train
                                .activation_checkpointing) for v in ("none", "blocks", "every_3")] == [0, 1, 3]
    for wrong in ("every_0", "sometimes", "every_"):
        with pytest.raises(ConfigError, match=r"train.activation_checkpointing: .* expected none, blocks or every_N"):
            load_config(None, [f"train.activation_checkpointing={wrong}"])
    with pytest.raises(ConfigError, match="train.parallel: 'sharded' is not allowed; expected one of 'auto', 'ddp'"):
        load_config(None, ["train.parallel=sharded"])


def test_the_memory_model_counts_20_bytes_per_trained_parameter_and_4_per_frozen_one() -> None:
    """weights 4 for every parameter; EMA 4, gradients 4 and AdamW moments 8 for a trained one (a frozen LoRA base
    is shared with the EMA); FSDP divides all of it by the worker count."""
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 5))  # 110 + 55 parameters
    assert state_bytes(model) == 20 * 165
    model[1].requires_grad_(False)
    assert state_bytes(model) == 20 * 110 + 4 * 55
    assert state_bytes(model, ranks=4) == (20 * 110 + 4 * 55) / 4


def test_auto_keeps_ddp_while_the_state_fits_half_a_device_and_shards_beyond(micro_config) -> None:
    cfg = micro_config()
    model = Denoiser(cfg)
    replica = state_bytes(model, ddp_buckets=True)  # 24 B/param: DDP's gradient buckets over several workers
    assert replica == state_bytes(model) * 24 / 20
    fits = resolve_parallel(cfg, CPU, model, ranks=2, capacity=int(2 * replica))
    assert fits.mode == "ddp" and not fits.sharded
    assert fits.reason.startswith("parallel: ddp over 2 workers (auto: a replica's training state") and \
        "fits in 50%" in fits.reason
    beyond = resolve_parallel(cfg, CPU, model, ranks=2, capacity=int(2 * replica) - 1)
    assert beyond.mode == "fsdp" and "exceeds 50%" in beyond.reason and "per worker" in beyond.reason
    assert resolve_parallel(cfg, CPU, model, ranks=1, capacity=10**12).mode == "none"  # one worker: nothing to do
    assert resolve_parallel(micro_config("train.parallel=fsdp"), CPU, model, ranks=1).mode == "fsdp"
    recomputed = resolve_parallel(micro_config("train.activation_checkpointing=every_2"), CPU, model, ranks=1)
    assert recomputed.checkpoint_every == 2 and recomputed.reason.endswith("activation checkpointing every_2")


def test_recomputed_blocks_leave_every_gradient_and_every_state_key_as_they_were(micro_config) -> None:
    """Activation checkpointing (here one block in two) recomputes what backward needs: the gradients are the
    very same, and checkpoints keep their keys (torch's wrapper hides itself from state dicts)."""
    grads, keys = {}, {}
    for recompute in ("none", "every_2"):
        cfg = micro_config(f"train.activation_checkpointing={recompute}", "model.depth=3")
        torch.manual_seed(0)
        state = build_train_state(cfg, CPU, FP32)
        x0, ids, mask, t, eps = _batch(cfg)
        flow_loss(partial(state.net, ids=ids, mask=mask), x0, eps, t).backward()
        grads[recompute] = {n.replace(CHECKPOINT_PREFIX, ""): p.grad for n, p in state.model.named_parameters()}
        keys[recompute] = list(state.model.state_dict())
    wrapped = [type(b).__name__ for b in state.model.mmdit.blocks]
    assert wrapped == ["CheckpointWrapper", "MMDiTBlock", "CheckpointWrapper"]
    assert keys["every_2"] == keys["none"]
    for name, grad in grads["none"].items():
        assert torch.equal(grads["every_2"][name], grad), name


# ----------------------------------------------------------------------------------- the sharded backend


def _sharded(cfg, step: int = 3) -> CheckpointData:
    """A sharded checkpoint's data as one process without a process group writes it: whole tensors."""
    torch.manual_seed(0)
    state = build_train_state(cfg, CPU, FP32)
    for s in range(2):
        train_step(state, *_batch(cfg), s)
    model, ema = get_model_state_dict(state.model), get_model_state_dict(state.ema.model)
    optimizer = get_optimizer_state_dict(state.model, state.optimizer)  # keyed by parameter name, as FSDP's
    return CheckpointData(step, cfg, model, ema, optimizer, state.scheduler.state_dict(),
                          {"torch": torch.get_rng_state()}, {"mlflow_run_id": "abc"}, sharded=True)


def test_a_sharded_checkpoint_is_one_folder_with_one_manifest_and_loads_whole_in_one_process(
        micro_config, tmp_path: Path) -> None:
    cfg = micro_config()
    data = _sharded(cfg)
    path = save_checkpoint(tmp_path, data, keep=2)
    assert path.name == "step_00000003" and latest_checkpoint(tmp_path) == path and is_sharded_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]  # no temporary folder left
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert {".metadata", "__0_0.distcp", "schedule.pt", "rng.pt", "meta.json", "config.yaml"} == set(manifest)
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["layout"], meta["world_size"], meta["step"], meta["mlflow_run_id"]) == ("sharded", 1, 3, "abc")
    loaded = load_checkpoint(path, expected=cfg, weights_only_ok=False)
    assert loaded.model.keys() == data.model.keys()
    for key, value in data.model.items():
        assert torch.equal(loaded.model[key], value) and torch.equal(loaded.ema[key], data.ema[key]), key
    assert loaded.scheduler == data.scheduler and torch.equal(loaded.rng["torch"], data.rng["torch"])
    assert loaded.optimizer is None  # the moments stay in the shards: a resume reads them (load_sharded)


def test_sampling_and_resume_read_a_sharded_checkpoint(micro_config, tmp_path: Path) -> None:
    """load_ema_model (sample, evaluate, the MLflow model, the registry) assembles the EMA in one process; a resume
    without a process group reads every tensor whole, AdamW's moments and learning rate included."""
    from sd3ray.inference import generate, load_ema_model

    cfg = micro_config()
    data = _sharded(cfg)
    path = save_checkpoint(tmp_path, data)
    model, saved_cfg, step = load_ema_model(str(path), CPU)
    assert step == 3 and saved_cfg == cfg
    for key, value in data.ema.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert generate(model, ["3", "7"], cfg, seed=0, device=CPU, steps=2).shape == (2, 1, 32, 32)
    torch.manual_seed(1)
    state = build_train_state(cfg, CPU, FP32)
    restored = restore_training_state(path, cfg, state)
    assert restored.step == 3 and restored.meta["mlflow_run_id"] == "abc"
    for key, value in data.model.items():
        assert torch.equal(state.model.state_dict()[key], value), key
    saved_moments = list(data.optimizer["state"].values())
    for saved, live in zip(saved_moments, state.optimizer.state.values(), strict=True):
        assert torch.equal(live["exp_avg_sq"], saved["exp_avg_sq"])
    assert state.optimizer.param_groups[0]["lr"] == data.optimizer["param_groups"][0]["lr"]
    # the config's AdamW settings, not the checkpoint's, step the resumed run
    changed = micro_config("train.adam_beta2=0.95", "train.weight_decay=0.01")
    state = build_train_state(changed, CPU, FP32)
    restore_training_state(path, changed, state)
    assert [(g["betas"], g["weight_decay"]) for g in state.optimizer.param_groups] == [((0.9, 0.95), 0.01)]


@pytest.mark.parametrize("fault", ["missing", "partial"])
def test_a_missing_or_partial_shard_is_one_message_naming_it(fault: str, micro_config, tmp_path: Path) -> None:
    cfg = micro_config()
    path = save_checkpoint(tmp_path, _sharded(cfg))
    shard = path / "__0_0.distcp"
    if fault == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = "__0_0.distcp is missing or does not match its checksum. Resume from an earlier checkpoint"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        load_sharded(path, {"model": {}, "ema": {}, "optimizer": {"state": {}}}, expected=cfg)


def test_a_sharded_checkpoint_of_another_model_names_each_key(micro_config, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _sharded(micro_config()))
    other = micro_config("model.depth=3", "train.lr=0.5")
    with pytest.raises(CheckpointError) as err:
        load_sharded(path, {"model": {}, "ema": {}, "optimizer": {"state": {}}}, expected=other)
    assert "was trained with a different model:\n  model.depth: checkpoint has 2, config has 3\n" in str(err.value)
    assert "train.lr" not in str(err.value)
    # a model whose tensors the checkpoint lacks (its code changed under the same config): one line, not DCP's trace
    with pytest.raises(CheckpointError, match=r"does not fit this model \(Missing key in checkpoint state_dict: "
                                              r"model\.extra\.weight\); resume it with the config it was trained with"):
        load_sharded(path, {"model": {"extra.weight": torch.zeros(2)}, "ema": {}, "optimizer": {"state": {}}})


def test_a_crash_mid_write_of_the_shards_leaves_nothing_resume_would_load(
        micro_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    cfg = micro_config()
    save_checkpoint(tmp_path, _sharded(cfg, step=2))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(Exception, match="no space left in .* while writing the step-3 checkpoint"):
        save_checkpoint(tmp_path, _sharded(cfg, step=3))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_index_is_refused_and_runs_nothing(micro_config, tmp_path: Path) -> None:
    """DCP's own reader unpickles its index unrestricted; sd3ray's reads only the index's own types."""
    path = save_checkpoint(tmp_path, _sharded(micro_config()))
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    data = (path / ".metadata").read_bytes()
    manifest[".metadata"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\.metadata holds something other than a checkpoint index"):
        load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------ FSDP2 over a group of one


@pytest.fixture
def group_of_one():
    """A process group of this process alone (in memory: no server, no other process), as a one-worker run has."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_steps_as_one_unsharded_worker_and_checkpoints_cross_between_layouts(
        micro_config, tmp_path: Path, group_of_one) -> None:
    """With one rank FSDP's gather and reduce-scatter move nothing, so its steps are the unsharded step's bit for
    bit; a single-file checkpoint resumes under FSDP and a sharded one without it, and rank 0's gathered EMA (what
    it evaluates) holds the EMA's values, released after."""
    plain_cfg, fsdp_cfg = micro_config("train.parallel=ddp", "train.grad_clip=0.05"), \
        micro_config("train.parallel=fsdp", "train.grad_clip=0.05")
    states = {}
    for name, cfg in (("plain", plain_cfg), ("fsdp", fsdp_cfg)):
        torch.manual_seed(0)
        states[name] = build_train_state(cfg, CPU, FP32)
        assert states[name].plan.mode == ("none" if name == "plain" else "fsdp")
        for step in range(2):
            train_step(states[name], *_batch(cfg, seed=step), step)
    plain, fsdp = states["plain"], states["fsdp"]
    whole, whole_ema = whole_state_dicts(fsdp)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(whole[key], value) and torch.equal(whole_ema[key], plain.ema.model.state_dict()[key]), key
    with evaluation_model(fsdp) as gathered:
        for key, value in gathered.state_dict().items():
            assert torch.equal(value, whole_ema[key]), key
        assert gathered.velocity_fn(["3"])(torch.zeros(1, 1, 32, 32), torch.ones(1)).shape == (1, 1, 32, 32)
    assert next(gathered.parameters()).is_meta  # the copy holds no memory between evaluations

    single = save_checkpoint(tmp_path / "single", CheckpointData(
        2, plain_cfg, *checkpoint_state(plain), plain.scheduler.state_dict(), {"torch": torch.get_rng_state()}))
    sharded = save_checkpoint(tmp_path / "sharded", CheckpointData(
        2, fsdp_cfg, *checkpoint_state(fsdp), fsdp.scheduler.state_dict(), {"torch": torch.get_rng_state()},
        sharded=True))
    resumed = {}
    for name, cfg, path in (("fsdp_from_single", fsdp_cfg, single), ("plain_from_sharded", plain_cfg, sharded)):
        torch.manual_seed(5)  # other initial weights: the checkpoint must replace them all
        resumed[name] = build_train_state(cfg, CPU, FP32)
        restore_training_state(path, cfg, resumed[name])
    for state in (plain, *resumed.values()):
        train_step(state, *_batch(plain_cfg, seed=2), 2)
    reference = plain.model.state_dict()
    for name, state in resumed.items():
        weights, _ = whole_state_dicts(state)
        for key, value in reference.items():
            assert torch.equal(weights[key], value), (name, key)
