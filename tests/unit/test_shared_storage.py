import pytest

from sd3ray.storage import SharedStorageError, check_shared, filesystem_type, join, unshared_locations

MOUNTS = """overlay / overlay rw,relatime 0 0
/dev/nvme0n1p1 /data ext4 rw,relatime 0 0
fs-1.efs.aws:/ /mnt/shared nfs4 rw,relatime 0 0
bucket /mnt/fuse\\040bucket fuse.s3fs rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


def test_filesystem_type_is_the_longest_mount_point_above_the_path() -> None:
    assert filesystem_type("/mnt/shared/runs/x", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/sharedness", MOUNTS) == "overlay"  # a prefix of the name is not a parent
    assert filesystem_type("/data", MOUNTS) == "ext4"
    assert filesystem_type("/mnt/fuse bucket/a", MOUNTS) == "fuse.s3fs"
    assert filesystem_type("/home/me", MOUNTS) == "overlay"


def test_only_multi_node_runs_need_shared_locations() -> None:
    local = {"--storage-path": "/data/runs"}
    assert unshared_locations(local, num_nodes=1, mounts=MOUNTS) == []
    (problem,) = unshared_locations(local, num_nodes=2, mounts=MOUNTS)
    assert "/data/runs is on this machine's own disk (ext4)" in problem and "s3://" in problem
    shared = {"a": "/mnt/shared/runs", "b": "s3://bucket/runs?endpoint_override=h:1", "c": "/mnt/fuse bucket/x",
              "d": "http://mlflow:5000"}
    assert unshared_locations(shared, num_nodes=3, mounts=MOUNTS) == []
    (file_uri,) = unshared_locations({"--storage-path": "file:///data/runs"}, num_nodes=2, mounts=MOUNTS)
    assert "file:///data/runs is on this machine's own disk (ext4)" in file_uri
    assert unshared_locations({"--storage-path": "file:///mnt/shared/runs"}, num_nodes=2, mounts=MOUNTS) == []
    (sqlite,) = unshared_locations({"tracking.uri": "sqlite:////data/mlflow.db"}, num_nodes=2, mounts=MOUNTS)
    assert "SQLite file on this machine" in sqlite


def test_the_check_names_every_problem_and_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    locations = {"--storage-path": str(tmp_path), "tracking.uri": "sqlite:///x.db"}
    with pytest.raises(SharedStorageError, match="2 nodes") as err:
        check_shared(locations, num_nodes=2)
    assert str(tmp_path) in str(err.value) and "sqlite:///x.db" in str(err.value)
    monkeypatch.setenv("SD3RAY_ASSUME_SHARED", "1")
    check_shared(locations, num_nodes=2)  # the user vouches for them


def test_join_keeps_a_uris_query() -> None:
    assert join("s3://b/runs?endpoint_override=h:1&scheme=http", "n") == "s3://b/runs/n?endpoint_override=h:1&scheme=http"
    assert join("/data/runs/", "n") == "/data/runs/n"
