"""Scale-out: the same app as N Ray Serve replicas on one machine, each with its own engine."""

from __future__ import annotations

import socket
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from dynaflow.config import ServeConfig
from dynaflow.serving.build import build_app, build_engine
from tests.test_serve_http import model_dirs  # noqa: F401 (fixture)

pytest.importorskip("ray.serve", reason="Ray Serve is in the test extra; pip install 'dynaflow[ray]'")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_each_answer_with_their_own_scheduler(
    model_dirs: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    from dynaflow.serving.replicas import replicated, run_replicated, shutdown

    model_dir, data_dir = model_dirs
    cfg, cache = ServeConfig(runtime="torch", replicas=2), tmp_path / "cache"
    profile = build_engine(
        model_dir, data_dir, cfg, cache
    ).profile  # measured once, before the replicas start
    profile_file = next(cache.glob("*/profile-torch-t1.json"))
    measured_at = profile_file.stat().st_mtime_ns
    port = free_port()
    app = replicated(partial(build_app, model_dir, data_dir, cfg, cache), 2, 0.5, cfg.max_queue)
    run_replicated(app, "127.0.0.1", port, cpus=2, blocking=False)
    try:
        url = f"http://127.0.0.1:{port}"
        answers = [httpx.post(f"{url}/predict", json={"text": "a good film"}, timeout=30) for _ in range(4)]
        assert all(r.status_code == 200 and r.json()["label"] in ("negative", "positive") for r in answers), [
            r.text for r in answers
        ]
        bad = httpx.post(f"{url}/predict", json={"text": ""}, timeout=30)
        assert bad.status_code == 422 and "empty text" in bad.json()["detail"]
        replicas = set()
        deadline = time.time() + 60
        while len(replicas) < 2 and time.time() < deadline:
            replicas.add(httpx.get(f"{url}/healthz", timeout=30).json()["replica"])
        assert len(replicas) == 2
        assert profile_file.stat().st_mtime_ns == measured_at  # the replicas reused it
        assert httpx.get(f"{url}/healthz", timeout=30).json()["front"] == [s.name for s in profile.front()]
    finally:
        shutdown()
