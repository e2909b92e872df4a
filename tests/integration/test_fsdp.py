"""FSDP2 beside DDP in local process groups (gloo on CPU, no Ray): the same losses and weights, a shard of each
state per rank, activation checkpointing that changes no gradient, and sharded checkpoints resumed on another worker
count. Ray Train's side (sharded checkpoints in Ray storage, a lost worker, a 2 -> 1 resume, sampling) is in
test_ray_train.py.

Each test starts its processes with torch.multiprocessing (the unit tier starts none); every process runs a few
steps of the micro model with one thread.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from tests.support import MICRO, REPO_ROOT, free_port

CPU = torch.device("cpu")
SIDE_BY_SIDE_STEPS = 3
# two workers of batch 8 and one of batch 16 draw the same global batch (sd3ray.data.batches): a resume on another
# worker count continues the same curve, up to the order in which gradients are summed
RESUME = ["train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.log_every=1", "train.parallel=fsdp"]


class GroupContext(LocalContext):
    """LocalContext for one of several processes of a local gloo group: one run folder on a disk they share."""

    def __init__(self, run_dir: Path, resume: Path | None = None) -> None:
        super().__init__(run_dir, CPU, resume)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value


class LossRecorder(NullTracker):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "loss/train" in metrics:
            self.losses[step] = metrics["loss/train"]


def _launch(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _alone() -> None:
    """A group of this process alone: a one-worker run (rank 1 waits for rank 0 meanwhile)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _config(parquet: Path, out: Path, *overrides: str):
    from sd3ray.config import load_config

    return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, f"data.parquet_dir={parquet}", f"train.output_dir={out}", "train.precision=fp32",
        "train.compile=none", *overrides])


def _train(cfg, run_dir: Path, resume: Path | None, out: Path) -> None:
    """The loop on this rank; rank 0 writes the logged training losses to `out`."""
    from sd3ray.training.loop import train

    recorder = LossRecorder()
    ctx = GroupContext(run_dir, resume)
    train(cfg, ctx, recorder if ctx.is_main else NullTracker())
    if ctx.is_main:
        out.write_text(json.dumps(recorder.losses))


def _local_bytes(tensors) -> int:
    from sd3ray.training.parallel import is_dtensor

    return sum((t.to_local() if is_dtensor(t) else t).numel() * t.element_size() for t in tensors)


def _side_by_side(rank: int, world: int, parquet: Path, out: Path) -> None:
    """DDP and FSDP states stepped on the same batches; FSDP's shard sizes; one backward with and without
    recomputed blocks."""
    from sd3ray.core.flow import flow_loss
    from sd3ray.data.batches import TrainingBatches
    from sd3ray.data.format import read_split
    from sd3ray.training.parallel import CHECKPOINT_PREFIX, whole_state_dicts
    from sd3ray.training.step import StepSettings, build_train_state, train_step

    train_set, report = read_split(str(parquet), "train"), {}
    for mode in ("ddp", "fsdp"):  # a clip that bites: the global norm must be the same under both
        cfg = _config(parquet, out, "train.batch_size=8", f"train.parallel={mode}", "train.grad_clip=0.05")
        torch.manual_seed(cfg.train.seed)
        state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
        batches = TrainingBatches(train_set, cfg, rank, world, CPU, state.model.text_encoder.tokenize)
        losses, norms = [], []
        for step in range(SIDE_BY_SIDE_STEPS):
            loss, norm = train_step(state, *batches.get(step), step)
            dist.all_reduce(loss)
            losses.append(float(loss) / world)
            norms.append(float(norm))
        model, ema = whole_state_dicts(state)
        moments = [v for s in state.optimizer.state.values() for k, v in s.items() if k != "step"]
        report[mode] = {"losses": losses, "norms": norms, "model": model, "ema": ema,
                        "bytes": {"weights": _local_bytes(state.model.parameters()),
                                  "EMA": _local_bytes(state.ema.model.parameters()), "AdamW": _local_bytes(moments)}}
    grads = {}
    for recompute in ("none", "blocks"):
        cfg = _config(parquet, out, "train.batch_size=8", "train.parallel=fsdp",
                      f"train.activation_checkpointing={recompute}")
        torch.manual_seed(cfg.train.seed)
        state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
        x0, ids, mask, t, eps = TrainingBatches(train_set, cfg, rank, world, CPU).get(0)
        flow_loss(partial(state.net, ids=ids, mask=mask), x0, eps, t).backward()
        grads[recompute] = {name.replace(CHECKPOINT_PREFIX, ""): p.grad.full_tensor()
                            for name, p in state.model.named_parameters()}
    report["grads"] = grads
    torch.save(report, out / f"side_by_side_rank{rank}.pt")


def _restore_on_one(parquet: Path, out: Path, checkpoint: Path) -> None:
    """The state one worker restores from a two-worker checkpoint, whole, for a bit-for-bit comparison."""
    from sd3ray.training.parallel import restore_training_state, whole_state_dicts
    from sd3ray.training.step import StepSettings, build_train_state

    cfg = _config(parquet, out, *RESUME, "train.batch_size=16")
    state = build_train_state(cfg, CPU, StepSettings(None, "none", "test"))
    restore_training_state(checkpoint, cfg, state)
    model, ema = whole_state_dicts(state)
    torch.save({"model": model, "ema": ema}, out / "restored_on_one.pt")


