"""The streaming data path: the local reader, the loop's contract, the automatic choice, and training through it."""

from pathlib import Path

import numpy as np
import torch

from sd3ray.config import load_config
from sd3ray.data.batches import TrainingBatches
from sd3ray.data.format import read_split
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.data.streaming import LocalParquetStream, StreamedBatches, describe_choice, streams
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import MICRO, REPO_ROOT, numbered_set


def test_each_local_pass_gives_every_row_once_in_a_new_order(tmp_path: Path) -> None:
    stream = LocalParquetStream(numbered_set(tmp_path / "set", 230, shard_size=50), batch_size=16, seed=0,
                                buffer_size=64)
    passes = [[b["label"] for b in stream] for _ in range(2)]
    for batches in passes:
        assert all(len(b) == 16 for b in batches) and len(batches) == 230 // 16
        seen = np.concatenate(batches)
        assert len(set(seen.tolist())) == len(seen)  # no row twice in a pass; 230 % 16 = 6 rows left over
    assert not np.array_equal(np.concatenate(passes[0]), np.concatenate(passes[1]))


def test_streamed_batches_keep_the_in_memory_paths_draws(tmp_path: Path) -> None:
    """Same step, same seed: t, eps and prompt dropout are those of the in-memory path; only the images differ."""
    root = numbered_set(tmp_path / "set", 64, shard_size=64)
    cfg = load_config(REPO_ROOT / "configs/shapes_tiny.yaml",
                      [f"data.parquet_dir={root}", "model.image_size=8", "model.patch_size=2", "train.batch_size=8",
                       "text.prompt_dropout=0.5"])
    memory = TrainingBatches(read_split(root, "train"), cfg, rank=1, world_size=2, device=torch.device("cpu"))
    stream = StreamedBatches(LocalParquetStream(root, 8, seed=0).__iter__, cfg, rank=1, world_size=2,
                             device=torch.device("cpu"))
    for step in (0, 7):
        x_mem, ids_mem, mask_mem, t_mem, eps_mem = memory.get(step)
        x, ids, mask, t, eps = stream.get(step)
        torch.testing.assert_close(t, t_mem)
        torch.testing.assert_close(eps, eps_mem)
        assert x.shape == x_mem.shape and -1 <= x.min() and x.max() <= 1
        assert torch.equal(mask.sum(1) == 0, mask_mem.sum(1) == 0)  # the same prompts were dropped
    assert stream.passes_started == 1


def test_auto_streams_by_the_train_splits_size(tmp_path: Path) -> None:
    root = numbered_set(tmp_path / "set", 1024, shard_size=512)  # 1024 × 192 bytes = 0.1875 MB
    def cfg(*extra: str):
        return load_config(None, [f"data.parquet_dir={root}", *extra])

    assert not streams(cfg("data.stream_above_mb=0.25")) and streams(cfg("data.stream_above_mb=0.125"))
    assert not streams(cfg("data.loading=memory", "data.stream_above_mb=0"))
    assert streams(cfg("data.loading=stream"))
    assert "(0 MB decoded) is streamed from its shards (above data.stream_above_mb=0.125)" in \
        describe_choice(cfg("data.stream_above_mb=0.125"))


def shapes_config(root: Path, tmp_path: Path, *extra: str):
    micro = [o for o in MICRO if not o.startswith("data.")]
    return load_config(REPO_ROOT / "configs/shapes_tiny.yaml", [
        *micro, f"data.parquet_dir={root}", f"train.output_dir={tmp_path / 'runs'}", "data.num_val_images=32",
        "text.max_length=40", *extra])


def test_colour_set_trains_locally_through_the_stream_and_logs_colour_grids(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.tracking.mlflow_tracker import make_tracker

    root = write_coloured_shapes(tmp_path / "shapes", num_images=2000, num_test=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = shapes_config(root, tmp_path, "train.steps=200", "train.log_every=20", "train.eval_every=100",
                        "train.ckpt_every=200", "train.lr=0.003", "train.warmup_steps=10", "data.shuffle_buffer=512",
                        f"tracking.uri={uri}", "tracking.log_model=false", "tracking.log_checkpoints=none",
                        "tracking.system_metrics_every_s=0")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), make_tracker(cfg))
    assert result.step == 200
    client = MlflowClient(uri)
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss/train"), key=lambda m: m.step)]
    assert len(losses) == 10 and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    grids = sorted(a.path for a in client.list_artifacts(result.run_id, "images")
                   if a.path.startswith("images/samples") and a.path.endswith(".png"))
    steps = sorted(int(path.split("+step+")[1].split("+")[0]) for path in grids)
    assert steps == [0, 100, 200], grids  # the untrained model's, then at each evaluation
    latest = next(path for path in grids if "+step+200+" in path)
    local = client.download_artifacts(result.run_id, latest, str(tmp_path / "grid"))
    from PIL import Image

    grid = np.asarray(Image.open(local))
    assert grid.ndim == 3 and grid.shape[-1] == 3 and grid.std(axis=-1).mean() > 1  # colour, not grey
