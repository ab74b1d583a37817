"""Outputs are written atomically and trusted only while their manifest still matches."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from dynaflow.core import artifacts
from dynaflow.core.artifacts import atomic_write_json, check_output, staged_output, write_manifest


def build(out: Path, text: str, key: str = "k1") -> None:
    with staged_output(out) as tmp:
        (tmp / "model.bin").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")
        write_manifest(tmp, key)


def test_manifest_detects_changes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(out, "weights")
    assert check_output(out, "k1") is None
    assert "other inputs" in check_output(out, "k2")
    (out / "model.bin").write_text("tampered")
    assert "altered" in check_output(out, "k1")
    build(out, "weights")
    (out / "sub" / "a.json").unlink()
    assert "deleted" in check_output(out, "k1")
    (out / "manifest.json").unlink()
    assert "missing" in check_output(out, "k1")


def test_failed_build_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(out, "v1")
    with pytest.raises(RuntimeError), staged_output(out) as tmp:
        (tmp / "model.bin").write_text("half")
        raise RuntimeError("killed")
    assert (out / "model.bin").read_text() == "v1" and check_output(out, "k1") is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_modes_not_the_temp_files_private_ones(
    tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        with staged_output(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            (tmp / "model.safetensors").chmod(0o600)  # what safetensors' writer leaves
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
            (tmp / "sub").mkdir(mode=0o700)
            atomic_write_json(tmp / "sub" / "metrics.json", {"acc": 1.0})
        atomic_write_json(tmp_path / "loose.json", {})
    finally:
        os.umask(old)
    mode = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert mode == {
        "out": 0o777 & ~umask,
        "out/model.safetensors": 0o666 & ~umask,
        "out/run.sh": 0o777 & ~umask,  # execute bits kept
        "out/sub": 0o777 & ~umask,
        "out/sub/metrics.json": 0o666 & ~umask,
        "loose.json": 0o666 & ~umask,
    }


def _never_called(mask: int) -> int:
    raise AssertionError("os.umask called: the read is not thread-safe")


@pytest.mark.parametrize("proc_status", ["linux", "absent"])
def test_current_umask_reads_the_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_status: str
) -> None:
    old = os.umask(0o027)
    try:
        with monkeypatch.context() as patch:
            if proc_status == "absent":  # another OS: the set-and-restore fallback
                patch.setattr(artifacts, "_PROC_STATUS", tmp_path / "no-such-file")
            elif artifacts._PROC_STATUS.exists():
                patch.setattr(os, "umask", _never_called)  # Linux: read from /proc, never set
            else:
                pytest.skip("no /proc/self/status on this OS")
            assert artifacts.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # and the mask is still the one set
    finally:
        os.umask(old)


def test_remembered_digests_notice_every_change(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"a" * 64)
    first = artifacts.file_digest(path)
    path.write_bytes(b"b" * 64)  # same size, maybe the same clock tick: a fresh file is not remembered
    assert artifacts.file_digest(path) != first

    os.utime(path, ns=(10**18, 10**18))  # an old file (2001): its digest is remembered ...
    assert artifacts.file_digest(path) == hashlib.sha256(b"b" * 64).hexdigest()
    assert any(key[0] == str(path) for key in artifacts._DIGESTS)
    path.write_bytes(b"c" * 64)  # ... until a write, same size, moves its times
    assert artifacts.file_digest(path) == hashlib.sha256(b"c" * 64).hexdigest()
    replaced = tmp_path / "new.bin"
    replaced.write_bytes(b"d" * 64)
    os.utime(replaced, ns=(10**18, 10**18))  # same times as before, but another inode
    os.replace(replaced, path)
    assert artifacts.file_digest(path) == hashlib.sha256(b"d" * 64).hexdigest()


def test_digests_kept_across_processes_still_see_every_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def aged(path: Path, content: bytes) -> Path:
        """Written, then dated an hour back: out of the racy window, so its digest may be kept."""
        path.write_bytes(content)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        return path

    db = tmp_path / "digests.db"
    model = aged(tmp_path / "model.bin", b"weights v1")
    artifacts.remember_digests_in(db)
    first = artifacts.file_digest(model)
    artifacts._DIGESTS.clear()  # a new process: only the file on disk remembers
    artifacts.remember_digests_in(db)
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(artifacts.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    try:
        assert artifacts.file_digest(model) == first and not hashed  # served from the state file
        with open(model, "ab") as fh:  # edited in place (same inode)
            fh.write(b"!")
        assert artifacts.file_digest(model) != first
        edited = artifacts.file_digest(aged(model, b"weights v1"))  # same content, times moved back
        assert edited == first
        replacement = aged(tmp_path / "other.bin", b"weights v2")  # same size, another inode
        os.replace(replacement, model)
        os.utime(model, (time.time() - 3600, time.time() - 3600))
        assert artifacts.file_digest(model) == real_sha256(b"weights v2").hexdigest()
        with open(model, "r+b") as fh:  # truncated
            fh.truncate(3)
        assert artifacts.file_digest(model) == real_sha256(b"wei").hexdigest()
        db.write_bytes(b"not a database")  # a damaged cache: files are hashed again, nothing fails
        artifacts._DIGESTS.clear()
        artifacts.remember_digests_in(db)
        assert artifacts.file_digest(model) == real_sha256(b"wei").hexdigest()
    finally:
        artifacts.remember_digests_in(None)
