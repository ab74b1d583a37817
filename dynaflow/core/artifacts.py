"""Atomic writes and content manifests for stage outputs.

A stage builds its output directory under a temporary name and renames it into place only when it is
complete, then writes ``manifest.json`` (sha256 of every file) last. A cache (Prefect's or ours) trusts an
output only when its manifest exists, names the expected cache key and every file still hashes the same:
a half-written, deleted or edited artifact is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dynaflow.core.faults import fault_point

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only read the mask by setting a new one; between that call and the one restoring it,
    a file another thread creates (Prefect's and MLflow's threads write files) would get umask 0. Linux
    (4.7+) shows the mask in ``/proc/self/status``; elsewhere we fall back to set-and-restore.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split(":", 1)[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open``/``mkdir`` would give, unlike mkstemp's 0600/0700."""
    return mode & ~current_umask()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it only if the block succeeds.

    The temporary name ends in ``path``'s suffix, so writers that pick a format by suffix (matplotlib's
    ``savefig``) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(0o666))  # readable by whoever may read the folder (a model server)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# sha256 of files already hashed, by (path, inode, size, mtime, ctime): a plan, the keys and the checks of
# one `dynaflow run` read the same outputs several times, and `dynaflow status` or a no-change run would
# otherwise re-read every artifact. A write changes mtime and ctime and a replaced file has another inode,
# so an altered file is hashed again; but file times tick in steps of a few milliseconds, so (as git does
# for its "racy" entries) a file modified within RACY_NS of being hashed is not remembered: a second write
# in the same tick could leave every field equal. What no such cache can see (DVC's state database has the
# same limit): a change that restores the size, inode and both times, which takes a deliberate effort.
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
RACY_NS = 2_000_000_000
_STATE: DigestState | None = None  # the same, kept across processes (see remember_digests_in)


class DigestState:
    """File digests kept in a SQLite file between processes. A cache only: any error turns it off."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.lock = path, threading.Lock()
        self.db: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=10, isolation_level=None, check_same_thread=False
        )
        self._run("PRAGMA journal_mode=WAL")
        self._run("PRAGMA synchronous=NORMAL")
        # One row a path: its stat fields when it was hashed, and the digest.
        self._run("CREATE TABLE IF NOT EXISTS digest (path TEXT PRIMARY KEY, stat TEXT, sha256 TEXT)")

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if self.db is None:
            return []
        try:
            with self.lock:
                return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:  # a damaged or locked cache costs hashing time, never a run
            log.warning("file digest cache %s turned off (%s); files are hashed again", self.path, exc)
            self.db = None
            return []

    def get(self, path: str, stat: str) -> str | None:
        rows = self._run("SELECT stat, sha256 FROM digest WHERE path = ?", (path,))
        return rows[0][1] if rows and rows[0][0] == stat else None

    def put(self, path: str, stat: str, digest: str) -> None:
        self._run("INSERT OR REPLACE INTO digest (path, stat, sha256) VALUES (?, ?, ?)", (path, stat, digest))


def remember_digests_in(path: Path | None) -> None:
    """Keep file digests in ``path`` across processes (the CLI: ``.dynaflow/digests.db``); None: only in
    this process."""
    global _STATE
    _STATE = DigestState(Path(path)) if path is not None else None


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if (known := _DIGESTS.get(key)) is not None:
        return known
    stat = " ".join(map(str, key[1:]))
    if _STATE is not None and (known := _STATE.get(key[0], stat)) is not None:
        _DIGESTS[key] = known
        return known
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    if st.st_mtime_ns < time.time_ns() - RACY_NS:
        _DIGESTS[key] = h.hexdigest()
        if _STATE is not None:
            _STATE.put(key[0], stat, h.hexdigest())
    return h.hexdigest()


def _listing(out_dir: Path) -> dict[str, str]:
    return {
        p.relative_to(out_dir).as_posix(): file_digest(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(out_dir: Path, cache_key: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {"cache_key": cache_key, "files": _listing(out_dir), **(extra or {})}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_output(out_dir: Path, cache_key: str | None = None) -> str | None:
    """Why ``out_dir`` cannot be trusted, or None when it is complete and unchanged."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        return f"{out_dir}/{MANIFEST} is missing or unreadable"
    if cache_key is not None and manifest.get("cache_key") != cache_key:
        return f"{out_dir} was produced with other inputs, params or code"
    if _listing(out_dir) != manifest.get("files"):
        return f"files in {out_dir} were deleted, added or altered since they were written"
    return None


def manifest_digest(out_dir: Path) -> str:
    """One hash of a whole output directory's content, from its manifest's file hashes.

    Only the files count, not the key or run metadata in the manifest: an upstream stage re-run with the
    same result leaves its dependents' keys unchanged.
    """
    manifest = read_manifest(Path(out_dir))
    if manifest is None:
        raise FileNotFoundError(f"{out_dir}/{MANIFEST}: missing (the stage that writes it has not run)")
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def _open_up(tree: Path) -> None:
    """Give a finished output the umask's modes: mkdtemp makes 0700 and safetensors writes 0600, which
    would hide a model from a server or a colleague that reads it as another user."""
    file_mode, dir_mode = _umask_mode(0o666), _umask_mode(0o777)
    tree.chmod(dir_mode)
    for p in tree.rglob("*"):
        if not p.is_symlink():
            p.chmod(dir_mode if p.is_dir() or p.stat().st_mode & 0o111 else file_mode)  # keep executables


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        _open_up(tmp)
        fault_point(f"commit.{out_dir.name}")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What atomic_file (mkstemp) and staged_output (mkdtemp) leave behind when the process dies: a dot, the
# target's name, 8 random characters, ".tmp" and (files) the target's suffix; or the ".old" of a rename.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def sweep_leftovers(folders: list[Path]) -> list[str]:
    """Remove what a killed process left in ``folders`` (call it only while no other run can be writing:
    under the project lock). A ``.NAME.old`` whose ``NAME`` is missing is the one moment of
    :func:`staged_output` between its two renames: the old output is put back (its manifest decides
    later whether it is still usable). Returns what was done, one line each."""
    done = []
    for folder in sorted({Path(f) for f in folders}):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name.startswith(".") and name.endswith(".old") and entry.is_dir():
                target = entry.with_name(name[1:-4])
                if not target.exists():
                    os.replace(entry, target)
                    done.append(f"restored {target} (a run was killed while replacing it)")
                    continue
            elif not _LEFTOVER.match(name):
                continue
            _remove(entry)
            done.append(f"removed {entry} (left by a killed run)")
    return done


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        _make_writable(entry)
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _make_writable(tree: Path) -> None:
    """A read-only leftover (chmod by a user) cannot be emptied until its folders are writable again."""
    for p in [tree, *tree.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o700)


def unwritable(path: Path) -> Path | None:
    """The first place under ``path`` (itself, or its nearest existing parent) this process cannot write,
    so that a stage fails before it trains, not when it renames its output into place."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return probe
    if probe == path and path.is_dir():
        for p in path.rglob("*"):
            if p.is_dir() and not p.is_symlink() and not os.access(p, os.W_OK):
                return p
    return None
