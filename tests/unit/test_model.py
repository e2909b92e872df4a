import math
import warnings

import pytest
import torch

from sd3ray.config import ModelConfig, TextConfig, load_config
from sd3ray.model import Denoiser, MMDiT, TextEncoder
from sd3ray.model.attention import QKNorm, joint_attention
from sd3ray.model.block import MMDiTBlock
from sd3ray.model.embeddings import patchify, timestep_embedding, unpatchify
from sd3ray.model.tokenizer import tokenize

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


def _diffusers_block_from(block: MMDiTBlock, width: int, heads: int):
    """diffusers' JointTransformerBlock carrying `block`'s weights: the reference for what one block computes."""
    from diffusers.models.attention import JointTransformerBlock

    theirs = JointTransformerBlock(width, heads, width // heads, block.context_pre_only, qk_norm="rms_norm")
    mod_w, mod_b = block.modulation[1].weight, block.modulation[1].bias
    ctx_mod_w, ctx_mod_b = mod_w[6 * width:], mod_b[6 * width:]
    if block.context_pre_only:  # diffusers' AdaLayerNormContinuous orders this pair (scale, shift), not (shift, scale)
        ctx_mod_w, ctx_mod_b = ctx_mod_w.roll(width, 0), ctx_mod_b.roll(width, 0)
    state = {"norm1.linear.weight": mod_w[:6 * width], "norm1.linear.bias": mod_b[:6 * width],
             "norm1_context.linear.weight": ctx_mod_w, "norm1_context.linear.bias": ctx_mod_b,
             "attn.to_out.0.weight": block.img_proj.weight, "attn.to_out.0.bias": block.img_proj.bias,
             "ff.net.0.proj.weight": block.img_mlp[0].weight, "ff.net.0.proj.bias": block.img_mlp[0].bias,
             "ff.net.2.weight": block.img_mlp[2].weight, "ff.net.2.bias": block.img_mlp[2].bias}
    for stream, names in ((block.img_qkv, ("to_q", "to_k", "to_v", "norm_q", "norm_k")),
                          (block.ctx_qkv, ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"))):
        for name, weight, bias in zip(names, stream.qkv.weight.chunk(3), stream.qkv.bias.chunk(3)):
            state[f"attn.{name}.weight"], state[f"attn.{name}.bias"] = weight, bias
        state[f"attn.{names[3]}.weight"], state[f"attn.{names[4]}.weight"] = stream.q_norm.weight, stream.k_norm.weight
    if not block.context_pre_only:
        state |= {"attn.to_add_out.weight": block.ctx_proj.weight, "attn.to_add_out.bias": block.ctx_proj.bias,
                  "ff_context.net.0.proj.weight": block.ctx_mlp[0].weight,
                  "ff_context.net.0.proj.bias": block.ctx_mlp[0].bias,
                  "ff_context.net.2.weight": block.ctx_mlp[2].weight, "ff_context.net.2.bias": block.ctx_mlp[2].bias}
    theirs.load_state_dict(state, strict=True)
    return theirs


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_block_computes_what_diffusers_joint_transformer_block_computes(context_pre_only: bool) -> None:
    """The reference implementation pins the block's maths, so every fusion for speed is checked against it."""
    pytest.importorskip("diffusers")
    width, heads = 64, 4
    ours = MMDiTBlock(width, heads, 4.0, qk_norm=True, context_pre_only=context_pre_only)
    _randomise(ours)
    theirs = _diffusers_block_from(ours, width, heads)
    img, ctx, cond = torch.randn(3, 16, width), torch.randn(3, 5, width), torch.randn(3, width)
    img_out, ctx_out = ours(img, ctx, cond, None)
    their_ctx_out, their_img_out = theirs(img, ctx, cond)
    torch.testing.assert_close(img_out, their_img_out, atol=1e-5, rtol=1e-5)
    if context_pre_only:
        assert ctx_out is None and their_ctx_out is None
    else:
        torch.testing.assert_close(ctx_out, their_ctx_out, atol=1e-5, rtol=1e-5)


def test_qk_norm_is_configurable() -> None:
    with_norm = MMDiT(SMALL)
    without = MMDiT(ModelConfig(**{**SMALL.__dict__, "qk_norm": False}))
    assert isinstance(with_norm.blocks[0].img_qkv.q_norm, QKNorm)
    assert isinstance(without.blocks[0].img_qkv.q_norm, torch.nn.Identity)


def test_qk_norm_is_rms_norm_and_keeps_bf16_inputs_on_the_fused_kernel() -> None:
    """Same maths as torch's RMSNorm in fp32; a bf16 input (what autocast hands it) is normalised in bf16 with no
    dtype-mismatch fallback (PyTorch warns when the gain is fp32 and the input bf16)."""
    ours, reference = QKNorm(8), torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 2.0, 8))
        reference.weight.copy_(ours.weight)
    x = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(ours(x), reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), atol=3e-2, rtol=2e-2)


