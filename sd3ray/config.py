"""Typed, frozen run configuration loaded from YAML with dotted overrides.

Every job reads one `Config`. Unknown keys, wrong types and impossible combinations fail loudly with the
dotted key and what is allowed, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sd3ray.errors import Sd3rayError

TimestepScheme = Literal["uniform", "logit_normal", "mode", "cosmap"]
Prediction = Literal["velocity", "x0"]
SamplerName = Literal["euler", "heun"]
LrSchedule = Literal["constant", "cosine", "wsd"]
Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["auto", "none", "blocks", "whole"]
LogCheckpoints = Literal["final", "none"]
Loading = Literal["auto", "memory", "stream"]
DataSource = Literal["mnist", "shapes", "prepared"]
LatentDtype = Literal["float16", "float32"]
ShiftRule = Literal["sqrt", "flux"]
Parallel = Literal["auto", "ddp", "fsdp"]
ACTIVATION_CHECKPOINTING = re.compile(r"none|blocks|every_([1-9][0-9]*)")


class ConfigError(Sd3rayError, ValueError):
    """A configuration value is unknown, of the wrong type, or impossible together with another."""


@dataclass(frozen=True)
class ModelConfig:
    """MM-DiT shape. `context_dim`/`pooled_dim` must match the text encoder's width."""

    image_size: int = 32
    channels: int = 1
    patch_size: int = 2
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    context_dim: int = 256
    pooled_dim: int = 256
    # pixel-space convolutions around the transformer, 0 = off. conv_stem: channels of two 5×5 convolutions before
    # patchify (minRF's DiT stem), so each token sees its neighbours' pixels; conv_head: channels the final layer
    # predicts per pixel, mixed across patch edges by a 3×3 convolution, instead of each patch independently.
    conv_stem: int = 0
    conv_head: int = 0
    # convolutions in that head: 1 = one 3×3 convolution (linear end to end with the final layer), 2 = conv–SiLU–conv,
    # which can snap a stroke's pixels to ±1 per pixel, a nonlinearity the per-patch linear output cannot add
    conv_head_layers: int = 1
    # U-ViT's long skip connections (Bao et al. 2023): block depth−1−i takes block i's image tokens, concatenated with
    # its own input and projected back to the width, so late blocks see early, pixel-near features directly
    long_skips: bool = False
    # start from a diffusers SD3Transformer2DModel's weights (sd3ray.model.interop): a folder holding its config.json
    # and safetensors, a pipeline folder with a `transformer` subfolder, or a hub id; "" = random initialisation.
    # The keys above must describe the same model (a mismatch names every key and the values to set)
    init_from: str = ""
    # SD3's position table: fixed positions on a pos_embed_max_size² grid, centre-cropped to the token grid and kept
    # in checkpoints; 0 = sin-cos positions over the image_size grid, computed (today's pixel-space models)
    pos_embed_max_size: int = 0
    # the blocks with SD3.5's second, image-only attention (MMDiT-X, SD3.5 Medium: 0..12); () = none (SD3, SD3.5 Large)
    dual_attention_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextConfig:
    """The text encoder: the byte-level transformer trained jointly with the MM-DiT (`encoder: [byte]`, whose
    shape the other keys set), or frozen pretrained CLIP/T5 encoders joined as SD3 joins them
    (`sd3ray.model.pretrained_text`)."""

    # `byte`, or Hugging Face text models as local folders or hub ids (CLIPTextModelWithProjection, T5EncoderModel);
    # a comma-separated string is read as a list
    encoder: tuple[str, ...] = ("byte",)
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    max_length: int = 32
    prompt_dropout: float = 0.1  # probability of the empty prompt, for classifier-free guidance


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow timestep sampling (SD3 §3.1) and resolution shift (§5.3.2)."""

    scheme: TimestepScheme = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # the resolution shift α of §5.3.2, or auto: from each batch's token count m (sd3ray.core.flow.resolve_shift),
    # α = √(m / shift_reference_tokens) (shift_rule sqrt, SD3's), or Flux's exp(μ(m)) (shift_rule flux)
    shift: float | Literal["auto"] = 1.0
    shift_rule: ShiftRule = "sqrt"
    shift_reference_tokens: int = 256  # where α = 1: SD3's 256² pictures (32² latents at patch 2)
    num_val_levels: int = 8
    # what the network outputs: the velocity itself, or the clean image x0, turned into the velocity the loss and the
    # samplers use as v = (z_t − x̂0) / max(t, x0_t_min) (JiT, Li & He 2025: x-prediction with the velocity loss)
    prediction: Prediction = "velocity"
    x0_t_min: float = 0.05
    # this share of training timesteps drawn uniformly over (0, 1) instead of from `scheme`: coverage of the ends
    # (the low-noise end, where samples get their texture) added without moving draws away from the middle
    uniform_fraction: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    """Where the Parquet shards live and where raw MNIST is read from (or downloaded to)."""

    parquet_dir: str = "data/mnist_parquet"
    # what builds parquet_dir on first use when it is missing: MNIST from raw_root, the synthetic colour shapes,
    # or nothing (a set made beforehand with jobs/prepare_data.py)
    source: DataSource = "mnist"
    raw_root: str = "data"
    download: bool = True
    num_val_images: int = 512
    # the training split is held in memory, or streamed from its shards (Ray Data on Ray, pyarrow in local mode);
    # auto streams a set whose decoded train split is above stream_above_mb
    loading: Loading = "auto"
    stream_above_mb: float = 2048.0
    shuffle_buffer: int = 4096  # streaming: rows each worker shuffles through before batching
    prefetch_batches: int = 4  # streaming on Ray: batches each worker keeps ready ahead of the step


@dataclass(frozen=True)
class VaeConfig:
    """Latent space (sd3ray.model.vae): a frozen diffusers AutoencoderKL whose latents the MM-DiT denoises, or none
    (pixel space). With a VAE, model.channels and model.image_size are the latent's."""

    source: str = "none"  # none, or a folder or hub id (SD3's: a pipeline folder or id with subfolder vae)
    subfolder: str = ""
    cache_dtype: LatentDtype = "float16"  # what the latent cache (jobs/prepare_data.py --vae) stores
    # a set with no latent cache for this VAE and at most this many images is encoded once, in memory, at the
    # start of a run; a larger one is refused, naming the command that caches it (SD's VAE encodes ~6 pictures/s
    # of 64 px on 2 CPU cores: 2,000 take 5 minutes at every start, a cache takes them once)
    encode_in_memory_max: int = 2000
    batch_size: int = 64  # pictures per VAE encode or decode call


