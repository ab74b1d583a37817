"""Health of the two local databases a run writes into: MLflow's store and Prefect's.

Both are SQLite files that outlive any one run, and both fail badly when damaged: a truncated ``mlflow.db``
breaks every run with "database disk image is malformed"; an empty one is silently recreated (the history
gone without a word); a damaged ``prefect.db`` stalls the temporary Prefect server for minutes before it
times out. The checks here look at the files before anything opens them and raise a :class:`StoreError`
whose message names the file and the ways out.

* :func:`check_mlflow_store` / :func:`remember_mlflow_store`: the project's MLflow store (default
  ``<root>/mlflow.db``; a ``sqlite:`` ``MLFLOW_TRACKING_URI`` is checked too, any other URI is not).
  A marker (``.dynaflow/stores/mlflow``) records stores seen healthy, so that one which vanishes is noticed.
* :func:`check_prefect_store` / :func:`reset_prefect_store`: ``<PREFECT_HOME>/prefect.db``.
* :func:`close_stale_runs`: MLflow runs left RUNNING by a process that was killed.

Checks open the databases read-only and run ``PRAGMA quick_check`` (about 0.1 s for a 136 MB store).
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote

from dynaflow.core.artifacts import atomic_write_bytes
from dynaflow.core.errors import DynaflowError
from dynaflow.core.tracking import EXPERIMENT, sqlite_store_path, tracking_uri

SQLITE_MAGIC = b"SQLite format 3\x00"
# Files SQLite keeps next to a database; they belong to it (a hot journal or WAL is replayed into it).
SIDECARS = ("-journal", "-wal", "-shm")
MLFLOW_MARKER = Path(".dynaflow") / "stores" / "mlflow"


class StoreError(DynaflowError):
    """A local store (MLflow's or Prefect's database) is damaged or missing; the message says what to do."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def _header_size(header: bytes) -> int | None:
    """The database size its header claims, when the header says it is valid (SQLite file format §1.3.7)."""
    if len(header) < 100:
        return None
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    return pages * page_size if pages and change_counter == valid_for else None


def _quick_check(path: Path, mode: str) -> list[str]:
    with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=5)) as db:
        return [str(row[0]) for row in db.execute("PRAGMA quick_check(5)")]


