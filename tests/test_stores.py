"""Checks of the local MLflow and Prefect stores (issue #20): damage named with a way out, not a traceback."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from dynaflow.core.errors import DynaflowError
from dynaflow.core.stores import (
    StoreError,
    check_mlflow_store,
    check_prefect_store,
    close_stale_runs,
    mlflow_marker,
    remember_mlflow_store,
    reset_prefect_store,
)
from dynaflow.core.tracking import start_run


@pytest.fixture(autouse=True)
def default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow store holding one finished run (made once: creating the schema takes ~2 s)."""
    root = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracker = start_run(root, "x")
        tracker.log_metrics({"loss": 1.0})
        tracker.end()
    return root / "mlflow.db"


@pytest.fixture
def project(tmp_path: Path, mlflow_template: Path) -> Path:
    (tmp_path / "mlflow.db").write_bytes(mlflow_template.read_bytes())
    return tmp_path


def sqlite_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE flow_run (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO flow_run (name) VALUES (?)", [(f"run-{i}" * 20,) for i in range(2000)])
    db.close()
    return path


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_healthy_mlflow_store_passes(project: Path) -> None:
    check_mlflow_store(project)


def test_first_run_without_store_passes(tmp_path: Path) -> None:
    check_mlflow_store(tmp_path)


def test_store_error_is_an_expected_error() -> None:
    assert issubclass(StoreError, DynaflowError)


def test_truncated_mlflow_store_is_named(project: Path) -> None:
    db = project / "mlflow.db"
    truncate_half(db)
    with pytest.raises(StoreError, match="damaged") as info:
        check_mlflow_store(project)
    message = str(info.value)
    assert str(db) in message
    assert "--no-track" in message
    assert f"mv {db} {db}.broken" in message
    assert info.value.path == db


def test_empty_mlflow_store_is_refused(project: Path) -> None:
    db = project / "mlflow.db"
    db.write_bytes(b"")
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\)") as info:
        check_mlflow_store(project)
    assert str(db) in str(info.value)


def test_garbage_mlflow_store_is_refused(project: Path) -> None:
    db = project / "mlflow.db"
    db.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="not a SQLite database") as info:
        check_mlflow_store(project)
    assert str(db) in str(info.value)


def test_corrupt_page_behind_a_valid_header_is_refused(project: Path) -> None:
    """Damage inside the file, not just at its end: PRAGMA quick_check must be what finds it."""
    db = project / "mlflow.db"
    data = bytearray(db.read_bytes())
    page = 4096
    data[2 * page : len(data) - page] = os.urandom(len(data) - 3 * page)
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged"):
        check_mlflow_store(project)


def test_vanished_mlflow_store_after_marker_is_refused(project: Path) -> None:
    db = project / "mlflow.db"
    assert remember_mlflow_store(project) == db
    assert mlflow_marker(project).read_text() == f"{db}\n"
    check_mlflow_store(project)  # still there: fine
    db.unlink()
    with pytest.raises(StoreError, match="was here before and is gone") as info:
        check_mlflow_store(project)
    assert str(db) in str(info.value)
    assert f"rm {mlflow_marker(project)}" in str(info.value)
    mlflow_marker(project).unlink()  # the way out the message offers
    check_mlflow_store(project)