def test_wrong_image_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 16, 16\)"):
        MMDiT(SMALL)(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 2, 32), torch.randn(1, 32))


def test_denoiser_gradients_reach_the_text_encoder() -> None:
    cfg = load_config("configs/mnist_tiny.yaml")
    model = Denoiser(cfg)
    _randomise(model)
    ids, mask = model.text_encoder.tokenize(["7", "seven"])
    out = model(torch.randn(2, 1, 32, 32), torch.rand(2), ids, mask)
    out.pow(2).mean().backward()
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0


def test_encoder_shapes_and_padding_independence() -> None:
    enc = TextEncoder(TextConfig(width=32, depth=2, num_heads=4, max_length=16)).eval()
    ids, mask = enc.tokenize(["seven", "a handwritten 7"])
    context, pooled = enc(ids, mask)
    assert context.shape == (2, 16, 32) and pooled.shape == (2, 32) and mask.shape == (2, 16)
    # The same prompt padded to 16 or to 24 positions must give the same real tokens and pooled vector.
    long_enc = TextEncoder(TextConfig(width=32, depth=2, num_heads=4, max_length=24)).eval()
    ids, mask = tokenize(["seven"], 16)
    longer_ids, longer_mask = tokenize(["seven"], 24)
    ctx_a, pooled_a = long_enc(ids, mask)
    ctx_b, pooled_b = long_enc(longer_ids, longer_mask)
    real = mask[0]
    torch.testing.assert_close(ctx_a[0, real], ctx_b[0, :16][real])
    torch.testing.assert_close(pooled_a, pooled_b)


