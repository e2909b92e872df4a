"""What latent space buys, measured on the library's own step: training images/s on cached latents, against encoding
every batch through the VAE first, against pixel space at the same picture size; and the precompute's pictures/s
per actor (one VAE encoding batches, what each Ray Data actor runs).

    python -m benchmarks.latent_throughput                       # SD's VAE architecture, random weights, 64 px
    python -m benchmarks.latent_throughput --vae DIR --size 64 --batch 16 --rounds 5

The three training variants run `sd3ray.training.step.train_step` on the same MM-DiT (the config's width and
depth); the latent ones on the VAE's latents (4×8×8 at 64 px for SD's VAE), the pixel one on the pictures with a
patch 8× larger, so both see the same number of tokens and the difference is the VAE's cost alone. They are timed
in alternation (A B C A B C ...), `--rounds` times `--steps` steps each, and the median is reported. Without
`--vae`, a VAE of SD's architecture (block widths 128/256/512/512, 2 layers per block: 83.7M parameters) is built
with random weights: throughput does not depend on the weights' values. The table is printed with the machine and
the command that made it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from sd3ray.config import Config, VaeConfig, load_config
from sd3ray.core.flow import sample_timesteps
from sd3ray.model.vae import FrozenVae
from sd3ray.training.machine import describe_machine
from sd3ray.training.step import build_train_state, resolve_step_settings, train_step

SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}


def build_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(folder, safe_serialization=True)
    return folder


def configs(base: str, vae: str, size: int, factor: int, latent_channels: int, batch: int) -> dict[str, Config]:
    common = [f"train.batch_size={batch}", "train.compile=none", "train.precision=fp32"]
    latent = [*common, f"vae.source={vae}", f"model.channels={latent_channels}", f"model.image_size={size // factor}",
              "model.patch_size=1"]
    pixel = [*common, "vae.source=none", "model.channels=3", f"model.image_size={size}", f"model.patch_size={factor}"]
    return {"latent": load_config(base, latent), "pixel": load_config(base, pixel)}


def steps_timer(cfg: Config, steps: int, pictures: torch.Tensor, encode: FrozenVae | None = None):
    """A closure that takes `steps` training steps of `cfg`: in pixel space on `pictures`; in latent space on cached
    latents, or on `pictures` encoded through `encode` at every step."""
    device = torch.device("cpu")
    state = build_train_state(cfg, device, resolve_step_settings(cfg, device), lambda: cfg.train.steps)
    m, b = cfg.model, cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    cached = torch.randn(b, m.channels, m.image_size, m.image_size, generator=g)
    ids, mask = state.model.text_encoder.tokenize(["a red circle on the left"] * b)
    pixel_space = cfg.vae.source == "none"
    step = [0]

    def run() -> None:
        for _ in range(steps):
            x0 = pictures if pixel_space else encode.encode(pictures) if encode is not None else cached
            t = sample_timesteps(cfg.flow, b, g, device, (m.image_size // m.patch_size) ** 2)
            train_step(state, x0, ids, mask, t, torch.randn(x0.shape, generator=g), step[0])
            step[0] += 1

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="an AutoencoderKL folder (default: SD's VAE architecture, random weights)")
    parser.add_argument("--config", default="configs/shapes_latent.yaml")
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = args.vae or str(build_vae(Path(tmp) / "sd-vae-architecture"))
        vae = FrozenVae(VaeConfig(source=vae_dir))
        spec = vae.spec
        variants = configs(args.config, vae_dir, args.size, spec.factor, spec.latent_channels, args.batch)
        pictures = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        calls = {"cached latents": steps_timer(variants["latent"], args.steps, pictures),
                 "encode every step": steps_timer(variants["latent"], args.steps, pictures, vae),
                 f"pixels (patch {spec.factor})": steps_timer(variants["pixel"], args.steps, pictures)}
        encode = {"precompute (one actor)": lambda: vae.encode(pictures)}
        for call in [*calls.values(), *encode.values()]:  # warm-up: allocator, first VAE load
            call()
        seconds: dict[str, list[float]] = {name: [] for name in [*calls, *encode]}
        for _ in range(args.rounds):
            for name, call in [*calls.items(), *encode.items()]:
                started = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - started)
    print(f"{describe_machine(torch.device('cpu'))}\ncommand: python -m benchmarks.latent_throughput "
          f"{' '.join(sys.argv[1:])}\nVAE {spec.source if args.vae else 'SD architecture, random weights'}: "
          f"{spec.latent_channels} channels, {spec.factor}× per side; pictures {args.size} px, batch {args.batch}\n")
    print("| path | images/s (median of rounds) | spread (min–max) |\n|---|---|---|")
    for name, values in seconds.items():
        images = args.batch * (args.steps if name in calls else 1)
        rates = sorted(images / s for s in values)
        print(f"| {name} | {rates[len(rates) // 2]:,.1f} | {rates[0]:,.1f}–{rates[-1]:,.1f} |")


if __name__ == "__main__":
    main()
