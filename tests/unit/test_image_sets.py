import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3ray.data.format import ShardWriter, read_metadata, read_split, write_split
from sd3ray.data.image_sets import (
    CIFAR10_CLASSES,
    PLACES,
    coloured_shapes,
    import_captioned_folder,
    import_cifar10,
    is_test,
)
from sd3ray.errors import DataError


def test_shard_writer_streams_chunks_into_the_same_set_as_one_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (250, 3, 8, 8), dtype=np.uint8)
    captions = [f"image {i}" for i in range(250)]
    write_split(tmp_path / "whole", "train", images, captions=captions, shard_size=100)
    writer = ShardWriter(tmp_path / "chunked", "train", 3, 8, labelled=False, captioned=True, shard_size=100)
    for start in range(0, 250, 33):  # chunks that straddle shard boundaries
        writer.add(images[start:start + 33], captions=captions[start:start + 33])
    assert not (tmp_path / "chunked" / "metadata.json").exists()  # nothing looks whole before close()
    writer.close()
    whole, chunked = read_split(tmp_path / "whole", "train"), read_split(tmp_path / "chunked", "train")
    assert np.array_equal(whole.images.numpy(), chunked.images.numpy()) and whole.captions == chunked.captions
    assert read_metadata(tmp_path / "chunked")["splits"]["train"]["shards"] == [f"train-0000{k}.parquet"
                                                                                 for k in range(3)]


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_captioned_folder_becomes_a_colour_set_with_stable_splits(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(40):
        wide = np.zeros((20, 40, 3), np.uint8)  # a wide image: red left quarter, green middle, blue right quarter
        wide[:, :10] = (255, 0, 0)
        wide[:, 10:30] = (0, 255, 0)
        wide[:, 30:] = (0, 0, 255)
        _png(folder / f"img{i}.png", wide)
        rows.append({"file": f"img{i}.png", "caption": f"a green field, number {i}"})
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows))
    out = import_captioned_folder(folder, captions, tmp_path / "set", image_size=16, channels=3, test_fraction=0.25)
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) + len(test) == 40 and len(test) == sum(is_test(r["file"], 0.25) for r in rows) > 0
    assert train.images.shape[1:] == (3, 16, 16)
    # the centre square of the wide image is all green: cropping, not squashing, made it
    assert (train.images[:, 1].float().mean() > 250) and (train.images[:, 0].float().mean() < 5)
    expected = {r["caption"] for r in rows if not is_test(r["file"], 0.25)}
    assert set(train.captions) == expected


@pytest.mark.parametrize("content, message", [
    ("file,text\na.png,hi\n", "header row with the columns file,caption"),
    ("file,caption\nmissing.png,hi\n", "1 images in"),
])
def test_bad_captions_files_are_named_with_the_fix(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "captions.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        import_captioned_folder(tmp_path, tmp_path / "captions.csv", tmp_path / "set", 16, 3)


def _cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar10_imports_with_class_name_captions(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / f"cifar-10-batches-{layout}"
    folder.mkdir()
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images, labels = _cifar_arrays(20, k)
        batches[name] = (images, labels)
        if layout == "bin":
            rows = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(20, -1)], axis=1)
            (folder / f"{name}.bin").write_bytes(rows.tobytes())
        else:  # torchvision's python pickles: a dict of bytes keys, the data as a (N, 3072) array
            with (folder / name).open("wb") as f:
                pickle.dump({b"data": images.reshape(20, -1), b"labels": labels.tolist()}, f)
    out = import_cifar10(tmp_path, tmp_path / "set")
    train, test = read_split(out, "train"), read_split(out, "test")
    assert len(train) == 100 and len(test) == 20
    first_images, first_labels = batches["data_batch_1"]
    assert np.array_equal(train.images[:20].numpy(), first_images)
    assert train.labels[:20].tolist() == first_labels.tolist()
    for caption, label in zip(train.captions, train.labels.tolist()):
        assert CIFAR10_CLASSES[label] in caption
    assert {c for c in train.captions if "airplane" in c} <= {"airplane", "an airplane", "a photo of an airplane"}


def test_coloured_shapes_draw_what_their_captions_say() -> None:
    images, captions = coloured_shapes(64, image_size=32, seed=3)
    assert images.shape == (64, 3, 32, 32) and len(set(captions)) > 10
    for image, caption in zip(images, captions):
        colour = caption.split()[1]
        place = caption.split(" ", 3)[3]
        fx, fy = PLACES[place]
        shape_pixels = image.max(axis=0) > 60  # the background is darker than every colour
        ys, xs = np.nonzero(shape_pixels)
        assert abs(xs.mean() / 32 - fx) < 0.1 and abs(ys.mean() / 32 - fy) < 0.1, caption
        mean_rgb = image[:, shape_pixels].mean(axis=1)
        dominant = {"red": [0], "green": [1], "blue": [2], "yellow": [0, 1]}[colour]
        assert all(mean_rgb[c] > 150 for c in dominant), (caption, mean_rgb)


def test_an_interrupted_import_leaves_the_previous_set_whole_and_the_next_one_starts_clean(tmp_path: Path) -> None:
    """The fault: Ctrl-C between the train and test splits of a new import over an old set left the new train split
    beside the old test split, a mixed set that trained."""
    from sd3ray.data.image_sets import write_image_set

    rng = np.random.default_rng(0)

    def chunks(n: int, interrupt: bool = False):
        def generate():
            yield "train", rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), [f"new {i}" for i in range(n)]
            if interrupt:
                raise KeyboardInterrupt  # between the splits, as a Ctrl-C lands
            yield "test", rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8), ["t"] * 4
        return generate

    out = tmp_path / "set"
    write_image_set(out, chunks(10), channels=3, image_size=8, labelled=False, shard_size=100)
    before = read_metadata(out)
    with pytest.raises(KeyboardInterrupt):
        write_image_set(out, chunks(20, interrupt=True), channels=3, image_size=8, labelled=False, shard_size=100)
    assert read_metadata(out) == before and len(read_split(out, "train")) == 10  # the old set, untouched
    write_image_set(out, chunks(30), channels=3, image_size=8, labelled=False, shard_size=100)
    assert read_metadata(out)["splits"]["train"]["count"] == 30 and len(read_split(out, "test")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging or old set left beside it
