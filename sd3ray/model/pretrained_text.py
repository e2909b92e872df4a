"""Frozen pretrained text encoders, joined as SD3 joins CLIP-L, CLIP-G and T5-XXL (Esser et al. 2024, §5.2).

    pooled  = concat(CLIP pooled projections)                                   (B, sum of projection dims)
    context = concat_seq(pad_channels(concat_channels(CLIP penultimate states)), pad_channels(T5 states))
                                                                                (B, L_clip + L_t5, max width)

With no CLIP the pooled vector is T5's masked mean over real tokens (SD3 always has a CLIP; sd3ray lets a T5 alone
condition a model). Padding tokens are masked out of joint attention, as the byte encoder's are.

The encoders never train: they hold no registered parameters, so the optimizer, DDP, the EMA and checkpoints never
see them. They are loaded only when a prompt's embeddings are not already known: every distinct prompt is encoded
once and cached, and a precomputed table (`jobs/prepare_data.py --text-encoder`) fills the cache without loading
them at all. `tokenize` returns a cache row per prompt as its "ids", so training batches, the prompt bank and the
samplers use the same (ids, mask) interface as the byte encoder.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd3ray.config import ConfigError, TextConfig
from sd3ray.errors import Sd3rayError

CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5",)
# what a folder's content hash reads: the weights, the model config and the tokenizer files
HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


class TextEncoderError(Sd3rayError):
    """A pretrained text encoder is missing, not a text model, unreachable, or not the one a checkpoint used."""


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder as found on disk: what it is and its dimensions, read from its config.json without loading it."""

    source: str  # as the user gave it: a folder or a hub id
    folder: Path  # where its files are
    kind: str  # "clip" | "t5"
    width: int  # hidden size: channels of its token states
    pooled: int  # CLIP projection dim; 0 for T5


def is_pretrained(cfg: TextConfig) -> bool:
    return tuple(cfg.encoder) != ("byte",)


def locate(source: str) -> Path:
    """The local folder of `source`: a folder as given, else a hub id from the local cache, else downloaded."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are ORG/NAME
        if not path.is_dir():
            raise TextEncoderError(f"text.encoder: {source} is not a folder on this machine. Put the encoder "
                                   f"there (a hub model: `hf download ORG/NAME --local-dir {source}`), or name "
                                   f"the folder it is in with --set text.encoder=...")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise TextEncoderError(f"text.encoder: could not fetch {source!r} from the Hugging Face hub "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). Where there is network, "
                               f"run `hf download {source} --local-dir DIR`, copy DIR here and set "
                               f"text.encoder=DIR") from None


def inspect(source: str) -> EncoderSpec:
    """Read `source`'s config.json: a CLIP text model or a T5 encoder, or one message saying it is neither."""
    folder = locate(source)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TextEncoderError(f"text.encoder: {source} has no readable config.json, so it is not a Hugging Face "
                               f"text model; point it at a CLIP text model or a T5 encoder folder") from None
    model_type = config.get("model_type", "")
    if model_type in CLIP_TYPES:
        text = config.get("text_config", config) if model_type == "clip" else config
        projection = text.get("projection_dim", config.get("projection_dim", 0))
        return EncoderSpec(source, folder, "clip", int(text["hidden_size"]), int(projection))
    if model_type in T5_TYPES:
        return EncoderSpec(source, folder, "t5", int(config["d_model"]), 0)
    raise TextEncoderError(f"text.encoder: {source} is a {model_type or 'unknown'!r} model, not a text encoder "
                           f"sd3ray joins; use CLIP text models (model_type clip_text_model or clip) and/or one "
                           f"T5 encoder (t5)")


def fingerprint(cfg: TextConfig) -> list[dict[str, str]]:
    """[{source, kind, sha256}] per encoder `text.encoder` names: what a checkpoint and a precomputed table record."""
    return [{"source": s.source, "kind": s.kind, "sha256": folder_hash(s.folder)} for s in map(inspect, cfg.encoder)]


def same_encoders(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    """The same encoders in the same order, wherever their folders are."""
    return [(e["kind"], e["sha256"]) for e in a] == [(e["kind"], e["sha256"]) for e in b]


def joined_dims(specs: list[EncoderSpec]) -> tuple[int, int]:
    """(context_dim, pooled_dim) of the joined encoders."""
    clips = [s for s in specs if s.kind == "clip"]
    t5s = [s for s in specs if s.kind == "t5"]
    context = max(sum(s.width for s in clips), *(s.width for s in t5s)) if t5s else sum(s.width for s in clips)
    pooled = sum(s.pooled for s in clips) if clips else t5s[0].width
    return context, pooled


def folder_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of the files that define the encoder (16 hex), read once per process for
    files of unchanged sizes and times (the weights of a large encoder take seconds to hash)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in HASHED_SUFFIXES)
    return _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=32)