def sqlite_problem(path: Path) -> str | None:
    """What is wrong with the SQLite database at ``path`` (which exists), or None when it looks healthy.

    Opens it read-only. A hot rollback journal or WAL left by a killed writer cannot be replayed read-only;
    then it is opened read-write once, so SQLite recovers it as the next writer would (not mistaken for
    damage).
    A database locked by another process is not judged (None).
    """
    if path.is_dir():
        return "it is a directory, not a database file"
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes): whatever it held is gone"
    with path.open("rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_MAGIC):
        return "it is not a SQLite database (its first bytes are not SQLite's header)"
    claimed = _header_size(header)
    cut = ""
    if claimed and claimed > size:
        cut = f"; the file has {size:,} bytes where its header says {claimed:,}"
    try:
        try:
            result = _quick_check(path, "ro")
        except sqlite3.OperationalError as e:
            if not getattr(e, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
                raise
            result = _quick_check(path, "rw")  # a journal to replay: let SQLite recover it
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return None
        return f"SQLite cannot read it ({e}){cut}"
    except sqlite3.DatabaseError as e:
        return f"SQLite reports: {e}{cut}"
    if result != ["ok"]:
        return f"SQLite's integrity check fails: {'; '.join(result)}{cut}"
    return None


def _move_command(path: Path, suffix: str) -> str:
    """``mv`` for a database and whichever of its sidecar files exist (moved alone, a stale WAL or journal
    would be replayed into the new database)."""
    moves = [f"mv {path} {path}{suffix}"]
    for side in SIDECARS:
        extra = Path(f"{path}{side}")
        if extra.exists():
            moves.append(f"mv {extra} {path}{suffix}{side}")
    return " && ".join(moves)


def mlflow_marker(root: Path) -> Path:
    """The file listing the MLflow stores this project has seen healthy (one path a line)."""
    return Path(root) / MLFLOW_MARKER


def _remembered(root: Path) -> list[str]:
    try:
        return [line for line in mlflow_marker(root).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def check_mlflow_store(root: Path) -> None:
    """Raise :class:`StoreError` unless the project's MLflow store can be used.

    Only a SQLite store is checked: the default ``<root>/mlflow.db``, or the file of a ``sqlite:``
    ``MLFLOW_TRACKING_URI``; any other tracking URI (a server) passes unchecked. A store that exists must be a
    non-empty SQLite database passing ``PRAGMA quick_check``. A store that does not exist is fine on a first
    run, but not if :func:`remember_mlflow_store` recorded it earlier: then the history has vanished.
    Read-only, writes nothing; takes about 0.1 s for a 136 MB store.
    """
    path = sqlite_store_path(root)
    if path is None:
        return
    if not path.exists():
        if str(path) in _remembered(root):
            marker = mlflow_marker(root)
            raise StoreError(
                f"The MLflow store {path} was here before and is gone, and its run history with it.\n"
                f"Restore it (from a backup), or `rm {marker}` to start a new history, "
                "or run with --no-track.",
                path,
            )
        return
    try:
        problem = sqlite_problem(path)
    except OSError as e:
        raise StoreError(
            f"Cannot read the MLflow store {path}: {e}.\nFix its permissions, or run with --no-track.", path
        ) from e
    if problem:
        raise StoreError(
            f"The MLflow store {path} is damaged: {problem}.\n"
            "Either run with --no-track (nothing is recorded in MLflow), or move it aside to start a new "
            f"history:\n    {_move_command(path, '.broken')}\n"
            "Artifacts already logged stay where they are (mlartifacts/); the new store starts with no runs.",
            path,
        )


def remember_mlflow_store(root: Path) -> Path | None:
    """Record the project's SQLite MLflow store in ``.dynaflow/stores/mlflow``, so that
    :func:`check_mlflow_store` notices if it later vanishes. Call after a successful check or run.

    Returns the store's path, or None when there is nothing to remember (not a SQLite store, or no file yet).
    Idempotent; several stores (e.g. from ``MLFLOW_TRACKING_URI``) are listed one a line.
    """
    path = sqlite_store_path(root)
    if path is None or not path.is_file():
        return None
    known = _remembered(root)
    if str(path) not in known:
        marker = mlflow_marker(root)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(marker, "".join(f"{line}\n" for line in [*known, str(path)]).encode())
    return path


def prefect_db(home: Path) -> Path:
    """Prefect's local database under ``PREFECT_HOME`` (the default SQLite location)."""
    return Path(home) / "prefect.db"


def check_prefect_store(home: Path) -> None:
    """Raise :class:`StoreError` if ``<home>/prefect.db`` exists but is empty or damaged.

    ``home`` is ``PREFECT_HOME`` (``<root>/.prefect-home`` by default). A missing database is fine (Prefect
    creates it). Only meaningful when Prefect runs its own local server on that file, not with a remote
    ``PREFECT_API_URL`` or another ``PREFECT_API_DATABASE_CONNECTION_URL``. Read-only; about 0.1 s.
    """
    path = prefect_db(home)
    if not path.exists():
        return
    try:
        problem = sqlite_problem(path)
    except OSError as e:
        raise StoreError(f"Cannot read Prefect's database {path}: {e}.\nFix its permissions.", path) from e
    if problem:
        raise StoreError(
            f"Prefect's database {path} is damaged: {problem}.\n"
            "It only holds Prefect's record of past flow runs: dynaflow's outputs and whether they are up to "
            f"date do not depend on it, and Prefect's stored results ({Path(home) / 'results'}) are kept.\n"
            "Start a fresh one with `dynaflow run --reset-prefect-db` (moves it aside), or move it aside "
            f"yourself:\n    {_move_command(path, '.broken')}",
            path,
        )


def reset_prefect_store(home: Path) -> Path:
    """Move ``<home>/prefect.db`` and its ``-wal``/``-shm``/``-journal`` files aside to
    ``prefect.db.broken-<YYYYmmdd-HHMMSS>`` (same suffixes) and return the new path of the database.

    Prefect creates an empty database on its next start. ``<home>/results`` is left alone.
    Raises :class:`StoreError` if there is no ``prefect.db``. Call while no Prefect server uses the file.
    """
    path = prefect_db(home)
    if not path.exists():
        raise StoreError(f"There is no Prefect database to reset: {path} does not exist.", path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.broken-{stamp}"), 1
    while any(Path(f"{target}{side}").exists() for side in ("", *SIDECARS)):
        n += 1
        target = path.with_name(f"{path.name}.broken-{stamp}-{n}")
    path.rename(target)
    for side in SIDECARS:
        extra = Path(f"{path}{side}")
        if extra.exists():
            extra.rename(f"{target}{side}")
    return target


_RUNNING = (
    "SELECT count(*) FROM runs WHERE status = 'RUNNING' AND lifecycle_stage = 'active' "
    "AND experiment_id IN (SELECT experiment_id FROM experiments WHERE name = ?)"
)


def close_stale_runs(root: Path) -> int:
    """Mark every active run of the ``dynaflow`` experiment still RUNNING as KILLED (end time now); return
    how many.

    A run stays RUNNING when its process was killed (``kill -9``, out of memory, a lost machine) before it
    could end it. Call this **while holding the project lock**: then no dynaflow run of this project is alive,
    so every RUNNING run is stale and none that is live can be touched. Children of a killed pipeline run are
    closed too.

    Only a SQLite store is handled (the default ``<root>/mlflow.db``, or a ``sqlite:``
    ``MLFLOW_TRACKING_URI``); with a tracking server, runs of other machines may be live and the lock cannot
    vouch for them, so nothing is done (0). A SQLite store shared by several projects is assumed to be this
    project's alone.
    Run :func:`check_mlflow_store` first: a damaged store raises here.

    Cheap when nothing is stale: no store file means 0 without importing MLflow, and a plain read-only SQLite
    count (a few ms) decides whether MLflow is needed at all; only stale runs pay for MLflow (~1.5 s).
    """
    path = sqlite_store_path(root)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return 0
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            (running,) = db.execute(_RUNNING, (EXPERIMENT,)).fetchone()
        if running == 0:
            return 0
    except sqlite3.Error:
        pass  # schema not as expected (another MLflow version): ask MLflow itself

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    stale, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        stale += [run.info.run_id for run in page]
        token = page.token
        if not token:
            break
    # Collected first, then ended: ending runs while paging would shift the pages.
    for run_id in stale:
        client.set_terminated(run_id, status="KILLED")  # end_time: now
    return len(stale)


_EXPERIMENT_LOCATION = "SELECT artifact_location FROM experiments WHERE name = ?"
# ?1 the new prefix, ?3 the old one with its slash, ?2 the length of ?3: the old prefix becomes the new one
_REPLACE_PREFIX = (
    "UPDATE {table} SET {column} = ?1 || substr({column}, ?2) WHERE substr({column}, 1, ?2) = ?3"
)
# Where MLflow's SQLite store keeps absolute artifact locations (MLflow makes every local one absolute).
_LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def relocate_mlflow_store(root: Path) -> Path | None:
    """After the project moved, point the artifact locations its MLflow store holds at the new place; return
    the old project root (None: nothing to do).

    MLflow stores local artifact locations as absolute paths, so a moved or copied project would open with
    every artifact missing. The default store (``<root>/mlflow.db``) and its artifacts
    (``<root>/mlartifacts``) move with the project; the ``dynaflow`` experiment's location says where the
    project was, and every location under that root is rewritten to the same place under this one. A store
    named by ``MLFLOW_TRACKING_URI`` is the user's, not moved with the project, and is left alone. Call
    while holding the project lock.
    """
    path = Path(root).resolve() / "mlflow.db"
    if sqlite_store_path(root) != path or not path.is_file() or path.stat().st_size == 0:
        return None
    here = (path.parent / "mlartifacts").as_uri()
    old_root = "an older place"
    try:
        with closing(sqlite3.connect(path, timeout=5)) as db, db:  # one transaction: all rewritten, or none
            found = db.execute(_EXPERIMENT_LOCATION, (EXPERIMENT,)).fetchone()
            if found is None or found[0] == here or not str(found[0]).endswith("/mlartifacts"):
                return None
            old_root = str(found[0]).removesuffix("/mlartifacts")
            old_path = unquote(old_root.removeprefix("file://"))
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # file: URIs, and the plain paths MLflow keeps for its Default experiment
            prefixes = ((old_root, path.parent.as_uri()), (old_path, str(path.parent)))
            for (table, column), (old, new) in itertools.product(_LOCATIONS, prefixes):
                if table in tables:
                    db.execute(
                        _REPLACE_PREFIX.format(table=table, column=column), (new, len(old) + 1, old + "/")
                    )
    except sqlite3.Error as exc:
        raise StoreError(
            f"{path}: the project moved from {old_root}, and the MLflow artifact locations could not be "
            f"rewritten ({exc}); the MLflow UI shows the artifacts missing until they are",
            path,
        ) from None
    return Path(old_path)
