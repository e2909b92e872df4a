"""Where sd3ray reads and writes: every local-or-URI location goes through this module.

- A location is a local folder or a URI pyarrow opens (`s3://bucket/prefix?endpoint_override=HOST:PORT`);
  `open_folder` gives its filesystem, and a URI that cannot be opened fails with one message naming it.
- Credentials never reach the tracker or the console: every config value becomes an MLflow param, and a tracking or
  storage URI may carry a password (`https://user:PASSWORD@host`) or a key in its query (`?access_key=...`);
  `redact` masks them in everything sd3ray prints or logs.
- The tracking store: the configured URI, else `$MLFLOW_TRACKING_URI`, else `./mlflow.db`.
- What every node of a cluster must see alike: the prepared data, the checkpoint storage and the tracking store. On
  one machine any path works. On several, a worker reads and writes on its own machine, so a folder on the driver's
  own disk (or a SQLite tracking file) is a different, empty place for every other node: the run then fails late and
  confusingly. `check_shared` names such locations before training starts. URIs (s3://, gs://, ...) and folders on
  network filesystems (NFS, EFS, Lustre, CephFS, FUSE mounts) count as shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from sd3ray.errors import DataError, Sd3rayError, StorageError, TrackingError

# -------------------------------------------------------------- Locations: a local folder or a URI pyarrow opens


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str, name: str) -> str:
    """`location/name`, keeping a URI's query (s3://bucket/runs?endpoint_override=... -> .../runs/name?...)."""
    base, query = (location.split("?", 1) + [""])[:2]
    return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")


def local_path(location: str) -> str | None:
    """The path on this machine a location names (a plain path or file://...), or None for a remote URI."""
    if location.startswith("file://"):
        return location[len("file://"):].split("?", 1)[0]
    return None if is_uri(location) else location