def _hash_files(stamped: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamped:
        path = Path(name)
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class _Frozen:
    """The loaded encoders and the embedding cache, shared by a model and its EMA copy (deepcopy returns it)."""

    def __init__(self) -> None:
        self.models: list[tuple[EncoderSpec, Any, Any]] | None = None  # (spec, tokenizer, model)
        self.rows: dict[str, int] = {}
        self.context: list[torch.Tensor] = []  # per row (L, D) float32, CPU
        self.pooled: list[torch.Tensor] = []  # per row (P,)
        self.mask: list[torch.Tensor] = []  # per row (L,) bool
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # stacked, per device
        self.encoded = 0  # prompts the encoders themselves encoded (not read from a table)

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self


class PretrainedTextEncoder(nn.Module):
    """Frozen CLIP/T5 encoders: tokenize(prompts) -> (rows (B,1) long, mask (B,L) bool); forward(rows, mask) ->
    context (B,L,D), pooled (B,P). No parameters: nothing here trains."""

    def __init__(self, cfg: TextConfig, context_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs = [inspect(source) for source in cfg.encoder]
        if sum(s.kind == "t5" for s in self.specs) > 1:
            raise TextEncoderError("text.encoder: name at most one T5 encoder (SD3 joins CLIP-L, CLIP-G and one T5)")
        want_context, want_pooled = joined_dims(self.specs)
        names = " + ".join(f"{s.kind} {s.width}" for s in self.specs)
        if context_dim != want_context:
            raise ConfigError(f"model.context_dim: the encoders ({names}) give {want_context}-wide token states, the "
                              f"config says {context_dim}; set model.context_dim={want_context}")
        if pooled_dim != want_pooled:
            raise ConfigError(f"model.pooled_dim: the encoders give a {want_pooled}-wide pooled vector, the config "
                              f"says {pooled_dim}; set model.pooled_dim={want_pooled}")
        self.context_dim = context_dim
        self.frozen = _Frozen()
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(): the device to encode on

    def fingerprint(self) -> list[dict[str, str]]:
        return fingerprint(self.cfg)

    # ---------------------------------------------------------------------------------------------- the cache

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows (B,1) long and masks (B,L) bool on this module's device, encoding unseen prompts once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.frozen.rows]
        if missing:
            self.add(missing, *self.encode(missing))
            self.frozen.encoded += len(missing)
        device = self.anchor.device
        rows = torch.tensor([[self.frozen.rows[p]] for p in prompts], dtype=torch.long, device=device)
        mask = torch.stack([self.frozen.mask[self.frozen.rows[p]] for p in prompts]).to(device)
        return rows, mask

    def add(self, prompts: list[str], context: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> None:
        """Put embeddings (B,L,D), (B,P), (B,L) in the cache: the encoders' own, or a precomputed table's."""
        f = self.frozen
        for i, prompt in enumerate(prompts):
            if prompt not in f.rows:
                f.rows[prompt] = len(f.context)
                f.context.append(context[i].float().cpu())
                f.pooled.append(pooled[i].float().cpu())
                f.mask.append(mask[i].bool().cpu())
        f.tables.clear()

    def forward(self, rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (B,1), mask (B,L') -> context (B,L',D), pooled (B,P); L' <= L when the caller trimmed padding."""
        f = self.frozen
        if rows.device not in f.tables:
            f.tables[rows.device] = (torch.stack(f.context).to(rows.device), torch.stack(f.pooled).to(rows.device))
        context, pooled = f.tables[rows.device]
        index = rows[:, 0]
        return context[index, : mask.shape[1]], pooled[index]

    # --------------------------------------------------------------------------------------------- encoding

    def load(self) -> list[tuple[EncoderSpec, Any, Any]]:
        """The tokenizers and models, loaded once, in eval mode and without gradients."""
        if self.frozen.models is None:
            from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            loaded = []
            for spec in self.specs:
                cls = CLIPTextModelWithProjection if spec.kind == "clip" else T5EncoderModel
                try:
                    tokenizer = AutoTokenizer.from_pretrained(spec.folder)
                    model = cls.from_pretrained(spec.folder)
                except (OSError, ValueError) as exc:
                    raise TextEncoderError(f"text.encoder: {spec.source} could not be loaded as a {spec.kind} "
                                           f"encoder with its tokenizer ({str(exc).splitlines()[0][:200]})") from None
                loaded.append((spec, tokenizer, model.eval().requires_grad_(False).to(self.anchor.device)))
            self.frozen.models = loaded
        return self.frozen.models

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts -> context (B,L,D), pooled (B,P), mask (B,L), joined as SD3 joins them (module docstring)."""
        device = self.anchor.device
        clip_states, clip_pooled, clip_masks, t5 = [], [], [], None
        for spec, tokenizer, model in self.load():
            limit = min(self.cfg.max_length, getattr(tokenizer, "model_max_length", self.cfg.max_length))
            tokens = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device).bool()
            if spec.kind == "clip":
                out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
                clip_states.append(out.hidden_states[-2])  # penultimate layer, as SD3
                clip_pooled.append(out.text_embeds)
                clip_masks.append(mask)
            else:
                t5 = (model(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask)
        parts, masks = [], []
        if clip_states:
            length = min(s.shape[1] for s in clip_states)
            parts.append(torch.cat([s[:, :length] for s in clip_states], dim=-1))
            masks.append(torch.stack([m[:, :length] for m in clip_masks]).any(0))
        if t5 is not None:
            parts.append(t5[0])
            masks.append(t5[1])
        context = torch.cat([nn.functional.pad(p, (0, self.context_dim - p.shape[-1])) for p in parts], dim=1)
        mask = torch.cat(masks, dim=1)
        if clip_pooled:
            pooled = torch.cat(clip_pooled, dim=-1)
        else:
            weights = t5[1].to(t5[0].dtype)[..., None]
            pooled = (t5[0] * weights).sum(1) / weights.sum(1).clamp_min(1)
        return context.float(), pooled.float(), mask
