import math

import pytest
import torch

from sd3ray.config import ModelConfig, load_config
from sd3ray.model import Denoiser, MMDiT
from sd3ray.model.attention import joint_attention
from sd3ray.model.embeddings import patchify, timestep_embedding, unpatchify

SMALL = ModelConfig(image_size=16, channels=1, patch_size=2, width=64, depth=3, num_heads=4, context_dim=32,
                    pooled_dim=32)


def _randomise(model: torch.nn.Module) -> None:
    """Break adaLN-Zero's zero init so that outputs depend on every path."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _inputs(cfg: ModelConfig, batch: int = 2, length: int = 6):
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    return x, torch.rand(batch), torch.randn(batch, length, cfg.context_dim), torch.randn(batch, cfg.pooled_dim)


@pytest.mark.parametrize(("channels", "size", "patch"), [(1, 32, 2), (3, 16, 4), (1, 28, 4)])
def test_patchify_unpatchify_is_identity(channels: int, size: int, patch: int) -> None:
    x = torch.randn(2, channels, size, size)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, (size // patch) ** 2, patch * patch * channels)
    # the first token is the top-left patch, flattened (p1, p2, c)
    torch.testing.assert_close(tokens[0, 0], x[0, :, :patch, :patch].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, patch, channels, size, size), x)


def test_timestep_embedding_uses_t_times_1000() -> None:
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(1000 * t[:, None] * freqs), torch.sin(1000 * t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_untrained_model_predicts_zero(channels: int) -> None:
    cfg = ModelConfig(**{**SMALL.__dict__, "channels": channels})
    out = MMDiT(cfg)(*_inputs(cfg))
    assert out.shape == (2, channels, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


def _naive_joint_attention(ctx_qkv, img_qkv, mask):
    q, k, v = (torch.cat([c, i], 1) for c, i in zip(ctx_qkv, img_qkv))  # (B, S, H, hd)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    keep = torch.cat([mask, torch.ones(mask.shape[0], img_qkv[0].shape[1], dtype=torch.bool)], 1)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
    length = ctx_qkv[0].shape[1]
    return out[:, :length], out[:, length:]


def test_joint_attention_matches_naive_reference() -> None:
    b, length, n, h, hd = 2, 5, 7, 3, 8
    ctx = tuple(torch.randn(b, length, h, hd) for _ in range(3))
    img = tuple(torch.randn(b, n, h, hd) for _ in range(3))
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    got, want = joint_attention(ctx, img, mask), _naive_joint_attention(ctx, img, mask)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_padding_tokens_do_not_change_the_output() -> None:
    model = MMDiT(SMALL).eval()
    _randomise(model)
    x, t, context, pooled = _inputs(SMALL, length=4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    base = model(x, t, context, pooled, mask)
    padded_context = torch.cat([context, torch.randn(2, 5, SMALL.context_dim) * 100], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(x, t, padded_context, pooled, padded_mask), base, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(x, t, padded_context, pooled, None), base, atol=1e-3)


def test_every_input_conditions_the_output() -> None:
    model = MMDiT(SMALL).eval()
    _randomise(model)
    x, t, context, pooled = _inputs(SMALL)
    base = model(x, t, context, pooled)
    for changed in [(x, torch.rand(2), context, pooled), (x, t, context + 1, pooled), (x, t, context, pooled + 1)]:
        assert not torch.allclose(model(*changed), base, atol=1e-4)


def test_last_block_text_stream_is_pre_attention_only() -> None:
    model = MMDiT(SMALL)
    last, first = model.blocks[-1], model.blocks[0]
    assert last.context_pre_only and not hasattr(last, "ctx_mlp")
    assert last.modulation[1].out_features == (6 + 2) * SMALL.width
    assert first.modulation[1].out_features == 12 * SMALL.width


def test_qk_norm_is_configurable() -> None:
    with_norm = MMDiT(SMALL)
    without = MMDiT(ModelConfig(**{**SMALL.__dict__, "qk_norm": False}))
    assert isinstance(with_norm.blocks[0].img_qkv.q_norm, torch.nn.RMSNorm)
    assert isinstance(without.blocks[0].img_qkv.q_norm, torch.nn.Identity)


def test_wrong_image_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 16, 16\)"):
        MMDiT(SMALL)(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 2, 32), torch.randn(1, 32))


def test_denoiser_gradients_reach_the_text_encoder() -> None:
    cfg = load_config("configs/mnist_tiny.yaml")
    model = Denoiser(cfg)
    _randomise(model)
    out = model.velocity(torch.randn(2, 1, 32, 32), torch.rand(2), ["7", "seven"])
    out.pow(2).mean().backward()
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0
