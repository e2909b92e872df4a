import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sd3ray.config import load_config
from sd3ray.evaluation.flops import mmdit_forward_flops, text_forward_flops, train_step_flops
from sd3ray.model import Denoiser
from sd3ray.model.tokenizer import tokenize


@pytest.mark.parametrize("overrides", [[], ["model.patch_size=2", "model.depth=3", "model.mlp_ratio=2.0"],
                                       ["model.conv_stem=16", "model.conv_head=8"],
                                       ["model.conv_head=8", "model.conv_head_layers=2", "model.long_skips=true",
                                        "model.depth=5"]])
def test_flop_formula_matches_pytorchs_counter(overrides: list[str]) -> None:
    cfg = load_config("configs/mnist_tiny.yaml", overrides)
    model = Denoiser(cfg)
    ids, mask = tokenize(["seven", "a handwritten 3", "1"], cfg.text.max_length)
    x, t = torch.randn(3, 1, 32, 32), torch.rand(3)
    # the math backend runs attention as plain matmuls, which the counter sees (fused CPU kernels it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        context, pooled = model.text_encoder(ids, mask)
        text_flops = counter.get_total_flops()
        model.mmdit(x, t, context, pooled, mask)
    assert text_forward_flops(cfg, 3, ids.shape[1]) == text_flops
    assert mmdit_forward_flops(cfg, 3, ids.shape[1]) == counter.get_total_flops() - text_flops


def test_hand_count_for_one_block() -> None:
    # width 64, one block (the last: text stream pre-attention only), 2×2 patches of a 4×4 image, 1 text token
    cfg = load_config(None, ["model.width=64", "model.depth=1", "model.num_heads=2", "model.image_size=4",
                             "model.patch_size=2", "model.context_dim=32", "model.pooled_dim=32", "text.width=32",
                             "text.num_heads=2"])
    d, n, length = 64, 4, 1
    hand = 2 * n * 4 * d + 2 * length * 32 * d  # patch and context embedders
    hand += 2 * (256 * d + d * d) + 2 * (32 * d + d * d)  # timestep and pooled MLPs
    hand += 2 * d * 8 * d  # modulation: 6 image + 2 text vectors
    hand += n * 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # image stream: qkv, proj, MLP
    hand += length * 2 * 3 * d * d  # text stream: qkv only
    hand += 4 * d * (n + length) ** 2  # joint attention
    hand += 2 * d * 2 * d + 2 * n * d * 4  # final adaLN and projection
    assert mmdit_forward_flops(cfg, 1, length) == hand
    assert train_step_flops(cfg, 1, length) == 3 * (hand + text_forward_flops(cfg, 1, length))
