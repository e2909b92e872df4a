"""Ray Train on a real local cluster: a worker failure, two-worker correctness and streaming workers (a submitted
job is checked end to end in test_first_steps).

All fits share one Ray head (see conftest.ray_head); each is a few micro steps on CPU workers with gloo.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sd3ray.cluster.trainer import build_trainer, check_resources, check_storage
from sd3ray.cluster.worker import DebugHooks
from tests.support import MICRO, REPO_ROOT


def _fit(cfg_overrides: list[str], mnist_parquet: Path, tmp_path: Path, name: str, workers: int,
         debug: dict | None = None, storage: str = "", **kwargs):
    from sd3ray.config import load_config

    replicas = tmp_path / f"{name}-replicas-{workers}"
    replicas.mkdir()
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml",
                      [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={tmp_path}", *cfg_overrides])
    trainer = build_trainer(cfg, name, workers=workers, storage_path=storage or str(tmp_path / "storage"),
                            debug=DebugHooks(**{"save_replica_to": str(replicas), **(debug or {})}), **kwargs)
    result = trainer.fit()
    return result, [torch.load(replicas / f"rank{r}.pt") for r in range(workers)]


def _dataset_managers(dashboard: str) -> int:
    """Ray Train's DatasetManager actors the shared head has seen, alive or dead. The head is named: with test
    files side by side, other Ray clusters run on this machine too."""
    from ray.util.state import list_actors

    return len(list_actors(address=dashboard, filters=[("class_name", "=", "DatasetManager")], limit=10_000))


def test_a_worker_failure_restarts_exactly_and_two_workers_of_batch_b_equal_one_of_batch_2b(
        ray_head, mnist_parquet: Path, tmp_path: Path) -> None:
    """Five fits, each checked against the others (a fit is the costliest thing a test starts):

    - two workers (batch 8 each) trained 4 steps without a fault;
    - the same, with a worker killed after the step-2 checkpoint: the restart from that checkpoint is bit-identical,
      in one MLflow run;
    - one worker with batch 16: DDP's averaged gradients are one batch of twice the size, to float tolerance;
    - the faulty run again under FSDP: each rank reports its shards of one sharded checkpoint, the restart reads
      it, and the weights are DDP's to float tolerance (reduce-scatter sums in another order), in one MLflow run.
    (A sharded run continued on another worker count, in object storage: the S3 test below.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["train.steps=4", "train.log_every=1", "train.ckpt_every=2", "train.eval_every=100", "train.grad_clip=0"]
    managers = _dataset_managers(ray_head["dashboard"])
    clean, clean_replicas = _fit([*common, "train.batch_size=8", f"tracking.uri={uri}", "tracking.experiment=clean"],
                                 mnist_parquet, tmp_path, "clean", 2)
    faulty, faulty_replicas = _fit([*common, "train.batch_size=8", f"tracking.uri={uri}",
                                    "tracking.experiment=faulty"], mnist_parquet, tmp_path, "faulty", 2,
                                   debug={"kill_after_checkpoint": 2}, max_failures=1)
    _, one = _fit([*common, "train.batch_size=16"], mnist_parquet, tmp_path, "one", 1, tracking=False)
    fsdp = [*common, "train.parallel=fsdp", f"tracking.uri={uri}", "tracking.experiment=fsdp"]
    sharded, sharded_replicas = _fit([*fsdp, "train.batch_size=8"], mnist_parquet, tmp_path, "fsdp", 2,
                                     debug={"kill_after_checkpoint": 2}, max_failures=1)
    assert clean.metrics["step"] == faulty.metrics["step"] == 4
    moved = 0
    for key, value in clean_replicas[0].items():
        # same batches, same state after restoring step 2: the restarted run is bit-identical
        assert torch.equal(value, faulty_replicas[0][key]), key
        # DDP keeps replicas identical
        assert torch.equal(clean_replicas[0][key], clean_replicas[1][key]), key
        torch.testing.assert_close(value, one[0][key], atol=2e-5, rtol=1e-4, msg=key)
        moved += int(not torch.equal(value, torch.zeros_like(value)))
    assert moved > 10
    # a run that reads its own Parquet files starts no Ray Data actor
    assert _dataset_managers(ray_head["dashboard"]) == managers
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faulty").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert steps == [1, 2, 3, 4]  # one MLflow run across the restart, no duplicated steps
    assert run.data.tags["sd3ray.resumed_at_step"] == "2"  # and the run says where it restarted
    _fsdp_restarts_from_its_sharded_checkpoint(sharded, sharded_replicas, clean_replicas, client)


def _fsdp_restarts_from_its_sharded_checkpoint(sharded, replicas, ddp_replicas, client) -> None:
    from sd3ray.checkpoint import is_sharded_checkpoint

    assert sharded.metrics["step"] == 4
    for key, value in ddp_replicas[0].items():
        assert torch.equal(replicas[0][key], replicas[1][key]), key  # every rank gathers the same whole weights
        torch.testing.assert_close(replicas[0][key], value, atol=2e-5, rtol=1e-4, msg=key)
    checkpoint = Path(sharded.checkpoint.path)
    assert checkpoint.name == "step_00000004" and is_sharded_checkpoint(checkpoint)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(json.loads((checkpoint / "MANIFEST.json").read_text()))
    (run,) = client.search_runs([client.get_experiment_by_name("fsdp").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")] == [1, 2, 3, 4]
    assert run.data.tags["sd3ray.resumed_at_step"] == "2"


def test_fsdp_writes_each_ranks_shards_to_s3_and_another_worker_count_resumes_and_samples_from_them(
        ray_head, s3, mnist_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two FSDP workers write one sharded checkpoint into object storage, each rank uploading its own shards and
    rank 0 the manifest last; the same run name continues on one worker of twice the batch (2 -> 1: DCP reshards
    on read), in the same MLflow run, and the final sharded checkpoint samples straight from its URI."""
    from sd3ray.inference import generate, load_ema_model
    from tests.support import BUCKET

    for key, value in s3["env"].items():  # this process reads the bucket; the head's workers have the same keys
        monkeypatch.setenv(key, value)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["train.log_every=1", "train.ckpt_every=2", "train.eval_every=100", "train.grad_clip=0",
                 "train.parallel=fsdp", f"tracking.uri={uri}", "tracking.experiment=fsdp-s3"]
    storage = s3["uri"]("fsdp")
    first, _ = _fit([*overrides, "train.steps=4", "train.batch_size=8"], mnist_parquet, tmp_path, "sharded", 2,
                    storage=storage)
    assert first.metrics["step"] == 4
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="fsdp/sharded/step_00000004/")
    keys = {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "MANIFEST.json"} <= keys, keys
    resumed, _ = _fit([*overrides, "train.steps=6", "train.batch_size=16"], mnist_parquet, tmp_path, "sharded", 1,
                      storage=storage)
    assert resumed.metrics["step"] == 6
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fsdp-s3").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")] == [1, 2, 3, 4, 5, 6]
    assert run.data.tags["sd3ray.resumed_at_step"] == "4"
    final = s3["uri"]("fsdp/sharded/step_00000006")
    model, cfg, step = load_ema_model(final, torch.device("cpu"))  # the whole EMA, assembled in this process
    assert step == 6 and generate(model, ["3", "7"], cfg, seed=0, device=torch.device("cpu")).shape == (2, 1, 32, 32)


def test_impossible_requests_fail_fast_with_advice(ray_head, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"--workers 16 needs 16 CPU\(s\) but the Ray cluster has 2"):
        check_resources(16, use_gpu=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RuntimeError, match="is not a writable folder"):
        check_storage(str(blocker / "sub"))
    with pytest.raises(RuntimeError, match="cannot be opened"):
        check_storage("nosuchscheme://bucket/x")


def _connect_in_a_fresh_process(env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env_overrides
    code = "from sd3ray.cluster.connect import connect; connect(timeout_s=3)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_dead_ray_address_ends_in_seconds_naming_the_address_and_its_source() -> None:
    from tests.support import free_port

    dead = f"127.0.0.1:{free_port()}"
    proc = _connect_in_a_fresh_process({"RAY_ADDRESS": dead})
    assert proc.returncode != 0
    assert f"the Ray cluster at {dead} (from the RAY_ADDRESS environment variable) does not answer" in proc.stderr
    assert "unset RAY_ADDRESS" in proc.stderr


def test_a_stale_address_file_left_by_a_dead_cluster_is_named_with_the_way_out(tmp_path: Path) -> None:
    from tests.support import free_port

    dead = f"127.0.0.1:{free_port()}"
    address_file = tmp_path / "ray" / "ray_current_cluster"  # where `ray start --head` leaves it (RAY_TMPDIR/ray)
    address_file.parent.mkdir()
    address_file.write_text(dead)
    proc = _connect_in_a_fresh_process({"RAY_TMPDIR": str(tmp_path)})
    assert proc.returncode != 0
    assert f"the Ray cluster at {dead} (from {address_file}, written by the last `ray start --head`" in proc.stderr
    assert f"or delete {address_file}" in proc.stderr


def test_streaming_workers_share_each_pass_and_a_restart_replays_the_interrupted_one(ray_head, tmp_path: Path) -> None:
    """Two workers stream 96 numbered images (6 steps of global batch 16 per pass); rank 0 dies after the step-4
    checkpoint. Before the failure the workers' batches are disjoint; after the restart (from step 4) the interrupted
    pass starts over, and steps 5..10 are one whole pass: every image exactly once across the two workers."""
    from sd3ray.config import load_config
    from tests.support import numbered_set

    root = numbered_set(tmp_path / "set", 96, shard_size=24)
    micro = [o for o in MICRO if not o.startswith("data.")]
    cfg = load_config(REPO_ROOT / "configs/shapes_tiny.yaml", [
        *micro, f"data.parquet_dir={root}", "model.image_size=8", "model.patch_size=2", "train.batch_size=8",
        "data.num_val_images=16", "data.shuffle_buffer=32", "train.steps=10", "train.log_every=1",
        "train.ckpt_every=4", "train.eval_every=100", f"train.output_dir={tmp_path}"])
    samples = tmp_path / "samples"
    samples.mkdir()
    # 0.5 CPU per worker leaves one of the head's two CPUs to Ray Data's read and decode tasks
    trainer = build_trainer(cfg, "streamed", workers=2, storage_path=str(tmp_path / "storage"), tracking=False,
                            cpus_per_worker=0.5, max_failures=1,
                            debug=DebugHooks(kill_after_checkpoint=4, record_samples_to=str(samples)))
    assert set(trainer.datasets) == {"train"}  # the run streams: the trainer holds a Ray Dataset
    result = trainer.fit()
    assert result.metrics["step"] == 10
    # rank -> attempts -> passes -> batches of labels
    attempts = {rank: [[[[int(x) for x in line.split()] for line in one_pass.strip().splitlines()]
                        for one_pass in attempt.split("pass\n")[1:]]
                       for attempt in (samples / f"rank{rank}.txt").read_text().split("start\n")[1:]]
                for rank in (0, 1)}
    assert [[len(p) for p in attempt] for attempt in attempts[0]] == [[4], [6]]  # steps 1-4, then 5-10
    first_attempt = [x for rank in (0, 1) for batch in attempts[rank][0][0][:4] for x in batch]
    assert len(first_attempt) == 64 and len(set(first_attempt)) == 64  # the workers never shared an image
    assert len(attempts[1][1]) == 1 and len(attempts[1][1][0]) == 6
    replayed = sorted(x for rank in (0, 1) for batch in attempts[rank][1][0] for x in batch)
    assert replayed == list(range(96))  # the resumed pass: all 96 images, each once, over the two workers


@pytest.mark.timeout(600)  # ranks that drew different buckets would wait on each other forever: a hang fails here
def test_two_workers_draw_the_same_bucket_at_every_step_of_a_bucketed_set(ray_head, tmp_path: Path) -> None:
    """Mixed-shape images in aspect-ratio buckets on two Ray Train workers: every step's all-reduce meets (one
    bucket a step on both ranks), the run finishes, and DDP keeps the replicas identical."""
    from sd3ray.data.bucketed_sets import import_bucketed_folder
    from tests.unit.test_buckets import mixed_folder

    images, captions = mixed_folder(tmp_path / "images")
    data = tmp_path / "bucketed"
    import_bucketed_folder(images, captions, data, 32, 3, multiple=8, max_aspect=2.0, test_fraction=0.25)
    result, replicas = _fit(["model.channels=3", "model.patch_size=8", "model.pos_embed_max_size=6",
                             "data.source=prepared", f"data.parquet_dir={data}", "train.batch_size=2",
                             "train.steps=8", "train.log_every=2", "train.ckpt_every=8", "train.eval_every=100",
                             "text.max_length=16"], data, tmp_path, "buckets", 2, tracking=False)
    assert result.metrics["step"] == 8
    for key, value in replicas[0].items():
        assert torch.equal(value, replicas[1][key]), key


def test_workers_get_absolute_paths_for_local_folders_and_hub_ids_as_they_are(tmp_path: Path, monkeypatch) -> None:
    """A Ray worker runs in another directory: a VAE, encoder or base folder named relative to the driver's must
    reach it absolute, while a hub id (ORG/NAME, not a folder here) and `byte` stay as they are."""
    from sd3ray.cluster.trainer import absolute_paths
    from sd3ray.config import load_config

    monkeypatch.chdir(tmp_path)
    for name in ("vae", "clip"):
        (tmp_path / name).mkdir()
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*MICRO, "vae.source=vae", "model.channels=4"])
    moved = absolute_paths(cfg)
    assert moved.vae.source == str(tmp_path / "vae") and moved.text.encoder == ("byte",)
    # the spool of tracking writes a server did not take lands where the replay job looks, not in the worker's folder
    assert moved.train.output_dir == str(tmp_path / "runs") and cfg.train.output_dir == "runs"
    hub = absolute_paths(load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, "vae.source=stabilityai/sd-vae-ft-mse", "model.channels=4", "text.encoder=clip,org/t5"]))
    assert hub.vae.source == "stabilityai/sd-vae-ft-mse" and hub.text.encoder == (str(tmp_path / "clip"), "org/t5")
