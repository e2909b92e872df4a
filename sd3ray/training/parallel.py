"""Data parallelism around the one training step: DDP or FSDP2, and activation checkpointing of the MM-DiT blocks.

`resolve_parallel` decides (`train.parallel`, `train.activation_checkpointing`); `wrap` applies the decision to the
model, and every RunContext's `prepare_model` calls it; `shard_like` shards the EMA copy as the model. `train_step`
does not know which it runs under. With FSDP2 each parameter, its gradient and its AdamW moments are DTensors sharded
on dim 0 over the workers: a block's forward pre-hook all-gathers its weights, and its backward reduce-scatters the
gradients averaged over the workers, as DDP's all-reduce averages them, so the maths of a step is DDP's.

Memory model: bytes per parameter per rank, fp32 master weights (docs/parallel.md checks it against measurements):

    weights 4 + EMA 4 + gradients 4 + AdamW moments 8 = 20 under DDP (24 over several workers: DDP's gradient
    buckets, 4 more, measured), 20 / N under FSDP over N ranks,

plus, under FSDP, the unsharded weights and gradients of the block that runs (in bf16 with bf16 autocast). A frozen
parameter (a LoRA base) costs its weights alone: no gradient, no moments, and the EMA shares it. Activations come
on top, per image of the batch; activation checkpointing keeps only each checkpointed block's inputs and recomputes
the rest in backward.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sd3ray.config import Config, ConfigError

if TYPE_CHECKING:
    from sd3ray.checkpoint import CheckpointData
    from sd3ray.core.ema import EMA

ParallelMode = Literal["none", "ddp", "fsdp"]
# bytes per parameter: every parameter has fp32 weights; a trained one also an EMA, a gradient and two moments
BYTES_ALL_PARAMS = {"weights": 4}
BYTES_TRAINED_PARAMS = {"EMA": 4, "gradients": 4, "AdamW moments": 8}
DDP_BUCKET_BYTES = 4  # per trained parameter: DDP's gradient buckets, beside the gradients, over several workers
# auto keeps DDP while the training state takes at most this share of one device: the rest is for activations,
# which grow with the batch (docs/parallel.md measures both)
FIT_FRACTION = 0.5
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."  # what torch's checkpoint_wrapper adds to parameter names


@dataclass(frozen=True)
class ParallelPlan:
    """How the step's model is spread over the workers."""

    mode: ParallelMode  # none: one worker (nothing to replicate); ddp: a replica per worker; fsdp: sharded
    world_size: int
    checkpoint_every: int  # activation checkpointing: one MM-DiT block in this many, from the first; 0 = none
    param_dtype: torch.dtype | None  # FSDP's dtype for the gathered weights: bf16 under bf16 autocast, else fp32
    reason: str  # one console line: what was chosen and why

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"


class TrainingState(Protocol):
    """What of sd3ray.training.step.TrainState these functions read and restore."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    plan: ParallelPlan
    unsharded_ema: UnshardedCopy | None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def checkpoint_interval(spec: str) -> int:
    """`train.activation_checkpointing` as an interval: none -> 0, blocks -> 1, every_N -> N."""
    match spec:
        case "none":
            return 0
        case "blocks":
            return 1
    return int(spec.removeprefix("every_"))


def state_bytes(model: nn.Module, ranks: int = 1, ddp_buckets: bool = False) -> float:
    """Bytes of weights, EMA, gradients and AdamW moments per rank (the memory model above), activations aside:
    sharded over `ranks`, or with `ddp_buckets` a DDP replica's over several workers."""
    everything = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_trained = sum(BYTES_TRAINED_PARAMS.values()) + (DDP_BUCKET_BYTES if ddp_buckets else 0)
    return (sum(BYTES_ALL_PARAMS.values()) * everything + per_trained * trained) / ranks


