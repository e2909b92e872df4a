"""LoRA fine-tuning of the MM-DiT through PEFT, over frozen pretrained weights (`model.init_from`).

Which linears (`train.lora.targets`): `attention` = each stream's fused q/k/v projection and its output projection
(and SD3.5's image-only attention's), `mlp` = both linears of each stream's MLP. A fused q/k/v adapter is three
adapters sharing A in diffusers' terms (sd3ray.model.interop exports it so).

The base is frozen (requires_grad False) and so never reaches the optimizer (`adamw` takes what requires grad), DDP
(it reduces only what requires grad) or the EMA (`AdapterEMA` averages the adapter and shares the base). In LoRA
mode the MM-DiT's `state_dict()` leaves the frozen base out and `load_state_dict` accepts a state without it: every
checkpoint, resume and logged model holds the adapter (MBs), and records the base's source and hash beside it
(sd3ray.checkpoint). `merged_state` folds the adapter in, W + (alpha/rank)·B·A, for sampling from and exporting a
checkpoint: one formula on state dicts, checked against PEFT's own forward in the tests.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from sd3ray.config import Config, LoraConfig
from sd3ray.core.ema import EMA
from sd3ray.errors import Sd3rayError
from sd3ray.model.interop import InteropError, load_pretrained

# MM-DiT module names (relative to the MMDiT) each target adapts, as PEFT matches them (re.fullmatch)
TARGET_PATTERNS = {
    "attention": r"blocks\.\d+\.(img_qkv2?\.qkv|ctx_qkv\.qkv|img_proj2?|ctx_proj)",
    "mlp": r"blocks\.\d+\.(img|ctx)_mlp\.[02]",
}
ADAPTER = "default"  # PEFT's adapter name: the one adapter sd3ray trains
FROZEN_ATTR = "lora_frozen_keys"  # on the MMDiT: its state keys that are frozen base weights


class LoraError(Sd3rayError):
    """PEFT is missing, or an adapter does not fit the model."""


def target_pattern(cfg: LoraConfig) -> str:
    return "(" + "|".join(TARGET_PATTERNS[t] for t in cfg.targets) + ")"


def adapter_size(mmdit: nn.Module, cfg: LoraConfig) -> int:
    """The parameters an adapter of `cfg` adds to `mmdit`: rank·(in + out) per targeted linear (A is rank×in, B
    out×rank). Reads only shapes, so a model built on the meta device answers for SD3's sizes."""
    pattern = re.compile(target_pattern(cfg))
    return sum(cfg.rank * (m.in_features + m.out_features) for name, m in mmdit.named_modules()
               if isinstance(m, nn.Linear) and pattern.fullmatch(name))


def scale(cfg: LoraConfig) -> float:
    """alpha / rank (alpha 0 = rank)."""
    return (cfg.alpha or cfg.rank) / cfg.rank


def prepare_finetune(model: nn.Module, cfg: Config) -> nn.Module:
    """A freshly built Denoiser with `model.init_from`'s weights, and with `train.lora` its MM-DiT frozen under
    adapters. Other modules (the benchmarks' MM-DiT-only models) are returned as they are."""
    mmdit = getattr(model, "mmdit", None)
    if mmdit is None:
        return model
    if cfg.model.init_from:
        load_into(mmdit, load_pretrained(cfg.model), cfg.model.init_from)
    if cfg.train.lora.rank:
        apply_lora(mmdit, cfg.train.lora)
    return model


