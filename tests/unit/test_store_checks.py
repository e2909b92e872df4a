"""Tracking stores that are not what their URI claims are refused with one message naming the store and the fix: a
file of text or a folder given as SQLite (checked where the URI is resolved, offline), and a database server that
refuses connections (checked with `check_reachable`, a TCP connect and no database driver). Each test plants the
fault on the real filesystem or a real closed port."""

import socket
import sqlite3
from pathlib import Path

import pytest

from sd3ray.errors import TrackingError
from sd3ray.storage import SQLITE_HEADER, resolve_tracking_uri, sqlite_file
from sd3ray.tracking.mlflow_tracker import check_reachable

CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def test_a_text_file_given_as_sqlite_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n")
    uri = f"sqlite:///{junk}"
    message = (f"{uri}: {junk} is not a SQLite database (it does not start with SQLite's header); name a new file "
               f"(MLflow creates it) or the mlflow.db of an earlier run, or move this file away")
    with pytest.raises(TrackingError) as refused:
        resolve_tracking_uri(uri)
    assert str(refused.value) == f"tracking.uri {message}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError) as refused:
        resolve_tracking_uri("")
    assert str(refused.value) == f"MLFLOW_TRACKING_URI {message}"


def test_a_relative_sqlite_path_is_checked_where_it_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 2\x00")  # one byte off the header
    with pytest.raises(TrackingError, match=rf"^the default tracking URI sqlite:///{tmp_path}/mlflow.db: .* is not a "
                                            r"SQLite database"):
        resolve_tracking_uri("")


def test_a_folder_given_as_sqlite_is_named_with_a_file_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "somedir"
    folder.mkdir()
    with pytest.raises(TrackingError) as refused:
        resolve_tracking_uri(f"sqlite:///{folder}")
    assert str(refused.value) == (f"tracking.uri sqlite:///{folder} names the folder {folder}, not a SQLite file; "
                                  f"name a file in it, e.g. sqlite:///{folder}/mlflow.db")


def test_a_file_where_the_databases_folder_must_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file")
    uri = f"sqlite:///{tmp_path}/notes/runs/mlflow.db"
    with pytest.raises(TrackingError) as refused:
        resolve_tracking_uri(uri)
    assert str(refused.value) == (f"tracking.uri {uri}: {tmp_path}/notes is a file, so the folder for mlflow.db "
                                  f"cannot be made; name a file in a folder (e.g. sqlite:///{tmp_path}/mlflow.db)")


def test_what_sqlite_opens_passes(tmp_path: Path) -> None:
    database = tmp_path / "real.db"
    with sqlite3.connect(database) as connection:  # a real SQLite file, as MLflow leaves one
        connection.execute("CREATE TABLE t (x INTEGER)")
    assert database.read_bytes()[:16] == SQLITE_HEADER
    (tmp_path / "empty.db").touch()  # SQLite makes a database of an empty file
    for uri in (f"sqlite:///{database}", f"sqlite:///{tmp_path}/empty.db", f"sqlite:///{tmp_path}/new.db",
                f"sqlite:///{tmp_path}/new/sub/mlflow.db",  # MLflow makes the missing folders
                f"sqlite:///{database}?timeout=30", "sqlite://"):
        assert resolve_tracking_uri(uri) == uri
    assert not (tmp_path / "new").exists()  # checking makes nothing


@pytest.mark.parametrize(("uri", "path"), [
    ("sqlite:////abs/x.db", "/abs/x.db"), ("sqlite+pysqlite:///rel/x.db?mode=ro", "rel/x.db"), ("sqlite://", None),
    ("sqlite:///:memory:", None), ("postgresql://u@h/db", None), ("http://h:5000", None), ("mlruns", None)])
def test_the_sqlite_file_of_a_uri(uri: str, path: str | None) -> None:
    assert sqlite_file(uri) == (Path(path) if path else None)


def test_a_database_server_that_refuses_is_named_with_its_address_and_the_fix() -> None:
    with pytest.raises(TrackingError) as refused:
        check_reachable(f"postgresql://u:secret@{CLOSED}/db", timeout_s=2)
    assert str(refused.value) == (
        f"MLflow tracking store postgresql://u:***@{CLOSED}/db is unreachable: nothing accepts connections at "
        f"{CLOSED} (Connection refused). Start the database or correct the host and port in the URI (postgresql's "
        f"default port is 5432), or log to a local file: --tracking-uri sqlite:///mlflow.db")
    with pytest.raises(TrackingError, match=rf"mysql\+pymysql://u:\*\*\*@{CLOSED}/db is unreachable: nothing "
                                            rf"accepts connections at {CLOSED} \(Connection refused\)"):
        check_reachable(f"mysql+pymysql://u:pw@{CLOSED}/db", timeout_s=2)


def test_a_database_uri_without_a_port_is_tried_at_the_servers_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    tried = []

    def refuse(address, timeout):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for uri in ("postgresql+psycopg2://u@db.example/mlflow", "mysql://u@db.example/mlflow",
                "mssql+pyodbc://u@db.example/mlflow"):
        with pytest.raises(TrackingError):
            check_reachable(uri, timeout_s=1)
    assert tried == [("db.example", 5432), ("db.example", 3306), ("db.example", 1433)]
    # a local socket (no host) or several hosts: nothing to dial, MLflow's driver decides
    check_reachable("postgresql:///mlflow?host=/var/run/postgresql")
    check_reachable("postgresql://u@h1:5432,h2:5432/mlflow")
    assert len(tried) == 3


def test_a_database_server_that_listens_passes() -> None:
    with socket.socket() as server:  # a listening socket accepts the TCP handshake; no database behind it is needed
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"postgresql+psycopg2://u@127.0.0.1:{server.getsockname()[1]}/db", timeout_s=2)


def test_file_and_databricks_stores_are_left_to_mlflow(tmp_path: Path) -> None:
    for uri in (f"file://{tmp_path}/mlruns", "databricks", "databricks://profile"):
        check_reachable(uri)
    assert resolve_tracking_uri(f"file://{tmp_path}/mlruns") == f"file://{tmp_path}/mlruns"
