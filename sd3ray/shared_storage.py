"""What every node of a cluster must see alike: the prepared data, the checkpoint storage and the tracking store.

On one machine any path works. On several, a worker reads and writes on its own machine, so a folder on the
driver's own disk (or a SQLite tracking file) is a different, empty place for every other node: the run then fails
late and confusingly (a worker that cannot find the data, a checkpoint restored from nowhere). This module names
such locations before training starts. URIs (s3://, gs://, ...) and folders on network filesystems (NFS, EFS,
Lustre, CephFS, FUSE mounts) count as shared.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3ray.errors import Sd3rayError
from sd3ray.redact import redact

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p", "afs",
    "virtiofs", "efs",
})
ASSUME_SHARED_ENV = "SD3RAY_ASSUME_SHARED"  # "1": trust that local paths are shared (an unrecognised network fs)


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str, name: str) -> str:
    """`location/name`, keeping a URI's query (s3://bucket/runs?endpoint_override=... -> .../runs/name?...)."""
    base, query = (location.split("?", 1) + [""])[:2]
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (the longest mount point above it)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    resolved, best, fstype = str(Path(path).resolve()), "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def local_path(location: str) -> str | None:
    """The path on this machine a location names (a plain path or file://...), or None for a remote URI."""
    if location.startswith("file://"):
        return location[len("file://"):].split("?", 1)[0]
    return None if is_uri(location) else location


def is_shared(location: str, mounts: str | None = None) -> bool:
    """Whether every node sees `location`: remote URIs do; a local path only on a network or FUSE filesystem."""
    if location.startswith("sqlite:"):
        return False
    path = local_path(location)
    if path is None:
        return True
    kind = filesystem_type(path, mounts)
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse")


def unshared_locations(locations: dict[str, str], num_nodes: int, mounts: str | None = None) -> list[str]:
    """One line per location (keyed by the flag that set it) that nodes other than this one cannot see."""
    if num_nodes <= 1 or os.environ.get(ASSUME_SHARED_ENV) == "1":
        return []
    problems = []
    for flag, location in locations.items():
        if location.startswith("sqlite:"):
            problems.append(f"{flag} {location} is a SQLite file on this machine; use an MLflow server "
                            f"(http://HOST:PORT, see docs/cluster.md)")
        elif not is_shared(location, mounts):
            problems.append(f"{flag} {location} is on this machine's own disk "
                            f"({filesystem_type(local_path(location), mounts)}); "
                            f"use a URI every node reaches (s3://bucket/prefix) or a folder on a shared filesystem")
    return problems


def check_shared(locations: dict[str, str], num_nodes: int) -> None:
    """Stop before training when a location only this machine sees would be used by a multi-node cluster."""
    problems = [redact(problem) for problem in unshared_locations(locations, num_nodes)]
    if problems:
        raise SharedStorageError(
            f"the Ray cluster has {num_nodes} nodes, and every node must see the data, the checkpoints and the "
            f"tracking store alike:\n  " + "\n  ".join(problems) +
            f"\n(If these folders are on a shared filesystem sd3ray does not recognise, set {ASSUME_SHARED_ENV}=1.)")


class SharedStorageError(Sd3rayError):
    """A multi-node run was given a location that only one node can see."""
