import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.data.image_sets import (
    read_cifar_batch,
)
from sd3ray.errors import DataError
from tests.support import REPO_ROOT


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to unpickle subprocess.call"):
        read_cifar_batch(path)
    assert not (tmp_path / "pwned").exists()


def test_prepare_data_job_writes_the_shapes_set(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "jobs/prepare_data.py", "--source", "shapes", "--num-images", "300",
                           "--out", str(tmp_path / "shapes")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3×32×32; train: 300, test: 500" in proc.stdout
    proc = subprocess.run([sys.executable, "jobs/prepare_data.py", "--source", "folder", "--out",
                           str(tmp_path / "x")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--source folder needs --images DIR and --captions FILE" in proc.stderr
