
from sd3ray.config import load_config
from tests.support import REPO_ROOT

SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))
CONFIGS = [p for p in SHIPPED if not p.name.startswith("tune_")]
SWEEPS = [p for p in SHIPPED if p.name.startswith("tune_")]




def test_shipped_configs_resolve_from_any_working_directory(tmp_path, monkeypatch) -> None:
    """`python /path/to/jobs/train.py` run elsewhere still finds configs/mnist_tiny.yaml; a file of that name in
    the working directory comes first."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/mnist_tiny.yaml").model.width == 128
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mnist_tiny.yaml").write_text("model:\n  width: 64\n  num_heads: 4\n")
    assert load_config("configs/mnist_tiny.yaml").model.width == 64