def device_memory(device: torch.device) -> int:
    """Bytes one worker may use: its GPU's, or on a CPU the machine's memory shared by the workers on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def resolve_parallel(cfg: Config, device: torch.device, model: nn.Module, param_dtype: torch.dtype | None = None,
                     ranks: int | None = None, capacity: int | None = None) -> ParallelPlan:
    """`train.parallel` for `model` on `ranks` workers (default: the process group's size). auto: DDP while a DDP
    replica's training state (`state_bytes`) takes at most FIT_FRACTION of one device's memory (`capacity`, default
    `device_memory`), FSDP beyond; the reason says which figures decided it."""
    tc = cfg.train
    ranks = ranks or world_size()
    need = state_bytes(model)
    if tc.parallel != "auto":
        mode, why = tc.parallel, "set in the config"
    elif tc.lora.rank > 0:  # FSDP is refused for LoRA runs (sd3ray.config)
        mode, why = "ddp", "auto: a LoRA adapter's training state is small"
    else:
        have, replica = capacity or device_memory(device), state_bytes(model, ddp_buckets=ranks > 1)
        fits = replica <= FIT_FRACTION * have
        mode = "ddp" if fits else "fsdp"
        why = (f"auto: a replica's training state, {gib(replica)}, {'fits in' if fits else 'exceeds'} "
               f"{FIT_FRACTION:.0%} of one {device.type} worker's {gib(have)}")
    if mode == "ddp" and ranks == 1:
        mode, where = "none", "one worker"
    else:
        where = f"{mode} over {ranks} worker{'s' if ranks > 1 else ''}"
    per_rank = f", {gib(need / ranks)} of training state per worker" if mode == "fsdp" else ""
    every = checkpoint_interval(tc.activation_checkpointing)
    recompute = f", activation checkpointing {tc.activation_checkpointing}" if every else ""
    return ParallelPlan(mode, ranks, every, param_dtype if mode == "fsdp" else None,
                        f"parallel: {where} ({why}){per_rank}{recompute}")


def mmdit_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The MM-DiT blocks of a Denoiser (or of an MMDiT alone), where FSDP shards and activations are recomputed."""
    return getattr(getattr(model, "mmdit", model), "blocks", None)


def checkpoint_blocks(model: nn.Module, every: int) -> None:
    """Recompute one block in `every` (0: none) in backward: each such block keeps only its inputs. The RNG state is
    kept and restored for the recomputation, so anything random inside a block (adapter dropout) draws alike."""
    if not every:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = mmdit_blocks(model)
    if blocks is None:
        raise ConfigError("train.activation_checkpointing: this model has no MM-DiT blocks to recompute; set none")
    for i in range(0, len(blocks), every):
        blocks[i] = checkpoint_wrapper(blocks[i])


def shard(module: nn.Module, plan: ParallelPlan, device: torch.device, mixed: bool = True) -> None:
    """FSDP2 in place: each MM-DiT block is one group (all-gathered for its forward and backward, then freed), the
    rest (embedders, text encoder, final layer) the root's. `mixed`: gather weights in `plan.param_dtype` and reduce
    gradients in fp32; the shards FSDP moves to `device` stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (plan.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=torch.float32) \
        if mixed and plan.param_dtype is not None else MixedPrecisionPolicy()
    for block in mmdit_blocks(module) or []:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def wrap(model: nn.Module, plan: ParallelPlan, device: torch.device) -> nn.Module:
    """What the step calls: `model` with its blocks checkpointed per the plan, then wrapped in DDP, or sharded in
    place by FSDP2 (the same module, its parameters now DTensors), or as it is on one worker."""
    checkpoint_blocks(model, plan.checkpoint_every)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if plan.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        cuda = {"device_ids": [device], "output_device": device} if device.type == "cuda" else {}
        return DistributedDataParallel(model, **cuda)
    if plan.mode == "fsdp":
        if not dist.is_initialized():  # one process of its own (local mode): a group of one rank
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        shard(model, plan, device)
    return model


def shard_like(ema_model: nn.Module, plan: ParallelPlan, device: torch.device) -> None:
    """Shard the EMA copy exactly as `wrap` sharded the model, so each rank averages its own slices in place. It
    never runs forward sharded: evaluation gathers it (`evaluation_model`)."""
    if plan.sharded:
        shard(ema_model, plan, device, mixed=False)


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor, without importing DTensor's module (most of a second) where nothing has: no
    tensor can be one then."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class UnshardedCopy:
    """Rank 0's unsharded twin of a sharded module (the EMA), so that rank 0 can evaluate it alone. Between uses it
    holds no memory (its tensors are on the meta device); `gather` fills it from every rank's shards one tensor at a
    time, so no rank holds more than one whole tensor beyond its shards while rank 0 fills its copy."""

    def __init__(self, module: nn.Module) -> None:
        """`module`: the unsharded original, before `shard`."""
        persistent = set(module.state_dict())
        # buffers no state dict carries (sin-cos positions, a device anchor) are kept as they are
        self.buffers = {name: b.detach().clone() for name, b in module.named_buffers() if name not in persistent}
        self.module = copy.deepcopy(module).to("meta")

    def materialise(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Give the copy memory on `device`; returns its state dict for `gather` to fill."""
        self.module.to_empty(device=device)
        for name, value in self.buffers.items():
            self.module.get_buffer(name).copy_(value)
        return self.module.state_dict()

    def release(self) -> None:
        self.module.to("meta")


def gather(sharded: nn.Module, into: UnshardedCopy | None, device: torch.device) -> nn.Module | None:
    """Collective: every rank calls it, rank 0 with its `UnshardedCopy`, the others with None. Rank 0 gets the copy
    holding `sharded`'s values; the others None."""
    target = into.materialise(device) if into is not None else None
    for name, value in sharded.state_dict().items():  # the same order on every rank
        whole = value.full_tensor() if is_dtensor(value) else value
        if target is not None:
            target[name].copy_(whole)
    return into.module if into is not None else None


@contextmanager
def evaluation_model(state: TrainingState) -> Iterator[nn.Module | None]:
    """The EMA model for rank 0 to evaluate: `state.ema.model` itself, or under FSDP (a collective: every rank
    enters) an unsharded copy gathered on rank 0 and freed on exit; the other ranks get None."""
    if not state.plan.sharded:
        yield state.ema.model
        return
    gathered = gather(state.ema.model, state.unsharded_ema, state.device)
    try:
        yield gathered
    finally:
        if state.unsharded_ema is not None:
            state.unsharded_ema.release()


def whole_state_dicts(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's and the EMA's whole state dicts, for exports (the final weights-only checkpoint, the MLflow
    model). Under FSDP a collective that leaves them in rank 0's host memory ({} on the other ranks)."""
    if not state.plan.sharded:
        return state.model.state_dict(), state.ema.model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(state.model, options=options), get_model_state_dict(state.ema.model, options=options)


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s whole state dict on every rank: under FSDP a collective that gathers every tensor everywhere (for
    small models and tests; exports use `whole_state_dicts`, which gathers on rank 0 alone)."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def checkpoint_state(state: TrainingState) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What a checkpoint holds of the model, the EMA and AdamW: this rank's shards under FSDP (keyed by parameter
    name, which DCP reshards to any worker count), else the whole state dicts as single-file checkpoints keep them."""
    if not state.plan.sharded:
        return state.model.state_dict(), state.ema.model.state_dict(), state.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return (get_model_state_dict(state.model), get_model_state_dict(state.ema.model),
            get_optimizer_state_dict(state.model, state.optimizer))


def restore_training_state(path: Any, cfg: Config, state: TrainingState) -> CheckpointData:
    """Load a checkpoint of either layout into `state` (model, EMA, AdamW, scheduler) under any plan: a sharded one
    through DCP, each rank reading only what its shards need (or the whole tensors where the model is not sharded);
    a single-file one whole on every rank, then sharded where the model is. Returns the checkpoint (RNG, meta)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from sd3ray.checkpoint import is_sharded_checkpoint, load_checkpoint, load_sharded

    model, ema, optimizer = state.model, state.ema.model, state.optimizer
    if is_sharded_checkpoint(path):
        targets = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
                   "optimizer": get_optimizer_state_dict(model, optimizer)}
        data = load_sharded(path, targets, expected=cfg)
        set_model_state_dict(model, data.model)
        set_model_state_dict(ema, data.ema)
        set_optimizer_state_dict(model, optimizer, data.optimizer)
    else:
        data = load_checkpoint(path, expected=cfg, map_location=state.device, weights_only_ok=False)
        if state.plan.sharded:
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, data.model, options=whole)
            set_model_state_dict(ema, data.ema, options=whole)
            set_optimizer_state_dict(model, optimizer, optimizer_by_name(data.optimizer, model, optimizer),
                                     options=whole)
        else:
            model.load_state_dict(data.model)
            ema.load_state_dict(data.ema)
            optimizer.load_state_dict(data.optimizer)
    state.scheduler.load_state_dict(data.scheduler)
    # loading restored the checkpoint's hyperparameters with the moments: a resume with --set train.adam_beta2 or
    # train.weight_decay steps with the new ones, as it does with a new train.lr or schedule (the loop sets the
    # rate once it knows the horizon: sd3ray.training.step.reschedule_after_resume)
    for group in optimizer.param_groups:
        group["betas"], group["weight_decay"] = (group["betas"][0], cfg.train.adam_beta2), cfg.train.weight_decay
    return data


def optimizer_by_name(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A single-file checkpoint's optimizer state (keyed by each parameter's index in the optimizer) keyed by
    parameter name instead, as the FSDP state-dict API reads it. Indices follow `optimizer`'s parameter order, which
    is the order it was built in when the checkpoint was written."""
    name_of = {id(p): name.replace(CHECKPOINT_PREFIX, "") for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {names[i]: value for i, value in saved["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in saved["param_groups"]]}