def open_folder(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """A folder named by a local path or by a URI pyarrow opens (e.g. `s3://bucket/prefix`, with
    `?endpoint_override=HOST:PORT&scheme=http` for S3-compatible servers): its filesystem and path there."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise DataError(f"cannot open {location} ({exc}); use a local folder or a URI such as "
                        f"s3://bucket/prefix with credentials in the environment") from exc
    return fs, path.rstrip("/")


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


@contextlib.contextmanager
def location_errors(location: str | Path, doing: str) -> Iterator[None]:
    """While `doing` something at `location`, an error of the filesystem or object store (pyarrow's OSError or
    ArrowException, the OS's OSError) becomes one StorageError naming the location, what failed and what to check;
    sd3ray's own errors pass through."""
    try:
        yield
    except Sd3rayError:
        raise
    except (OSError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        remote = " (its endpoint, bucket and credentials)" if is_uri(location) else ""
        raise StorageError(f"cannot {doing} {redact(str(location))}: {redact(reason)}. Check that the location "
                           f"exists and is reachable{remote}") from None


def read_user_text(path: Path, what: str) -> str:
    """A text file the user wrote (captions, prompts), decoded as UTF-8, or one DataError naming it and the byte
    where decoding failed."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") \
            from None


def writable_folder(path: Path, what: str, fix: str) -> Path:
    """Make `path` (and its parents) and check a file can be created in it, before any work that would be lost if
    it could not; else one StorageError naming `what`, the reason (read-only, permissions, a file in the way) and
    `fix`."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sd3ray-write-check-"):
            pass
    except OSError as exc:
        raise StorageError(f"{what} {path} is not a writable folder ({exc.strerror or exc}); {fix}") from None
    return Path(path)


def read_json(path: Path, what: str, fix: str, error: type[Sd3rayError]) -> Any:
    """A JSON file sd3ray wrote (a manifest, metadata), or one `error` naming the file and `fix` when it is
    damaged: cut short, edited by hand, or not JSON at all."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is damaged ({exc}); {fix}") from None


# ------------------------------------------------------------------------------------------- Credentials in URIs

MASK = "***"
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]+):([^/\s@]+)@")
_SECRET_QUERY = re.compile(
    r"([?&](?:access[_-]?key(?:[_-]?id)?|secret(?:[_-]?(?:access[_-]?)?key)?|password|passwd|pwd|token|"
    r"session[_-]?token|security[_-]?token|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"credential|api[_-]?key)=)[^&\s#]*",
    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` and the value of every secret-looking query
    parameter replaced by ***; the rest (host, path, endpoint_override, ...) stays readable."""
    return _SECRET_QUERY.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1:{MASK}@", text))


# -------------------------------------------------------------------------------------------- The tracking store

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ./mlflow.db. Relative SQLite paths become absolute so Ray
    workers (which run in another directory) write to the same database as the driver. Its scheme must be one MLflow
    opens, and a SQLite file must be one (`check_sqlite_file`); whether a server answers is `check_reachable`'s."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    source = "tracking.uri" if configured else "MLFLOW_TRACKING_URI" if "MLFLOW_TRACKING_URI" in os.environ \
        else "the default tracking URI"
    check_scheme(uri, source)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    check_sqlite_file(uri, source)
    return uri


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def check_scheme(uri: str, source: str) -> None:
    """An unknown scheme fails here with the ones that work, not deep inside MLflow's store registry."""
    if "://" not in uri:
        return  # a plain path: MLflow's file store
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(f"{source} {redact(uri)}: MLflow cannot open a {scheme}:// store; use "
                            f"http(s)://HOST:PORT for a tracking server or sqlite:///mlflow.db for a local file "
                            f"(also: {', '.join(s + '://' for s in TRACKING_SCHEMES[3:])})")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def sqlite_file(uri: str) -> Path | None:
    """The database file a `sqlite[+driver]:///PATH[?query]` URI names; None for other schemes and in-memory ones."""
    head, sep, rest = uri.partition(":///")
    if not sep or head.split("+", 1)[0].lower() != "sqlite":
        return None
    path = rest.split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_sqlite_file(uri: str, source: str) -> None:
    """A SQLite tracking store must be a SQLite file or a place to make one. MLflow creates a missing file and its
    missing folders; a folder, a file of something else, or a file where a folder must be would otherwise end in a
    SQLAlchemy traceback when the run opens, after the model is built."""
    path = sqlite_file(uri)
    if path is None:
        return
    shown = redact(uri)
    if path.is_dir():
        raise TrackingError(f"{source} {shown} names the folder {path}, not a SQLite file; name a file in it, "
                            f"e.g. sqlite:///{path / 'mlflow.db'}")
    if path.is_file():
        try:
            with path.open("rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise TrackingError(f"{source} {shown}: {path} cannot be read ({exc.strerror}); check its "
                                f"permissions or name another file") from None
        if header and header != SQLITE_HEADER:  # an empty file is fine: SQLite makes a database of it
            raise TrackingError(f"{source} {shown}: {path} is not a SQLite database (it does not start with "
                                f"SQLite's header); name a new file (MLflow creates it) or the mlflow.db of an "
                                f"earlier run, or move this file away")
        check_sqlite_writable(path.parent, source, shown)
        return
    folder = next(parent for parent in path.parents if parent.exists())  # "/" always exists
    if not folder.is_dir():
        raise TrackingError(f"{source} {shown}: {folder} is a file, so the folder for {path.name} cannot be "
                            f"made; name a file in a folder (e.g. sqlite:///{folder.parent / 'mlflow.db'})")
    check_sqlite_writable(folder, source, shown)


def check_sqlite_writable(folder: Path, source: str, shown: str) -> None:
    """SQLite writes its database and a journal beside it: a read-only folder (a read-only mount, another user's
    folder) would end in SQLAlchemy's "unable to open database file" once the run opens."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"{source} {shown}: {folder} is not a folder sd3ray can write (read-only or another "
                            f"user's); name a SQLite file in a writable folder, e.g. --tracking-uri "
                            f"sqlite:///{Path.home() / 'mlflow.db'}")


# ----------------------------------------------------------------------------- What every node of a cluster sees

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p", "afs",
    "virtiofs", "efs",
})
ASSUME_SHARED_ENV = "SD3RAY_ASSUME_SHARED"  # "1": trust that local paths are shared (an unrecognised network fs)


class SharedStorageError(Sd3rayError):
    """A multi-node run was given a location that only one node can see."""


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