def load_into(mmdit: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy an imported state into the MMDiT; any key or shape that differs is one InteropError."""
    own = mmdit.state_dict()
    wrong = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    extra, missing = sorted(state.keys() - own.keys()), sorted(own.keys() - state.keys())
    if wrong or extra or missing:
        detail = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:8]] + extra[:8] + \
            [f"missing {k}" for k in missing[:8]]
        raise InteropError(f"model.init_from {source} does not fit the MM-DiT model.* describes: {'; '.join(detail)}")
    mmdit.load_state_dict(state)


def apply_lora(mmdit: nn.Module, cfg: LoraConfig) -> None:
    """Inject PEFT LoRA layers into the MMDiT's target linears in place and freeze everything else in it."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError:
        raise LoraError("train.lora needs PEFT: pip install 'sd3ray[finetune]' (or pip install peft)") from None
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                              target_modules=target_pattern(cfg), bias="none")
    inject_adapter_in_model(peft_cfg, mmdit, adapter_name=ADAPTER)
    for name, param in mmdit.named_parameters():
        param.requires_grad_(".lora_" in name)
    setattr(mmdit, FROZEN_ATTR, frozenset(k for k in mmdit.state_dict() if ".lora_" not in k))
    mmdit.register_state_dict_post_hook(_drop_frozen)
    mmdit.register_load_state_dict_pre_hook(_remember_prefix)
    mmdit.register_load_state_dict_post_hook(_frozen_not_missing)


def is_lora(mmdit: nn.Module) -> bool:
    return hasattr(mmdit, FROZEN_ATTR)


def _drop_frozen(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    for key in getattr(module, FROZEN_ATTR):
        state.pop(prefix + key, None)


def _remember_prefix(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    module.lora_load_prefix = prefix


def _frozen_not_missing(module: nn.Module, incompatible: object) -> None:
    """The frozen base comes from model.init_from, not from the state: its absence is expected."""
    prefix, frozen = getattr(module, "lora_load_prefix", ""), getattr(module, FROZEN_ATTR)
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [k for k in missing if not (k.startswith(prefix) and k[len(prefix):] in frozen)]


class AdapterEMA(EMA):
    """The EMA of a LoRA model: its copy shares the frozen base with the live model (no second copy of the
    pretrained weights) and averages only what trains (the adapter, and a byte text encoder)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
        self.model = copy.deepcopy(model, {id(t): t for t in frozen}).eval().requires_grad_(False)
        self.trained = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(self.model.named_parameters())
        self.ema_params = [params[name] for name in self.trained]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        torch._foreach_lerp_(self.ema_params, [params[n].detach() for n in self.trained], 1.0 - self.decay_at(step))


def ema_for(model: nn.Module, decay: float) -> EMA:
    mmdit = getattr(model, "mmdit", None)
    return AdapterEMA(model, decay) if mmdit is not None and is_lora(mmdit) else EMA(model, decay)


# ------------------------------------------------------------------------------------------- state dicts

_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.[^.]+\.weight$")


def is_adapter_state(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in key for key in state)


def adapter_pairs(state: dict[str, torch.Tensor], prefix: str = "mmdit.") -> dict[str, tuple[torch.Tensor, ...]]:
    """{MMDiT module: (A (r, in), B (out, r))} of the adapters in a Denoiser state."""
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PAIR.match(key)
        if match and key.startswith(prefix):
            sides.setdefault(match["module"][len(prefix):], {})[match["side"]] = value
    broken = sorted(m for m, s in sides.items() if set(s) != {"A", "B"})
    if broken:
        raise LoraError(f"the adapter lacks lora_A or lora_B of {', '.join(broken)}")
    return {module: (s["A"], s["B"]) for module, s in sides.items()}


def merged_state(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                 lora_scale: float) -> dict[str, torch.Tensor]:
    """A plain Denoiser state: the MMDiT `base` (its own names) with every adapter folded in, W + scale·B·A, plus
    what the adapter state holds beside the MM-DiT (a trained byte text encoder)."""
    out = {f"mmdit.{k}": v for k, v in base.items()}
    pairs = adapter_pairs(adapter)
    for module, (a, b) in pairs.items():
        key = f"mmdit.{module}.weight"
        if key not in out:
            raise LoraError(f"the adapter adapts {module}, which the base model has no weight for")
        w = out[key]
        out[key] = (w.float() + lora_scale * (b.float() @ a.float())).to(w.dtype)
    for key, value in adapter.items():
        if not _PAIR.match(key):
            out[key.replace(".base_layer.", ".")] = value
    return out
