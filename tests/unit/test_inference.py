from pathlib import Path

import pytest
import torch

from sd3ray.checkpoint import CheckpointData, CheckpointError, write_checkpoint
from sd3ray.config import load_config
from sd3ray.inference import generate, load_ema_model
from sd3ray.model import Denoiser
from tests.support import MICRO


def test_a_checkpoint_loads_from_a_uri_as_from_its_folder(tmp_path: Path) -> None:
    cfg = load_config("configs/mnist_tiny.yaml", [m for m in MICRO if not m.startswith("data.")])
    model = Denoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = write_checkpoint(tmp_path / "step_00000007", CheckpointData(7, cfg, model.state_dict(),
                                                                          model.state_dict()), weights_only=True)
    from_folder, _, step = load_ema_model(str(folder), torch.device("cpu"))
    from_uri, _, uri_step = load_ema_model(f"file://{folder}", torch.device("cpu"))
    assert step == uri_step == 7
    prompts = ["7", "three"]
    torch.testing.assert_close(generate(from_uri, prompts, cfg, 0, torch.device("cpu")),
                               generate(from_folder, prompts, cfg, 0, torch.device("cpu")), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_ema_model(f"file://{tmp_path}/missing", torch.device("cpu"))
