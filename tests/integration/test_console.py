"""Lines a first run used to print that say nothing the user can act on: torch's CUDA_HOME notice on a CPU machine
that has a CUDA toolkit, and matplotlib's font cache notice. Each in a fresh process, as a first run meets it."""

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_compiling_on_a_cpu_machine_with_a_cuda_toolkit_prints_no_cuda_home_notice(tmp_path: Path) -> None:
    # CUDA_HOME names a toolkit folder, as an nvcc on the PATH does; this machine has no GPU
    env = {"CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    bare = _python("import torch.utils.cpp_extension", env)
    assert "No CUDA runtime is found" in bare.stderr  # what torch prints without sd3ray's filter
    compiled = _python("from torch import nn\nfrom sd3ray.training.step import compile_model\n"
                       "compile_model(nn.Linear(2, 2), nn.Linear(2, 2), 'whole')\n"
                       "import torch.utils.cpp_extension", env)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert "No CUDA runtime is found" not in compiled.stderr, compiled.stderr[-2000:]


def test_the_first_plot_on_a_machine_prints_no_font_cache_notice(tmp_path: Path) -> None:
    code = ("import logging\nlogging.basicConfig(level=logging.INFO)\n"  # a console that shows INFO, as Ray's does
            "from sd3ray.evaluation.figures import pyplot\npyplot().figure()\n")
    first = _python(code, {"MPLCONFIGDIR": str(tmp_path / "mpl")})  # no font cache yet: a first run
    assert first.returncode == 0, first.stderr[-2000:]
    assert list((tmp_path / "mpl").glob("fontlist-*.json")), "matplotlib built no font cache"
    assert "fontManager" not in first.stderr and "font cache" not in first.stderr, first.stderr[-2000:]
