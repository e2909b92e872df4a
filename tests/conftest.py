"""Shared fixtures. Real MNIST lives in ../shared/data (torchvision layout); tests never touch the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path(os.environ.get("SD3RAY_MNIST_ROOT", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found at {MNIST_ROOT}/MNIST/raw; set SD3RAY_MNIST_ROOT")
    return MNIST_ROOT


@pytest.fixture(scope="session")
def mnist_parquet(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """Real MNIST converted once per test session to Parquet (32×32)."""
    from sd3ray.data import prepare_mnist

    return prepare_mnist(mnist_root, tmp_path_factory.mktemp("parquet") / "mnist", image_size=32)