def _workers(rank: int, world: int, port: int, parquet: Path, out: Path) -> None:
    """One worker (rank 0 alone) to step 2; two workers: DDP beside FSDP, the reference run to step 4, and the
    one-worker checkpoint continued (1 -> 2); one worker again: the reference's step-2 checkpoint continued
    (2 -> 1)."""
    two_batch, one_batch = [*RESUME, "train.batch_size=8"], [*RESUME, "train.batch_size=16"]
    if rank == 0:
        _alone()
        _train(_config(parquet, out, *one_batch, "train.steps=2"), out / "one", None, out / "one.json")
        dist.destroy_process_group()
    _join(rank, world, port)
    _side_by_side(rank, world, parquet, out)
    _train(_config(parquet, out, *two_batch), out / "two", None, out / "two.json")
    _train(_config(parquet, out, *two_batch), out / "one_then_two", out / "one" / "checkpoints" / "step_00000002",
           out / "one_then_two.json")
    dist.destroy_process_group()
    if rank == 0:
        _alone()
        two_at_2 = out / "two" / "checkpoints" / "step_00000002"
        _restore_on_one(parquet, out, two_at_2)
        _train(_config(parquet, out, *one_batch), out / "two_then_one", two_at_2, out / "two_then_one.json")
        dist.destroy_process_group()


def _losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def test_fsdp_trains_as_ddp_on_a_half_of_each_state_and_resumes_on_another_worker_count(
        mnist_parquet: Path, tmp_path: Path) -> None:
    """One local process, then two, then one again (one spawn: rank 0 alone runs the one-worker parts):

    - DDP and FSDP, same data, 3 steps with a clip that bites: the same losses, gradient norms, weights and EMA,
      to float tolerance (FSDP reduce-scatters what DDP all-reduces: the sums run in another order);
    - each FSDP rank holds half (±1 row of padding per tensor) of the weights, the EMA and the AdamW moments;
    - recomputing every block (activation checkpointing) leaves every gradient bit-identical;
    - a sharded checkpoint of two workers, restored on one, is bit-identical to what was saved; the losses that
      follow (one worker of batch 16) continue the two-worker curve to float tolerance, and so do those of a
      one-worker checkpoint continued on two (the gradient averages change order with the worker count)."""
    from sd3ray.checkpoint import is_sharded_checkpoint, load_checkpoint

    _launch(_workers, 2, mnist_parquet, tmp_path)

    report = torch.load(tmp_path / "side_by_side_rank0.pt", weights_only=False)
    ddp, fsdp = report["ddp"], report["fsdp"]
    torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fsdp["norms"], ddp["norms"], rtol=1e-5, atol=0)
    assert fsdp["model"].keys() == ddp["model"].keys()
    for key in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][key], ddp["model"][key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(fsdp["ema"][key], ddp["ema"][key], rtol=1e-5, atol=1e-6, msg=key)
    for rank in (0, 1):
        held = torch.load(tmp_path / f"side_by_side_rank{rank}.pt", weights_only=False)["fsdp"]["bytes"]
        whole = torch.load(tmp_path / f"side_by_side_rank{rank}.pt", weights_only=False)["ddp"]["bytes"]
        for part in ("weights", "EMA", "AdamW"):
            assert 0.45 < held[part] / whole[part] < 0.55, (rank, part, held[part], whole[part])
    for key, grad in report["grads"]["none"].items():
        assert torch.equal(report["grads"]["blocks"][key], grad), key

    two, two_then_one = _losses(tmp_path / "two.json"), _losses(tmp_path / "two_then_one.json")
    one_then_two = _losses(tmp_path / "one_then_two.json")
    assert sorted(two) == [1, 2, 3, 4] and sorted(two_then_one) == sorted(one_then_two) == [3, 4]
    for step in (3, 4):
        assert abs(two_then_one[step] - two[step]) <= 1e-5 * abs(two[step]), step
        assert abs(one_then_two[step] - two[step]) <= 1e-5 * abs(two[step]), step

    saved = tmp_path / "two" / "checkpoints" / "step_00000002"
    assert is_sharded_checkpoint(saved)
    whole = load_checkpoint(saved)  # assembled in this process: the loader's path for sampling and exports
    restored = torch.load(tmp_path / "restored_on_one.pt", weights_only=False)
    for key, value in whole.model.items():
        assert torch.equal(restored["model"][key], value), key
        assert torch.equal(restored["ema"][key], whole.ema[key]), key
    final_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000004")
    final_two_then_one = load_checkpoint(tmp_path / "two_then_one" / "checkpoints" / "step_00000004")
    for key, value in final_two.ema.items():
        torch.testing.assert_close(final_two_then_one.ema[key], value, rtol=1e-4, atol=1e-6, msg=key)
