from pathlib import Path

import numpy as np
import pytest
import torch

from sd3ray.data.batches import ShardedBatches, TrainingBatches, prompt_candidates
from sd3ray.data.format import from_uint8, read_split, to_uint8, write_split
from sd3ray.data.mnist import load_mnist, pad_to, read_idx
from sd3ray.data.prompts import digit_prompts
from sd3ray.errors import DataError


def test_real_mnist_reads_with_expected_shapes(mnist_root: Path) -> None:
    images, labels = load_mnist(mnist_root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10))


def test_parquet_round_trip_of_real_mnist(mnist_parquet: Path, mnist_root: Path) -> None:
    images, labels = load_mnist(mnist_root, "test")
    split = read_split(mnist_parquet, "test")
    assert split.images.shape == (10000, 1, 32, 32) and split.images.dtype == torch.uint8
    # padding keeps the digit pixel-exact in the centre, background around it
    assert torch.equal(split.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert split.images[:, :, :2].sum() == 0 and split.images[:, :, :, 30:].sum() == 0
    assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))


def test_generated_three_channel_captioned_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 3, 16, 16), dtype=np.uint8)
    captions = [f"a {c} square" for c in rng.choice(["red", "green", "blue"], 50)]
    write_split(tmp_path, "train", images, captions=captions, shard_size=20)
    split = read_split(tmp_path, "train")
    assert len(list(tmp_path.glob("train-*.parquet"))) == 3
    assert torch.equal(split.images, torch.from_numpy(images)) and split.captions == captions
    prompts, candidates = prompt_candidates(split)
    assert [prompts[i] for i in candidates[:, 0].tolist()] == captions


def test_digit_candidates_name_the_label(mnist_parquet: Path) -> None:
    split = read_split(mnist_parquet, "test")
    prompts, candidates = prompt_candidates(split)
    for i in range(0, 10000, 997):
        assert {prompts[j] for j in candidates[i].tolist()} == set(digit_prompts(int(split.labels[i])))


def test_missing_mnist_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in .*MNIST/raw. Pass --data-root"):
        load_mnist(tmp_path, "train", download=False)


def test_truncated_idx_is_refused(tmp_path: Path, mnist_root: Path) -> None:
    data = (mnist_root / "MNIST/raw/t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "bad").write_bytes(data[:500])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_wrong_image_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint8 \\(N, C, S, S\\)"):
        write_split(tmp_path, "train", np.zeros((4, 2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="do not fit"):
        pad_to(np.zeros((1, 40, 40), np.uint8), 32)


def test_sharded_batches_partition_each_global_batch() -> None:
    one = ShardedBatches(100, batch_size=8, rank=0, world_size=1, seed=5)
    two = [ShardedBatches(100, batch_size=4, rank=r, world_size=2, seed=5) for r in range(2)]
    for step in range(30):
        assert torch.equal(one.indices(step), torch.cat([s.indices(step) for s in two]))
    epoch = torch.cat([one.indices(s) for s in range(one.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == 96  # each image at most once per epoch
    fresh = ShardedBatches(100, batch_size=8, rank=0, world_size=1, seed=5)
    assert torch.equal(fresh.indices(17), one.indices(17))  # a pure function of the step: resume is exact
    assert not torch.equal(one.indices(0), one.indices(one.steps_per_epoch))  # a new permutation per epoch


def test_batches_are_a_function_of_the_step(micro_config) -> None:
    from sd3ray.data.format import read_split

    cfg = micro_config("text.prompt_dropout=0.5")
    images = read_split(cfg.data.parquet_dir, "test")
    one = TrainingBatches(images, cfg, 0, 1, torch.device("cpu"))
    again = TrainingBatches(images, cfg, 0, 1, torch.device("cpu"))
    for x, y in zip(one.get(5), again.get(5)):
        assert torch.equal(x, y)
    x0, ids, mask, t, eps = one.get(5)
    assert x0.min() >= -1 and x0.max() <= 1 and x0.shape == (16, 1, 32, 32)
    empty = mask.sum(1) == 1  # only BOS: the dropped prompts
    assert 0 < empty.sum() < 16
    # halves of a 2-worker split are the two halves of the 1-worker batch of twice the size
    two = [TrainingBatches(images, micro_config("text.prompt_dropout=0.5", "train.batch_size=8"), r, 2,
                           torch.device("cpu")) for r in range(2)]
    for whole, parts in zip(one.get(9), zip(*(w.get(9) for w in two))):
        assert torch.equal(whole, torch.cat(parts))


def test_uint8_round_trip() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(pixels)), pixels)
    assert from_uint8(pixels).min() == -1 and from_uint8(pixels).max() == 1