def test_remember_is_idempotent_and_needs_a_store(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    empty = tmp_path_factory.mktemp("no-store")
    assert remember_mlflow_store(empty) is None
    assert not mlflow_marker(empty).exists()
    remember_mlflow_store(project)
    remember_mlflow_store(project)
    assert mlflow_marker(project).read_text().splitlines() == [str(project / "mlflow.db")]


def test_sqlite_uri_from_env_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere" / "store.db"
    other.parent.mkdir()
    other.write_bytes(b"")
    (tmp_path / "mlflow.db").write_bytes(b"")  # not the store in use: ignored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with pytest.raises(StoreError) as info:
        check_mlflow_store(tmp_path)
    assert str(other) in str(info.value)


def test_server_uri_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_mlflow_store(tmp_path)
    assert close_stale_runs(tmp_path) == 0


def test_hot_journal_of_a_killed_writer_is_not_damage(tmp_path: Path) -> None:
    """A writer killed mid-transaction leaves a hot journal that a read-only connection cannot replay
    (SQLITE_READONLY_ROLLBACK): that is recovered, not reported as damage."""
    import subprocess
    import sys

    db = sqlite_db(tmp_path / ".prefect-home" / "prefect.db")
    script = (
        "import os, sqlite3\n"
        f"db = sqlite3.connect({str(db)!r}); db.execute('PRAGMA cache_size=5'); db.execute('BEGIN')\n"
        "db.execute('UPDATE flow_run SET name = hex(randomblob(200))')\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    assert Path(f"{db}-journal").stat().st_size > 0
    check_prefect_store(db.parent)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT name FROM flow_run WHERE id = 1").fetchone() == ("run-0" * 20,)
    con.close()


def test_healthy_prefect_store_passes(tmp_path: Path) -> None:
    check_prefect_store(tmp_path)  # no database yet: Prefect makes one
    sqlite_db(tmp_path / "prefect.db")
    check_prefect_store(tmp_path)


def test_relative_home_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    truncate_half(sqlite_db(tmp_path / ".prefect-home" / "prefect.db"))
    with pytest.raises(StoreError, match="prefect.db"):
        check_prefect_store(Path(".prefect-home"))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_prefect_store_is_refused(tmp_path: Path, damage: str) -> None:
    db = sqlite_db(tmp_path / "prefect.db")
    if damage == "truncate":
        truncate_half(db)
    elif damage == "empty":
        db.write_bytes(b"")
    else:
        db.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as info:
        check_prefect_store(tmp_path)
    message = str(info.value)
    assert str(db) in message
    assert "--reset-prefect-db" in message
    assert ("is empty (0 bytes)" in message) == (damage == "empty")
    assert str(tmp_path / "results") in message


def test_reset_moves_the_prefect_store_aside(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "prefect.db")
    truncate_half(db)
    Path(f"{db}-wal").write_bytes(b"wal")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r").write_text("kept")
    moved = reset_prefect_store(tmp_path)
    assert moved.parent == tmp_path and moved.name.startswith("prefect.db.broken-")
    assert not db.exists() and not Path(f"{db}-wal").exists()
    assert Path(f"{moved}-wal").read_bytes() == b"wal"
    assert (tmp_path / "results" / "r").read_text() == "kept"
    check_prefect_store(tmp_path)  # nothing left to object to
    sqlite_db(db).write_bytes(b"")
    again = reset_prefect_store(tmp_path)  # a second reset in the same second does not overwrite the first
    assert again != moved and moved.exists() and again.exists()
    with pytest.raises(StoreError):
        reset_prefect_store(tmp_path)


def test_close_stale_runs_kills_running_runs_once(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert close_stale_runs(project) == 0  # only a finished run so far
    stale = start_run(project, "killed -9")  # never ended, as if its process had died
    assert close_stale_runs(project) == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    info = client.get_run(stale.run_id).info
    assert info.status == "KILLED"
    assert info.end_time is not None and info.end_time >= info.start_time
    assert close_stale_runs(project) == 0


def test_close_stale_runs_without_store_is_zero(tmp_path: Path) -> None:
    assert close_stale_runs(tmp_path) == 0
    assert not (tmp_path / "mlflow.db").exists()


def test_a_moved_project_finds_its_mlflow_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from dynaflow.core.stores import relocate_mlflow_store
    from dynaflow.core.tracking import EXPERIMENT, tracking_uri

    before, after = tmp_path / "before", tmp_path / "moved here"  # a space: URIs quote it, paths do not
    before.mkdir()
    (before / "curve.json").write_text("[]")
    tracker = start_run(before, "x")
    tracker.log_artifact(before / "curve.json")
    tracker.end()
    assert relocate_mlflow_store(before) is None  # not moved: nothing to do
    before.rename(after)

    assert relocate_mlflow_store(after) == before
    client = MlflowClient(tracking_uri=tracking_uri(after))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (after / "mlartifacts").as_uri()
    run = client.get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((after / "mlartifacts").as_uri() + "/")
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["curve.json"]
    assert relocate_mlflow_store(after) is None  # done once

    # a store the user named is theirs: it did not move with the project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{after / 'mlflow.db'}")
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert relocate_mlflow_store(other) is None
