"""sd3ray's MM-DiT <-> diffusers' `SD3Transformer2DModel`: the one module that knows diffusers' names.

One table (`module_map`) says which diffusers tensors each sd3ray module is made of; every conversion reads it:
    sd3ray                         diffusers
    x_embedder (linear over        pos_embed.proj (conv p×p, stride p): the same weights, the patch's
      (p1 p2 c) patches)             (c, p1, p2) moved last
    pos_embed (max², D)            pos_embed.pos_embed (1, max², D), with model.pos_embed_max_size
    t_embedder / pooled_embedder   time_text_embed.timestep_embedder / text_embedder (same sinusoid: cos first,
                                     no frequency shift, of t·1000 = diffusers' `timestep`)
    blocks.i.modulation (fused)    rows of norm1.linear then norm1_context.linear (the last block's context pair
                                     is (scale, shift) in diffusers, (shift, scale) here)
    blocks.i.{img,ctx}_qkv.qkv     rows of attn.to_{q,k,v} / attn.add_{q,k,v}_proj; q/k norms one to one
    blocks.i.img_qkv2, img_proj2   attn2 (SD3.5's image-only attention, model.dual_attention_layers)
    final_layer.modulation         norm_out.linear with its halves swapped ((scale, shift) in diffusers)
    final_layer.linear             proj_out (the same (p1 p2 c) token layout)
Supported: SD3 (Medium: no QK-norm), SD3.5 Large / Large Turbo (RMS QK-norm) and SD3.5 Medium (dual attention);
diffusers' ControlNet and IP-Adapter additions have no sd3ray counterpart and are refused by name. A key that maps
nowhere is an error listing it: nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sd3ray.config import ModelConfig
from sd3ray.errors import Sd3rayError
from sd3ray.model.embeddings import sincos_position_embedding

DIFFUSERS_CLASS = "SD3Transformer2DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_adapter / load_lora_weights read
SUBFOLDER = "transformer"  # where a pipeline folder or hub repository keeps its transformer
DIFFUSERS_MLP_RATIO = 4.0  # diffusers' FeedForward default, fixed in SD3's block
PIXEL_CHANNELS = (1, 3)  # a pixel-space model's channels; SD3's own transformers take 16 latent channels

# a diffusers module and the row range [start, stop) of its weight; stop -1 = all rows (a module's only segment)
Segment = tuple[str, int, int]


class InteropError(Sd3rayError):
    """A diffusers SD3 transformer cannot be read, is not one sd3ray can hold, or does not match the config."""


# ------------------------------------------------------------------------------------------------ the table


def module_map(cfg: ModelConfig) -> tuple[dict[str, list[Segment]], set[str]]:
    """{sd3ray module: diffusers row segments, stacked in order} for every linear and norm of the MM-DiT except the
    patch embedding, and the names among them that are norms (a weight, no bias)."""
    d = cfg.width
    whole = -1
    table: dict[str, list[Segment]] = {
        "t_embedder.mlp.0": [("time_text_embed.timestep_embedder.linear_1", 0, whole)],
        "t_embedder.mlp.2": [("time_text_embed.timestep_embedder.linear_2", 0, whole)],
        "pooled_embedder.mlp.0": [("time_text_embed.text_embedder.linear_1", 0, whole)],
        "pooled_embedder.mlp.2": [("time_text_embed.text_embedder.linear_2", 0, whole)],
        "context_embedder": [("context_embedder", 0, whole)],
        "final_layer.modulation.1": [("norm_out.linear", d, 2 * d), ("norm_out.linear", 0, d)],
        "final_layer.linear": [("proj_out", 0, whole)],
    }
    norms: set[str] = set()
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        last, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
        context = [(f"{theirs}.norm1_context.linear", d, 2 * d), (f"{theirs}.norm1_context.linear", 0, d)] if last \
            else [(f"{theirs}.norm1_context.linear", 0, 6 * d)]
        table[f"{ours}.modulation.1"] = [(f"{theirs}.norm1.linear", 0, (9 if dual else 6) * d), *context]
        streams = [("img_qkv", "attn", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")),
                   ("ctx_qkv", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))]
        if dual:
            streams.append(("img_qkv2", "attn2", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")))
        for stream, attn, projections, qk_norms in streams:
            table[f"{ours}.{stream}.qkv"] = [(f"{theirs}.{attn}.{name}", 0, d) for name in projections]
            if cfg.qk_norm:
                for side, name in zip(("q_norm", "k_norm"), qk_norms):
                    table[f"{ours}.{stream}.{side}"] = [(f"{theirs}.{attn}.{name}", 0, whole)]
                    norms.add(f"{ours}.{stream}.{side}")
        table[f"{ours}.img_proj"] = [(f"{theirs}.attn.to_out.0", 0, whole)]
        table[f"{ours}.img_mlp.0"] = [(f"{theirs}.ff.net.0.proj", 0, whole)]
        table[f"{ours}.img_mlp.2"] = [(f"{theirs}.ff.net.2", 0, whole)]
        if not last:
            table[f"{ours}.ctx_proj"] = [(f"{theirs}.attn.to_add_out", 0, whole)]
            table[f"{ours}.ctx_mlp.0"] = [(f"{theirs}.ff_context.net.0.proj", 0, whole)]
            table[f"{ours}.ctx_mlp.2"] = [(f"{theirs}.ff_context.net.2", 0, whole)]
        if dual:
            table[f"{ours}.img_proj2"] = [(f"{theirs}.attn2.to_out.0", 0, whole)]
    return table, norms


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return tensor if stop == -1 else tensor[start:stop]


def _suffixes(module: str, norms: set[str]) -> tuple[str, ...]:
    return ("weight",) if module in norms else ("weight", "bias")


# ---------------------------------------------------------------------------------------- state conversion


def to_sd3ray(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state -> an MMDiT state (`cfg` must describe it: `check_config`). Keys that map
    nowhere, and keys the table needs but the state lacks, are one InteropError listing them."""
    table, norms = module_map(cfg)
    p, c = cfg.patch_size, cfg.channels
    needed = {f"{name}.{suffix}" for module, segments in table.items() for name, _, _ in segments
              for suffix in _suffixes(module, norms)}
    needed |= {"pos_embed.proj.weight", "pos_embed.proj.bias", "pos_embed.pos_embed"}
    _check_keys(set(theirs), needed)
    ours: dict[str, torch.Tensor] = {}
    for module, segments in table.items():
        for suffix in _suffixes(module, norms):
            ours[f"{module}.{suffix}"] = torch.cat([_rows(theirs[f"{n}.{suffix}"], a, b) for n, a, b in segments])
    conv = theirs["pos_embed.proj.weight"]  # (D, C, p, p) -> (D, p·p·C), patchify's (p1 p2 c) order
    ours["x_embedder.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], p * p * c)
    ours["x_embedder.bias"] = theirs["pos_embed.proj.bias"]
    ours["pos_embed"] = theirs["pos_embed.pos_embed"].reshape(-1, cfg.width)
    return {k: v.contiguous() for k, v in ours.items()}


def to_diffusers(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An MMDiT state -> the state `SD3Transformer2DModel(**diffusers_config(cfg))` loads. Every key must map. An
    MMDiT with computed positions (model.pos_embed_max_size 0) exports them as the table of its own grid."""
    if not cfg.pos_embed_max_size and "pos_embed" not in ours:
        ours = {**ours, "pos_embed": sincos_position_embedding(cfg.width, cfg.image_size // cfg.patch_size)}
    table, norms = module_map(cfg)
    p, c, d = cfg.patch_size, cfg.channels, cfg.width
    needed = {f"{m}.{suffix}" for m in table for suffix in _suffixes(m, norms)}
    needed |= {"x_embedder.weight", "x_embedder.bias", "pos_embed"}
    _check_keys(set(ours), needed, what="sd3ray", other="diffusers")
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}  # diffusers tensor -> (first row, rows) pieces
    for module, segments in table.items():
        for suffix in _suffixes(module, norms):
            offset = 0
            for name, start, stop in segments:
                rows = ours[f"{module}.{suffix}"].shape[0] - offset if stop == -1 else stop - start
                pieces.setdefault(f"{name}.{suffix}", []).append(
                    (max(start, 0), ours[f"{module}.{suffix}"][offset:offset + rows]))
                offset += rows
    theirs = {key: torch.cat([t for _, t in sorted(parts, key=lambda item: item[0])])
              for key, parts in pieces.items()}
    theirs["pos_embed.proj.weight"] = ours["x_embedder.weight"].reshape(d, p, p, c).permute(0, 3, 1, 2)
    theirs["pos_embed.proj.bias"] = ours["x_embedder.bias"]
    theirs["pos_embed.pos_embed"] = ours["pos_embed"].reshape(1, -1, d)
    return {k: v.contiguous() for k, v in theirs.items()}


def _check_keys(have: set[str], needed: set[str], what: str = "diffusers", other: str = "sd3ray") -> None:
    unexpected, missing = sorted(have - needed), sorted(needed - have)
    if unexpected or missing:
        parts = ([f"{len(unexpected)} {what} key(s) with no {other} counterpart: {', '.join(unexpected[:12])}"
                  + (" ..." if len(unexpected) > 12 else "")] if unexpected else []) + \
            ([f"{len(missing)} key(s) missing: {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else "")]
             if missing else [])
        raise InteropError(f"the {what} weights do not match the model the config describes: " + "; ".join(parts)
                           + ". Check the model.* keys against the checkpoint's config.json")


# ------------------------------------------------------------------------------------------ config.json


def model_keys(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The sd3ray `model.*` values a diffusers SD3 transformer config.json implies, or one InteropError saying what
    in it sd3ray cannot hold."""
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise InteropError(f"model.init_from: {where} holds a {config.get('_class_name')}, not an "
                           f"{DIFFUSERS_CLASS}; point it at an SD3 transformer (a `transformer` folder)")
    try:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        width, channels = heads * head_dim, int(config["in_channels"])
        out_channels = config.get("out_channels") or channels
        qk_norm, max_size = config.get("qk_norm"), config.get("pos_embed_max_size")
        keys = {"width": width, "depth": int(config["num_layers"]), "num_heads": heads,
                "patch_size": int(config["patch_size"]), "channels": channels,
                "context_dim": int(config["joint_attention_dim"]),
                "pooled_dim": int(config["pooled_projection_dim"]), "qk_norm": qk_norm == "rms_norm",
                "pos_embed_max_size": int(max_size or 0), "mlp_ratio": DIFFUSERS_MLP_RATIO, "conv_stem": 0,
                "conv_head": 0, "conv_head_layers": 1, "long_skips": False,
                "dual_attention_layers": tuple(int(i) for i in config.get("dual_attention_layers", ()))}
        caption = int(config.get("caption_projection_dim", width))
    except (KeyError, TypeError, ValueError) as exc:
        raise InteropError(f"model.init_from: {where}/config.json is not an {DIFFUSERS_CLASS} config ({exc!r} "
                           f"missing or malformed)") from None
    refusals = [(qk_norm not in (None, "rms_norm"), f"qk_norm={qk_norm!r} (sd3ray has RMS QK-norm or none)"),
                (out_channels != channels, f"out_channels={out_channels} != in_channels={channels}"),
                (caption != width, f"caption_projection_dim={caption} != the width {width}"),
                (not max_size, "no pos_embed_max_size (SD3's cropped position table)")]
    refused = [why for bad, why in refusals if bad]
    if refused:
        raise InteropError(f"model.init_from: {where} is an {DIFFUSERS_CLASS} sd3ray cannot hold: "
                           + "; ".join(refused))
    return keys


def check_config(cfg: ModelConfig, keys: dict[str, Any], where: str) -> None:
    """One message naming every model.* key that differs from the checkpoint's, with the values to set."""
    wrong = {k: v for k, v in keys.items() if getattr(cfg, k) != v}
    if wrong:
        lines = "\n  ".join(f"model.{k}: the checkpoint has {v!r}, the config {getattr(cfg, k)!r}"
                            for k, v in wrong.items())
        fix = " ".join(f"model.{k}={yaml_value(v)}" for k, v in wrong.items())
        latent = "" if keys["channels"] in PIXEL_CHANNELS else (
            f"\nNote: it works on {keys['channels']}-channel latents: train it in latent space (vae.source, its "
            f"VAE), where model.channels and model.image_size are the latent's")
        raise InteropError(f"model.init_from {where} is a different model than model.* describes:\n  {lines}\n"
                           f"Set them to the checkpoint's: --set {fix}{latent}")
    grid = cfg.image_size // cfg.patch_size
    if grid > keys["pos_embed_max_size"]:
        raise InteropError(f"model.image_size {cfg.image_size} is {grid} patches per side, more than the "
                           f"{keys['pos_embed_max_size']} positions of {where}; lower model.image_size")


def yaml_value(value: Any) -> str:
    """A model.* value as a `--set` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def diffusers_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the SD3Transformer2DModel an MMDiT of `cfg` exports to. `sample_size` (diffusers' default
    resolution) is the trained image_size; an MMDiT with computed positions exports them as a table of its grid."""
    if cfg.conv_stem or cfg.conv_head or cfg.long_skips or cfg.mlp_ratio != DIFFUSERS_MLP_RATIO:
        raise InteropError(f"this model has no {DIFFUSERS_CLASS} form: it needs model.conv_stem=0, "
                           f"model.conv_head=0, model.long_skips=false and model.mlp_ratio=4 (it has "
                           f"{cfg.conv_stem}, {cfg.conv_head}, {str(cfg.long_skips).lower()}, {cfg.mlp_ratio})")
    return {"_class_name": DIFFUSERS_CLASS, "sample_size": cfg.image_size, "patch_size": cfg.patch_size,
            "in_channels": cfg.channels, "out_channels": cfg.channels, "num_layers": cfg.depth,
            "attention_head_dim": cfg.width // cfg.num_heads, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.width,
            "pooled_projection_dim": cfg.pooled_dim,
            "pos_embed_max_size": cfg.pos_embed_max_size or cfg.image_size // cfg.patch_size,
            "dual_attention_layers": list(cfg.dual_attention_layers), "qk_norm": "rms_norm" if cfg.qk_norm else None}


# --------------------------------------------------------------------------------------------- the files


def locate(source: str) -> Path:
    """The folder holding the transformer's config.json: `source` itself, its `transformer` subfolder (a pipeline
    folder), or a hub id's `transformer` subfolder from the local cache, else downloaded."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:  # hub ids are ORG/NAME
        for folder in (path, path / SUBFOLDER):
            if (folder / "config.json").is_file():
                return folder
        what = "is not a folder on this machine" if not path.is_dir() else \
            f"holds no config.json, nor a {SUBFOLDER}/config.json"
        raise InteropError(f"model.init_from: {source} {what}; name a diffusers {DIFFUSERS_CLASS} folder (one "
                           f"written by save_pretrained, or a pipeline folder with a {SUBFOLDER} subfolder)")
    return _hub_folder(source)


def _hub_folder(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{SUBFOLDER}/*.json", f"{SUBFOLDER}/*.safetensors"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True)) / SUBFOLDER
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns)) / SUBFOLDER
    except Exception as exc:
        raise InteropError(f"model.init_from: could not fetch {repo!r} from the Hugging Face hub "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). Where there is network, run "
                           f"`hf download {repo} --include '{SUBFOLDER}/*' --local-dir DIR`, copy DIR here and set "
                           f"model.init_from=DIR") from None


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(f"model.init_from: {folder}/config.json is not readable JSON ({exc})") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the transformer's safetensors (one file or shards named by an index); nothing else loads."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth"))
        found = f" (it has {', '.join(others)}: sd3ray reads safetensors only, never pickles)" if others else ""
        raise InteropError(f"model.init_from: {folder} has no {WEIGHTS}{found}; save the transformer with "
                           f"save_pretrained(..., safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise InteropError(f"model.init_from: {folder} lacks the shard {name} its index names")
        state.update(load_file(folder / name))
    return state


def load_pretrained(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The MMDiT state of `cfg.init_from` in fp32, after checking that model.* describes it."""
    folder = locate(cfg.init_from)
    check_config(cfg, model_keys(read_config(folder), cfg.init_from), cfg.init_from)
    return {k: v.float() for k, v in to_sd3ray(read_weights(folder), cfg).items()}


def fingerprint(source: str) -> dict[str, str]:
    """{source, sha256} of a pretrained transformer: what an adapter checkpoint records of its base."""
    from sd3ray.model.pretrained_text import folder_hash

    return {"source": source, "sha256": folder_hash(locate(source))}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file, readable as any file this process writes (safetensors itself creates it owner-only,
    which other users and nodes of a shared export could not read)."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def save_diffusers(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> Path:
    """Write an MMDiT state as a diffusers folder (config.json + safetensors) `from_pretrained(out)` loads."""
    config = diffusers_config(cfg)
    save_safetensors(to_diffusers(state, cfg), out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# --------------------------------------------------------------------------------------------- adapters


def save_diffusers_adapter(pairs: dict[str, tuple[torch.Tensor, ...]], scale: float, cfg: ModelConfig, out: Path,
                           base: dict[str, str] | None = None) -> Path:
    """Write LoRA pairs as the adapter file diffusers' `load_lora_adapter(out)` (and an SD3 pipeline's
    `load_lora_weights(out)`) reads; `base` (source, sha256) is kept in the file's metadata."""
    metadata = {"sd3ray_base_model": json.dumps(base)} if base else {}
    return save_safetensors(adapter_to_diffusers(pairs, scale, cfg), out / LORA_WEIGHTS, metadata)



def adapter_to_diffusers(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                         cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LoRA pairs {sd3ray module: (A (r, in), B (out, r))} -> diffusers' PEFT adapter keys
    (`transformer.<module>.lora_A.weight`, ...). A fused projection's adapter becomes one adapter per diffusers
    projection sharing A, with B split by rows: the same update, exactly. The scale is folded into B, so the
    adapter loads with lora_alpha = rank (what diffusers assumes without metadata)."""
    table, _ = module_map(cfg)
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in pairs.items():
        if module not in table:
            raise InteropError(f"the adapter on {module} has no {DIFFUSERS_CLASS} counterpart")
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        offset = 0
        for name, start, stop in table[module]:
            rows = b.shape[0] - offset if stop == -1 else stop - start
            pieces.setdefault(name, []).append((max(start, 0), b[offset:offset + rows] * scale))
            offset += rows
        for name, parts in pieces.items():
            out[f"transformer.{name}.lora_A.weight"] = a.clone()  # one copy per projection: files share nothing
            out[f"transformer.{name}.lora_B.weight"] = torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])])
    return {k: v.contiguous() for k, v in out.items()}
