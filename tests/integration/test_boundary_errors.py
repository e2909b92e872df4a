"""Errors of the libraries at sd3ray's edges (file decoding, pyarrow, MLflow URIs) become one sd3ray message that
names the file or URI and the fix. Each test plants the fault."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd3ray.data.format import read_split
from sd3ray.errors import DataError
from tests.support import REPO_ROOT


def test_a_truncated_shard_names_the_shard_and_the_command_that_rebuilds_the_set(mnist_parquet: Path,
                                                                                   tmp_path: Path) -> None:
    broken = tmp_path / "set"
    shutil.copytree(mnist_parquet, broken)
    shard = sorted((broken).rglob("test*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"shard .*{shard.name} of {broken} cannot be read .*prepare_data.py --out"):
        read_split(broken, "test")


def test_a_prompts_file_that_is_not_utf8_is_one_message(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"sept\n" + b"\xe9t\xe9\n")  # latin-1 bytes
    proc = subprocess.run([sys.executable, "jobs/sample.py", "--checkpoint", "unused", "--prompts-file", str(prompts)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--prompts-file {prompts} is not UTF-8 text (byte 5 is 0xe9); save it as UTF-8" in proc.stderr
