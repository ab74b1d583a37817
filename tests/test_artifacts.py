"""Outputs are written atomically and trusted only while their manifest still matches."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynaflow.artifacts import check_output, staged_output, write_manifest


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