def test_velocity_fn_is_the_conditional_model_and_batched_guidance_matches_separate_branches() -> None:
    model = Denoiser(load_config("configs/mnist_tiny.yaml")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = ["7", "the digit two"]
    z, t = torch.randn(2, 1, 32, 32), torch.rand(2)
    with torch.no_grad():
        ids, mask = model.text_encoder.tokenize(prompts)
        cond = model(z, t, ids, mask)  # the training path
        uncond = model.velocity(z, t, model.condition(["", ""]))
        torch.testing.assert_close(model.velocity_fn(prompts)(z, t), cond, atol=1e-5, rtol=1e-4)
        # v = v_uncond + g·(v_cond − v_uncond), with both branches in one batch
        torch.testing.assert_close(model.velocity_fn(prompts, 2.5)(z, t), uncond + 2.5 * (cond - uncond),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.velocity_fn(prompts, 0.0)(z, t), uncond, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the prompt matters, so guidance is not a no-op


@pytest.mark.parametrize("convs", [["model.conv_stem=8"], ["model.conv_head=8"],
                                   ["model.conv_stem=8", "model.conv_head=4"],
                                   ["model.conv_head=8", "model.conv_head_layers=2"], ["model.long_skips=true"]])
def test_pixel_space_convolutions_keep_the_zero_start_and_learn(convs: list[str]) -> None:
    """With a conv stem and/or head the untrained model still predicts exactly 0 (adaLN-Zero's start), the first
    backward reaches the head's convolution, and after one optimizer step the stem's first layer learns too."""
    cfg = load_config("configs/mnist_tiny.yaml", ["model.width=32", "model.depth=2", "model.num_heads=2", *convs])
    model = MMDiT(cfg.model)
    x, t = torch.randn(2, 1, 32, 32), torch.rand(2)
    context, pooled = torch.randn(2, 3, cfg.model.context_dim), torch.randn(2, cfg.model.pooled_dim)
    out = model(x, t, context, pooled)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    target = torch.randn_like(out)
    out.sub(target).pow(2).mean().backward()
    if model.head is not None:
        assert model.head.conv.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(x, t, context, pooled).sub(target).pow(2).mean().backward()
    if model.stem is not None:
        assert model.stem.layers[0].weight.grad.abs().sum() > 0
    if model.head is not None and model.head.hidden is not None:
        assert model.head.hidden[0].weight.grad.abs().sum() > 0
    if model.skips is not None:  # the skip's half of each projection learns, not only the identity on x
        assert all(linear.weight.grad[:, 32:].abs().sum() > 0 for linear in model.skips.linears)


def _skip_model(depth: int) -> tuple[MMDiT, MMDiT, tuple[torch.Tensor, ...]]:
    """An MMDiT with long skips and one without, sharing random weights everywhere else (the final layer included,
    so outputs are not all 0), and a batch to run them on."""
    overrides = ["model.width=32", f"model.depth={depth}", "model.num_heads=2"]
    plain = MMDiT(load_config("configs/mnist_tiny.yaml", overrides).model)
    skipped = MMDiT(load_config("configs/mnist_tiny.yaml", [*overrides, "model.long_skips=true"]).model)
    with torch.no_grad():
        for param in plain.parameters():
            param.normal_(0, 0.2)
    missing, unexpected = skipped.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("skips.") for key in missing)
    torch.manual_seed(0)
    m = plain.cfg
    inputs = (torch.randn(2, 1, 32, 32), torch.rand(2), torch.randn(2, 3, m.context_dim), torch.randn(2, m.pooled_dim))
    return plain, skipped, inputs


def test_long_skips_start_as_the_model_without_them() -> None:
    """Each projection starts as [I | 0]: the untrained skips change nothing, whatever the other weights are; a
    non-zero skip half does."""
    plain, skipped, inputs = _skip_model(depth=4)
    out = plain(*inputs)
    assert out.abs().sum() > 0
    torch.testing.assert_close(skipped(*inputs), out)
    with torch.no_grad():
        skipped.skips.linears[0].weight[:, 32:].normal_(0, 0.2)
    assert not torch.allclose(skipped(*inputs), out, atol=1e-4)


@pytest.mark.parametrize("depth", [4, 5])
def test_long_skips_join_block_i_to_block_depth_minus_one_minus_i(depth: int) -> None:
    """U-ViT's pairing, checked by what each block receives: with the projections set to [0 | I] (the skip alone),
    block depth−1−i's image input is block i's image output, for each i in the first half; an odd depth's middle
    block takes its input as it is."""
    _, model, inputs = _skip_model(depth)
    with torch.no_grad():
        for linear in model.skips.linears:
            linear.weight.zero_()
            linear.weight[:, 32:].copy_(torch.eye(32))
    received: dict[int, torch.Tensor] = {}
    produced: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, args, i=i: received.__setitem__(i, args[0].clone()))
        block.register_forward_hook(lambda _m, _args, out, i=i: produced.__setitem__(i, out[0].clone()))
    model(*inputs)
    for i in range(depth // 2):
        torch.testing.assert_close(received[depth - 1 - i], produced[i])
    if depth % 2:
        torch.testing.assert_close(received[depth // 2], produced[depth // 2 - 1])
