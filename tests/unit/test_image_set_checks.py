"""A prepared image set whose images are not the model's (channels or size) is refused with one message naming both
shapes and the `--set` that fixes it: by the job before anything is built, where the splits are loaded, and where a
batch of them meets the loop. A set the config will build on first use, or one that fits, passes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sd3ray.cli import check_run_inputs
from sd3ray.config import load_config
from sd3ray.data.batches import TrainingBatches
from sd3ray.data.format import check_image_set, load_splits, read_split, write_split
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.data.streaming import StreamedBatches
from sd3ray.errors import DataError, TrackingError
from tests.support import MICRO, REPO_ROOT


@pytest.fixture(scope="module")
def colour16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3×16×16 colour set made by the project's own writer."""
    return Path(write_coloured_shapes(tmp_path_factory.mktemp("colour") / "set", 32, image_size=16, num_test=16))


def mnist_tiny(parquet_dir: Path, *extra: str):
    """configs/mnist_tiny.yaml: a 1×32×32 model."""
    return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*MICRO, f"data.parquet_dir={parquet_dir}", *extra])


def colour_set_message(where: Path) -> str:
    return (f"the image set at {where} holds 3×16×16 images but the model takes 1×32×32 (model.channels=1, "
            f"model.image_size=32). Train on this set with --set model.channels=3 --set model.image_size=16 (or a "
            f"config made for it), or give --parquet-dir a set of 1×32×32 images (a folder that holds no set yet is "
            f"built at that size on first use)")


def test_a_colour_set_given_to_the_grey_model_is_refused_naming_both_shapes_and_the_fix(colour16: Path) -> None:
    cfg = mnist_tiny(colour16)
    for check in (check_image_set, load_splits):
        with pytest.raises(DataError) as refused:
            check(cfg)
        assert str(refused.value) == colour_set_message(colour16)


def test_the_fix_the_message_names_is_accepted(colour16: Path) -> None:
    cfg = mnist_tiny(colour16, "model.channels=3", "model.image_size=16")
    check_image_set(cfg)
    train, test = load_splits(cfg)
    assert tuple(train.images.shape[1:]) == tuple(test.images.shape[1:]) == (3, 16, 16)


def test_only_what_differs_is_named_and_a_set_a_run_cannot_build_gets_no_first_use_hint(tmp_path: Path) -> None:
    grey = tmp_path / "grey28"
    write_split(grey, "train", np.zeros((4, 1, 28, 28), np.uint8), np.arange(4))
    with pytest.raises(DataError) as refused:
        check_image_set(mnist_tiny(grey))
    assert str(refused.value) == (
        f"the image set at {grey} holds 1×28×28 images but the model takes 1×32×32 (model.channels=1, "
        f"model.image_size=32). Train on this set with --set model.image_size=28 (or a config made for it), or give "
        f"--parquet-dir a set of 1×32×32 images (a folder that holds no set yet is built at that size on first use)")
    # a `prepared` source is never built by a run, and the shapes are never grey: no promise of a first-use build
    for source in ("prepared", "shapes"):
        with pytest.raises(DataError) as refused:
            check_image_set(mnist_tiny(grey, f"data.source={source}"))
        assert str(refused.value).endswith("or give --parquet-dir a set of 1×32×32 images")


def test_a_folder_without_a_set_passes_so_mnist_is_built_at_the_configs_size(tmp_path: Path) -> None:
    """MNIST is padded to model.image_size when a run builds it: a folder that holds no set yet is not refused,
    whatever size the config asks for."""
    for size in (28, 32, 64):
        check_image_set(mnist_tiny(tmp_path / "not-made-yet", f"model.image_size={size}"))


def test_batches_of_the_wrong_shape_are_refused_before_they_reach_the_model(colour16: Path) -> None:
    cfg = mnist_tiny(colour16, "train.batch_size=8")
    with pytest.raises(DataError) as refused:
        TrainingBatches(read_split(colour16, "train"), cfg, 0, 1, torch.device("cpu"))
    assert str(refused.value) == colour_set_message(colour16)

    batch = {"image": np.zeros((8, 3, 16, 16), np.uint8), "label": np.full(8, -1), "caption": np.array(["a"] * 8)}
    stream = StreamedBatches(lambda: iter([batch]), cfg, 0, 1, torch.device("cpu"))
    with pytest.raises(DataError) as refused:
        stream.get(0)
    assert str(refused.value) == colour_set_message(colour16)


def test_the_job_checks_the_set_and_the_tracking_store_before_anything_is_built(colour16: Path,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds 3×16×16 images but the model takes 1×32×32"):
        check_run_inputs(mnist_tiny(colour16), tracking=False)
    fits = ["model.channels=3", "model.image_size=16"]
    junk = tmp_path / "junk.db"
    junk.write_text("text")
    with pytest.raises(TrackingError, match=r"is not a SQLite database"):
        check_run_inputs(mnist_tiny(colour16, *fits, f"tracking.uri=sqlite:///{junk}"))
    check_run_inputs(mnist_tiny(colour16, *fits, f"tracking.uri=sqlite:///{junk}"), tracking=False)  # --no-tracking
    with pytest.raises(TrackingError, match=r"nothing accepts connections at 127.0.0.1:1 "):
        check_run_inputs(mnist_tiny(colour16, *fits, "tracking.uri=postgresql://u@127.0.0.1:1/db"))
    check_run_inputs(mnist_tiny(colour16, *fits, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"))