LoraTarget = Literal["attention", "mlp"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) on the MM-DiT's linears over the frozen `model.init_from` weights: attention
    = each stream's q/k/v and output projections, mlp = both linears of each stream's MLP. rank 0 = full
    fine-tuning (every weight trains)."""

    rank: int = 0
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0 = rank (scale 1)
    targets: tuple[LoraTarget, ...] = ("attention", "mlp")
    dropout: float = 0.0  # dropout on the adapter's input while training


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    batch_size: int = 64  # per worker; the global batch is batch_size × workers
    lr: float = 3e-4
    weight_decay: float = 0.0
    # AdamW's second-moment decay: PyTorch's 0.999 averages squared gradients over ~1,000 steps; 0.95-0.99 (LLM and
    # DiT recipes) follow a gradient scale that changes faster, as at a constant lr early in a run
    adam_beta2: float = 0.999
    warmup_steps: int = 500
    lr_schedule: LrSchedule = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    max_minutes: float = 0.0  # 0 = no wall-clock budget
    # with a budget, end the decay where the clock will stop the run instead of at `steps` (measured: a cosine over
    # the whole budget costs accuracy when it is far too short to converge; wsd's cooldown over its last 20% gained,
    # docs/quality.md)
    lr_decay_to_budget: bool = False
    # wsd (warmup-stable-decay): constant, then linear to zero over this last share of the run (or of the budget)
    decay_fraction: float = 0.2
    seed: int = 0
    # auto: bf16 autocast on a GPU; on a CPU, bf16 only where it has native bf16 matrix units and the config's
    # step measured faster in bf16 (sd3ray.training.step.resolve_step_settings says why; docs/performance.md)
    precision: Precision = "auto"
    # none | blocks (one graph per MM-DiT block) | whole (the denoiser as one graph) | auto (by device, as above)
    compile: CompileMode = "auto"
    # across workers: ddp (a whole replica of the training state on each), fsdp (FSDP2: weights, gradients, AdamW
    # moments and the EMA sharded over the workers; sharded checkpoints), or auto: ddp while the training state fits
    # one device with room for activations, fsdp beyond (sd3ray.training.parallel; docs/parallel.md)
    parallel: Parallel = "auto"
    # recompute MM-DiT blocks' activations in backward instead of keeping them: none, blocks (every block), or
    # every_N (one block in N, from the first); gradients are unchanged, memory falls and a step takes longer
    activation_checkpointing: str = "none"
    output_dir: str = "runs"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class SampleConfig:
    sampler: SamplerName = "euler"
    steps: int = 25
    guidance: float = 4.0
    shift: float | Literal["auto"] = 1.0  # auto: flow.shift_rule for the sampled size's token count
    # guidance acts only for t in [lo, hi] (Kynkäänniemi et al. 2024); elsewhere the conditional velocity alone
    guidance_interval: tuple[float, ...] = (0.0, 1.0)
    # autoguidance (Karras et al. 2024): guide with this weaker model (a checkpoint folder or URI, an MLflow run id,
    # models:/...) instead of the unconditional branch; "" = classifier-free guidance
    guide: str = ""


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 1000  # judged samples per eval (0 disables the judge metrics)
    batch_size: int = 250


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "sd3ray"
    run_name: str = ""
    parent_run_id: str = ""  # set by sweeps: the run is nested under this one in the MLflow UI
    log_checkpoints: LogCheckpoints = "final"
    log_model: bool = True  # the final EMA weights as an MLflow pyfunc model (load, register, serve)
    registered_model: str = ""  # register that model under this name (a new version per run)
    # at the end of a run, how long to wait for a tracking server that went away to take the writes kept for it
    flush_timeout_s: float = 120.0
    system_metrics_every_s: float = 10.0  # CPU/GPU use and memory as system/* metrics (rank 0); 0 = off


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Cross-field checks that no single type can express."""
    m, t, f, tr = cfg.model, cfg.text, cfg.flow, cfg.train
    for key, value in [("model.width", m.width), ("model.depth", m.depth), ("model.num_heads", m.num_heads),
                       ("model.patch_size", m.patch_size), ("model.image_size", m.image_size),
                       ("text.width", t.width), ("text.depth", t.depth), ("text.num_heads", t.num_heads),
                       ("text.max_length", t.max_length), ("train.batch_size", tr.batch_size),
                       ("train.log_every", tr.log_every), ("train.eval_every", tr.eval_every),
                       ("train.ckpt_every", tr.ckpt_every), ("train.keep_checkpoints", tr.keep_checkpoints),
                       ("flow.num_val_levels", f.num_val_levels), ("sample.steps", cfg.sample.steps)]:
        _require(value > 0, key, f"must be a positive integer, got {value}")
    _require(tr.steps >= 0, "train.steps", f"must be >= 0, got {tr.steps}")
    for key, value in [("model.conv_stem", m.conv_stem), ("model.conv_head", m.conv_head)]:
        _require(value >= 0, key, f"must be >= 0 (0 = off), got {value}")
    _require(m.conv_head_layers in (1, 2), "model.conv_head_layers",
             f"must be 1 (one convolution) or 2 (conv–SiLU–conv), got {m.conv_head_layers}")
    _require(m.conv_head_layers == 1 or m.conv_head > 0, "model.conv_head_layers",
             "a head of 2 convolutions needs its per-pixel channels: set model.conv_head too, e.g. model.conv_head=16")
    _require(not m.long_skips or m.depth >= 2, "model.long_skips", f"needs model.depth >= 2, got {m.depth}")
    if cfg.vae.source == "none":
        _require(m.channels in (1, 3), "model.channels", f"must be 1 or 3 in pixel space, got {m.channels}")
    else:  # the latent's channels: the VAE's files say how many, checked against them when it is read
        _require(m.channels > 0, "model.channels", f"must be positive, got {m.channels}")
    _require(bool(cfg.vae.source.strip()), "vae.source", "name none (pixel space) or a VAE folder or hub id")
    _require(cfg.vae.encode_in_memory_max >= 0, "vae.encode_in_memory_max", "must be >= 0 (0 = always cache)")
    _require(cfg.vae.batch_size > 0, "vae.batch_size", f"must be > 0, got {cfg.vae.batch_size}")
    _require(m.width % m.num_heads == 0, "model.width",
             f"{m.width} is not divisible by model.num_heads={m.num_heads}; choose a width that is a multiple of it")
    _require((m.width // m.num_heads) % 2 == 0, "model.width", "head dim (width / num_heads) must be even")
    _require(m.image_size % m.patch_size == 0, "model.image_size",
             f"{m.image_size} is not divisible by model.patch_size={m.patch_size}")
    _require(t.width % t.num_heads == 0, "text.width",
             f"{t.width} is not divisible by text.num_heads={t.num_heads}")
    _require(len(t.encoder) > 0 and all(e.strip() for e in t.encoder), "text.encoder",
             "name `byte` or one or more pretrained encoder folders or hub ids")
    _require("byte" not in t.encoder or len(t.encoder) == 1, "text.encoder",
             f"`byte` cannot be joined with pretrained encoders, got {list(t.encoder)}")
    if t.encoder == ("byte",):  # pretrained encoders' widths are read from their files when the model is built
        _require(m.context_dim == t.width, "model.context_dim",
                 f"must equal text.width ({t.width}), got {m.context_dim}")
        _require(m.pooled_dim == t.width, "model.pooled_dim",
                 f"must equal text.width ({t.width}), got {m.pooled_dim}")
    _require(0.0 <= t.prompt_dropout < 1.0, "text.prompt_dropout", f"must be in [0, 1), got {t.prompt_dropout}")
    _require(f.logit_std > 0, "flow.logit_std", f"must be > 0, got {f.logit_std}")
    # f_mode is a monotone map of [0,1] onto [0,1] only for -1 <= s <= 2/(pi-2) (SD3 §3.1).
    _require(-1.0 <= f.mode_scale <= 2.0 / (3.141592653589793 - 2.0), "flow.mode_scale",
             f"must be in [-1, 1.75] for a valid density, got {f.mode_scale}")
    _require(f.shift == "auto" or f.shift > 0, "flow.shift", f"must be > 0 or auto, got {f.shift}")
    _require(f.shift_reference_tokens > 0, "flow.shift_reference_tokens", "must be a positive token count")
    _require(0 < f.x0_t_min < 1, "flow.x0_t_min", f"must be in (0, 1), got {f.x0_t_min}")
    _require(0 <= f.uniform_fraction <= 1, "flow.uniform_fraction", f"must be in [0, 1], got {f.uniform_fraction}")
    _require(cfg.sample.shift == "auto" or cfg.sample.shift > 0, "sample.shift",
             f"must be > 0 or auto, got {cfg.sample.shift}")
    _require(cfg.sample.guidance >= 0, "sample.guidance", f"must be >= 0, got {cfg.sample.guidance}")
    interval = cfg.sample.guidance_interval
    _require(len(interval) == 2 and 0.0 <= interval[0] < interval[1] <= 1.0, "sample.guidance_interval",
             f"must be [lo, hi] with 0 <= lo < hi <= 1 (t = 1 is noise), got {list(interval)}")
    _require(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    _require(0.0 <= tr.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {tr.ema_decay}")
    _require(0.0 < tr.adam_beta2 < 1.0, "train.adam_beta2",
             f"must be in (0, 1), e.g. 0.95 or 0.999; got {tr.adam_beta2}")
    _require(tr.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {tr.warmup_steps}")
    _require(0 < tr.decay_fraction <= 1, "train.decay_fraction", f"must be in (0, 1], got {tr.decay_fraction}")
    _require(tr.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {tr.grad_clip}")
    _require(ACTIVATION_CHECKPOINTING.fullmatch(tr.activation_checkpointing) is not None,
             "train.activation_checkpointing",
             f"{tr.activation_checkpointing!r} is not allowed; expected none, blocks or every_N (N >= 1, e.g. every_2)")
    _require(tr.parallel != "fsdp" or tr.lora.rank == 0, "train.parallel",
             "fsdp does not shard a LoRA run (its EMA shares the frozen base with the model); an adapter's training "
             "state is small: set train.parallel=ddp or auto")
    _require(tr.max_minutes >= 0, "train.max_minutes", f"must be >= 0 (0 = no budget), got {tr.max_minutes}")
    _require(cfg.eval.num_samples >= 0, "eval.num_samples", f"must be >= 0, got {cfg.eval.num_samples}")
    _require(cfg.eval.batch_size > 0, "eval.batch_size", f"must be > 0, got {cfg.eval.batch_size}")
    _require(cfg.data.num_val_images > 0, "data.num_val_images", "must be > 0")
    validate_finetune(cfg)
    _require(cfg.data.stream_above_mb >= 0, "data.stream_above_mb", "must be >= 0")
    _require(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 = no row shuffle)")
    _require(cfg.data.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
    _require(cfg.tracking.system_metrics_every_s >= 0, "tracking.system_metrics_every_s",
             f"must be >= 0 (0 = off), got {cfg.tracking.system_metrics_every_s}")
    _require(cfg.tracking.flush_timeout_s >= 0, "tracking.flush_timeout_s",
             f"must be >= 0, got {cfg.tracking.flush_timeout_s}")


def validate_finetune(cfg: Config) -> None:
    """The pretrained-weights keys (model.init_from, the SD3 position table, dual attention) and train.lora."""
    m, lora = cfg.model, cfg.train.lora
    _require(m.pos_embed_max_size >= 0, "model.pos_embed_max_size",
             f"must be >= 0 (0 = off), got {m.pos_embed_max_size}")
    if m.pos_embed_max_size:
        grid = m.image_size // m.patch_size
        _require(grid <= m.pos_embed_max_size, "model.pos_embed_max_size",
                 f"{m.pos_embed_max_size} positions per side cannot cover model.image_size/model.patch_size = {grid}")
    bad = [i for i in m.dual_attention_layers if not 0 <= i < m.depth]
    _require(not bad, "model.dual_attention_layers", f"{bad} are not blocks of a model.depth={m.depth} model "
             f"(blocks are 0..{m.depth - 1})")
    _require(lora.rank >= 0, "train.lora.rank", f"must be >= 0 (0 = full fine-tuning), got {lora.rank}")
    _require(lora.alpha >= 0, "train.lora.alpha", f"must be >= 0 (0 = rank), got {lora.alpha}")
    _require(0.0 <= lora.dropout < 1.0, "train.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    _require(len(lora.targets) > 0 and len(set(lora.targets)) == len(lora.targets), "train.lora.targets",
             f"name each of attention, mlp at most once, got {list(lora.targets)}")
    _require(lora.rank == 0 or bool(m.init_from), "train.lora.rank",
             "a LoRA adapter trains on frozen pretrained weights: set model.init_from to the diffusers SD3 "
             "transformer it adapts, or train.lora.rank=0 to train every weight")


# ----------------------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin is tuple:  # tuple[X, ...]: a YAML list of X (X may be a dataclass)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return tuple(build_dataclass(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    wrong_bool = tp is bool and not isinstance(value, bool)
    wrong_int = tp is int and (isinstance(value, bool) or not isinstance(value, int))
    if wrong_bool or wrong_int:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp in (float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build any (nested, frozen) dataclass from a dict with the same checks as Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name] or {}, key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (possibly partial) nested dict."""
    return build_dataclass(Config, upgrade(data), "")


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Read configs written by earlier versions (checkpoints keep theirs): `train.compile` was a boolean, true
    meaning one graph per block. Also reads shorthands: `text.encoder` as one comma-separated string."""
    train = data.get("train") if isinstance(data, dict) else None
    if isinstance(train, dict) and isinstance(train.get("compile"), bool):
        data = {**data, "train": {**train, "compile": "blocks" if train["compile"] else "none"}}
    text = data.get("text") if isinstance(data, dict) else None
    if isinstance(text, dict) and isinstance(text.get("encoder"), str):  # `--set text.encoder=clip,t5`
        data = {**data, "text": {**text, "encoder": [e.strip() for e in text["encoder"].split(",")]}}
    return data


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"model.width": 384, ...}: the form MLflow params and Tune search spaces use."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict, returning a new one."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.width=512")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}") if raw.strip() else ""
    return out


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values (safe loader: plain data only), or a ConfigError naming `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}. Check indentation, colons and quotes") from None


# The checkout (or editable install) this package came from: where `configs/...` resolves when the working
# directory holds no such file, so the shipped configs work from any folder.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_shipped(path: str | Path) -> Path:
    """`path` as given when it exists (or is absolute); else the project's own file of that relative name."""
    p = Path(path)
    if p.is_file() or p.is_absolute() or not (PROJECT_ROOT / p).is_file():
        return p
    return PROJECT_ROOT / p


def read_yaml_file(path: str | Path, what: str, shipped: str) -> dict[str, Any]:
    """A YAML mapping from a file; a missing file, malformed YAML or a non-mapping is a ConfigError."""
    p = resolve_shipped(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; name a YAML file in it (the shipped ones are {shipped})")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; the shipped ones are {shipped}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 "
                          f"YAML") from None
    data = parse_yaml(text, f"{what} {p}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of sections (e.g. `train:`), not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the built-in defaults when `path` is None) and apply dotted overrides."""
    data = read_yaml_file(path, "config file", "in configs/") if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))
