from pathlib import Path

import pytest

from sd3ray.data.format import read_split
from sd3ray.errors import DataError


def test_missing_parquet_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="jobs/prepare_data.py"):
        read_split(tmp_path / "nowhere", "train")
