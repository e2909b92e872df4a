"""An honest FLOP count of an MM-DiT training step (matrix multiplies only; 2 FLOPs per multiply-add).

With d = width, r = mlp_ratio, N = (image_size / patch)² image tokens, L text tokens, S = N + L, per block:
    each stream's linears   2·(3d² + d² + 2·r·d²) per token  = 24·d² per token at r = 4
    joint attention          QKᵀ and A·V: 2 · 2·S²·d          = 4·d·S²
    adaLN modulation         2·d·(6 + 6)·d per sample (the last block's text stream needs 2 instead of 6, and
                             no output projection or MLP)
plus the patch/text/final projections, the optional pixel-space convolutions (model.conv_stem, model.conv_head),
the timestep and pooled MLPs, and the byte text encoder
(24·dₜ² per token and 4·dₜ·L² per layer). A training step is forward + backward ≈ 3 × forward.
"""

from __future__ import annotations

from sd3ray.config import Config

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name; the H200 has the H100's tensor cores with more and faster
# memory. MFU is left out for a device not listed rather than guessed.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

FREQUENCY_DIM = 256  # the timestep embedder's sinusoid width (sd3ray.model.embeddings.TimestepEmbedder)


def _linear(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def mmdit_forward_flops(cfg: Config, batch: int, context_len: int) -> float:
    m = cfg.model
    d, n, length = m.width, (m.image_size // m.patch_size) ** 2, context_len
    hidden = int(d * m.mlp_ratio)
    patch_dim = m.patch_size**2 * (m.conv_stem or m.channels)
    out_dim = m.patch_size**2 * (m.conv_head or m.channels)
    pixels = batch * m.image_size**2
    total = 0.0
    if m.conv_stem:  # two 5×5 convolutions: a linear of 25·fan_in per pixel each
        total += _linear(pixels, 25 * m.channels, m.conv_stem) + _linear(pixels, 25 * m.conv_stem, m.conv_stem)
    if m.conv_head:  # a 3×3 convolution back to the image channels, after another within the head's channels
        total += _linear(pixels, 9 * m.conv_head, m.channels)
        total += _linear(pixels, 9 * m.conv_head, m.conv_head) * (m.conv_head_layers - 1)
    if m.long_skips:  # each joined block's input: concat(x, skip) projected back to the width
        total += (m.depth // 2) * _linear(batch * n, 2 * d, d)
    total += _linear(batch * n, patch_dim, d) + _linear(batch * length, m.context_dim, d)
    total += _linear(batch, FREQUENCY_DIM, d) + _linear(batch, d, d)  # timestep MLP
    total += _linear(batch, m.pooled_dim, d) + _linear(batch, d, d)  # pooled MLP
    for i in range(m.depth):
        last = i == m.depth - 1
        total += _linear(batch, d, (6 + (2 if last else 6)) * d)  # fused adaLN modulation
        stream = _linear(1, d, 3 * d) + _linear(1, d, d) + 2 * _linear(1, d, hidden)  # per token
        total += batch * n * stream
        total += batch * length * (_linear(1, d, 3 * d) if last else stream)
        total += 2 * 2.0 * batch * (n + length) ** 2 * d  # QKᵀ and A·V over the joint sequence
    total += _linear(batch, d, 2 * d) + _linear(batch * n, d, out_dim)  # final adaLN + projection
    return total


def text_forward_flops(cfg: Config, batch: int, context_len: int) -> float:
    t, tokens = cfg.text, batch * context_len
    per_layer = _linear(tokens, t.width, 3 * t.width) + _linear(tokens, t.width, t.width)
    per_layer += _linear(tokens, t.width, 4 * t.width) + _linear(tokens, 4 * t.width, t.width)
    per_layer += 2 * 2.0 * batch * context_len**2 * t.width
    return t.depth * per_layer + _linear(batch, t.width, t.width)  # + the pooled projection


def train_step_flops(cfg: Config, batch: int, context_len: int) -> float:
    """Forward + backward ≈ 3 × forward, for the MM-DiT and the jointly trained byte text encoder (frozen
    pretrained encoders run once per distinct prompt, not per step: they add nothing here)."""
    text = text_forward_flops(cfg, batch, context_len) if tuple(cfg.text.encoder) == ("byte",) else 0.0
    return 3.0 * (mmdit_forward_flops(cfg, batch, context_len) + text)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a known GPU from its name, or None."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)
