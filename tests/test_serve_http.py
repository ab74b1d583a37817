"""``dynaflow serve`` over real HTTP on 127.0.0.1: answers, batching, bad requests, overload, /metrics; and
the engine built from a (tiny) trained model folder with both actuators."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynaflow.config import ServeConfig
from dynaflow.serving.actuators import ElasticActuator, OrtActuator
from dynaflow.serving.app import MAX_TEXTS, Engine, ServeSettings, create_app
from dynaflow.serving.build import build_engine, grid_scores
from dynaflow.serving.policy import make_policy
from dynaflow.serving.profile import ServingProfile, SubnetProfile
from tests.conftest import tiny_elastic

SUBNETS = (
    SubnetProfile("w1.0_d1.0", 1.0, 1.0, 0.8, 0.02, 0.0),
    SubnetProfile("w0.5_d0.5", 0.5, 0.5, 0.7, 0.01, 0.0),
)
PROFILE = ServingProfile(SUBNETS, "accuracy", "fake", 1)


class SlowActuator:
    """Takes ``delay`` seconds a batch; class 1 for texts of odd token count (so answers can be checked)."""

    runtime, vocab_size = "fake", 100

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, []

    def __call__(self, subnet: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.calls.append((subnet, inputs["input_ids"].shape))
        time.sleep(self.delay)
        odd = inputs["attention_mask"].sum(axis=1) % 2
        return np.stack([1 - odd, odd], axis=1).astype(np.float32) * 3


@pytest.fixture
def tokenizer(tiny_backbone: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_backbone)


@contextmanager
def serve(engine: Engine) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


def engine_with(tokenizer, delay: float = 0.02, **settings: object) -> Engine:
    s = ServeSettings(**{"slo": 0.5, "max_length": 16, "labels": ("negative", "positive"), **settings})
    return Engine(SlowActuator(delay), tokenizer, PROFILE, make_policy("slo", PROFILE, s.slo, s.max_batch), s)


@pytest.fixture
def url(tokenizer) -> Iterator[str]:
    with serve(engine_with(tokenizer)) as address:
        yield address


def test_predict_answers_with_label_subnet_and_timings(url: str, tokenizer) -> None:
    r = httpx.post(f"{url}/predict", json={"text": "good movie"})
    assert r.status_code == 200, r.text
    body = r.json()
    n_tokens = len(tokenizer("good movie")["input_ids"])
    assert body["label_id"] == n_tokens % 2 and body["label"] == ("negative", "positive")[n_tokens % 2]
    assert body["subnet"] == "w1.0_d1.0" and body["batch_size"] == 1
    assert body["compute_ms"] >= 20 and body["queue_ms"] >= 0 and 0.5 < body["score"] <= 1
    many = httpx.post(f"{url}/predict", json={"text": ["good", "a bad film", "fun"]}).json()["predictions"]
    assert [p["label_id"] for p in many] == [
        len(tokenizer(t)["input_ids"]) % 2 for t in ("good", "a bad film", "fun")
    ]
    health = httpx.get(f"{url}/healthz").json()
    assert (
        health["status"] == "ok"
        and health["policy"] == "slo"
        and health["front"] == ["w1.0_d1.0", "w0.5_d0.5"]
    )


def test_concurrent_requests_are_batched_and_their_answers_timed(tokenizer) -> None:
    engine = engine_with(tokenizer)
    with serve(engine) as url:

        async def burst() -> list[dict]:
            async with httpx.AsyncClient() as client:
                posts = (client.post(f"{url}/predict", json={"text": "fun"}) for _ in range(16))
                return [r.json() for r in await asyncio.gather(*posts)]

        answers = asyncio.run(burst())
    assert all("subnet" in a and "_batch" not in a for a in answers)
    assert max(a["batch_size"] for a in answers) > 1  # 16 arrive while the first batch takes 20 ms
    # Every batch's answers were seen leaving: the policy knows what answering costs.
    assert engine.answered == {} and engine.policy.answers.fit()[0] > 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 422, "field 'text' is required"),
        ({"text": "  "}, 422, "field 'text': empty text"),
        ({"text": ["good", ""]}, 422, "field 'text[1]': empty text"),
        ({"txt": "good"}, 422, "field 'txt' is not allowed"),
        ({"text": 3}, 422, "field 'text'"),
        ({"text": "good", "text_pair": "bad"}, 422, "takes single sentences"),
        ({"text": "good " * 40}, 422, "tokens; this model takes at most 16"),
        ({"text": ["good"] * (MAX_TEXTS + 1)}, 413, f"at most {MAX_TEXTS}"),
        ({"text": []}, 422, "the list is empty"),
        ({"text": "good " * 5000}, 413, "field 'text': 25000 characters; at most 10000"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(url: str, body: dict, status: int, message: str) -> None:
    r = httpx.post(f"{url}/predict", json=body)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_malformed_json_is_a_422(url: str) -> None:
    r = httpx.post(f"{url}/predict", content=b'{"text": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


class FailingActuator(SlowActuator):
    """Fails every batch holding a text of exactly 4 tokens ([CLS] bad film [SEP])."""

    def __call__(self, subnet: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if (inputs["attention_mask"].sum(axis=1) == 4).any():
            raise RuntimeError("boom")
        return super().__call__(subnet, inputs)


def test_a_failing_batch_is_a_500_naming_it_and_the_server_keeps_serving(tokenizer) -> None:
    s = ServeSettings(slo=0.5, max_length=16, labels=("negative", "positive"))
    engine = Engine(FailingActuator(0.0), tokenizer, PROFILE, make_policy("slo", PROFILE, 0.5, 32), s)
    with serve(engine) as url:
        bad = httpx.post(f"{url}/predict", json={"text": "bad film"})
        assert (
            bad.status_code == 500 and bad.json()["detail"] == "inference failed: sub-network w1.0_d1.0: boom"
        )
        assert httpx.post(f"{url}/predict", json={"text": "good"}).status_code == 200
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_a_request_that_does_not_fit_the_queue_is_refused_whole(tokenizer) -> None:
    engine = engine_with(tokenizer, delay=0.2, max_queue=3)
    with serve(engine) as url:

        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                first = asyncio.create_task(client.post(f"{url}/predict", json={"text": ["good", "fun"]}))
                await asyncio.sleep(0.05)  # the first two run; a request of four texts cannot fit 3 - 0
                second = await client.post(f"{url}/predict", json={"text": ["a", "b", "c", "d"]})
                return [await first, second]

        first, second = asyncio.run(two())
    assert first.status_code == 200 and len(first.json()["predictions"]) == 2
    assert second.status_code == 503 and "queue is full" in second.json()["detail"]
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(engine.metrics.registry).decode())
    }
    counts = {
        s.labels["status"]: s.value
        for s in families["dynaflow_requests"].samples
        if s.name.endswith("_total")
    }
    assert (
        counts == {"ok": 2.0, "rejected": 4.0} and len(engine.scheduler) == 0
    )  # counted in texts, none left


def test_a_full_queue_answers_503_and_the_server_keeps_serving(tokenizer) -> None:
    with serve(engine_with(tokenizer, delay=0.2, max_queue=2)) as url:

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(
                    *(client.post(f"{url}/predict", json={"text": "fun"}) for _ in range(8))
                )

        codes = [r.status_code for r in asyncio.run(flood())]
        assert 503 in codes and 200 in codes
        assert httpx.post(f"{url}/predict", json={"text": "fun"}).status_code == 200


def test_late_requests_are_shed_with_503(tokenizer) -> None:
    with serve(engine_with(tokenizer, delay=0.3, slo=0.1, late="shed")) as url:

        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                first = asyncio.create_task(client.post(f"{url}/predict", json={"text": "fun"}))
                await asyncio.sleep(0.03)  # arrives while the first batch runs (300 ms): past its 100 ms SLO
                second = asyncio.create_task(client.post(f"{url}/predict", json={"text": "good"}))
                return [await first, await second]

        first, second = asyncio.run(two())
        assert first.status_code == 200
        assert second.status_code == 503 and "deadline" in second.json()["detail"]
        assert second.headers["retry-after"] == "1"


def test_metrics_parse_as_prometheus_text(url: str) -> None:
    httpx.post(f"{url}/predict", json={"text": "good"})
    httpx.post(f"{url}/predict", json={"text": ""})
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        s.labels["status"]: s.value
        for s in families["dynaflow_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests == {"ok": 1.0, "invalid": 1.0}
    served = [s for s in families["dynaflow_subnet_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels["subnet"], s.value) for s in served] == [("w1.0_d1.0", 1.0)]
    assert {"dynaflow_request_latency_seconds", "dynaflow_slo_misses", "dynaflow_queue_length",
            "dynaflow_dispatch_overhead_seconds", "dynaflow_batch_size"} <= set(families)  # fmt: skip


# -- the engine from a trained model folder -----------------------------------------------------------------


@pytest.fixture
def model_dirs(tmp_path: Path, tiny_backbone: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    model_dir, data_dir = tmp_path / "dynabert", tmp_path / "data"
    model = tiny_elastic(num_labels=2)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(model_dir)
    grid = {f"w{w}_d{d}": {"score": 0.5 + w * d / 4} for w in (1.0, 0.5) for d in (1.0, 0.5)}
    (model_dir / "grid.json").write_text(json.dumps(grid))
    data_dir.mkdir()
    meta = {"task": "sst2", "labels": ["0", "1"], "main_metric": "acc", "max_seq_length": 16}
    (data_dir / "task.json").write_text(json.dumps(meta))
    return model_dir, data_dir


def test_engine_from_a_model_folder_measures_then_reuses_its_profile(
    model_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, data_dir = model_dirs
    engine = build_engine(model_dir, data_dir, ServeConfig(runtime="torch", policy="slo"), tmp_path / "cache")
    assert isinstance(engine.actuator, ElasticActuator)
    assert {s.name for s in engine.profile.subnets} == set(grid_scores(model_dir))
    assert engine.profile.full.name == "w1.0_d1.0" and engine.settings.labels == ("negative", "positive")
    assert engine.settings.slo == pytest.approx(2 * engine.profile.full.p90_single_s)

    import dynaflow.serving.build as build

    monkeypatch.setattr(build, "measure_profile", lambda *a, **k: pytest.fail("profile measured again"))
    again = build_engine(model_dir, data_dir, ServeConfig(runtime="torch", slo_ms=40), tmp_path / "cache")
    assert again.profile == engine.profile and again.settings.slo == pytest.approx(0.04)

    with serve(again) as url:
        answer = httpx.post(f"{url}/predict", json={"text": "a good film"}).json()
        assert answer["label"] in ("negative", "positive") and answer["subnet"] in grid_scores(model_dir)


def test_onnx_actuator_matches_the_elastic_model(model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from dynaflow.models.backbone import load_elastic

    model = load_elastic(model_dirs[0]).eval()
    names = ["w1.0_d1.0", "w0.5_d0.5"]
    ort, elastic = OrtActuator(model, names, 1, tmp_path / "onnx"), ElasticActuator(model, 1)
    ids = np.array([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    inputs = {
        "input_ids": ids,
        "attention_mask": (ids > 0).astype(np.int64),
        "token_type_ids": np.zeros_like(ids),
    }
    for name in names:
        np.testing.assert_allclose(ort(name, inputs), elastic(name, inputs), atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["w0.5_d0.5.onnx", "w1.0_d1.0.onnx"]


def test_an_unknown_policy_or_a_folder_without_a_grid_is_one_clear_error(
    model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    from dynaflow.config import ConfigError
    from dynaflow.serving.build import ServeError

    model_dir, data_dir = model_dirs
    with pytest.raises(ConfigError, match="serve.policy = 'fixed:w0.3_d1.0'.*no sub-network"):
        build_engine(
            model_dir, data_dir, ServeConfig(runtime="torch", policy="fixed:w0.3_d1.0"), tmp_path / "c"
        )
    (model_dir / "grid.json").unlink()
    with pytest.raises(ServeError, match="grid.json"):
        build_engine(model_dir, data_dir, ServeConfig(runtime="torch"), tmp_path / "c")


def test_serve_and_loadtest_without_a_model_or_server_are_one_message(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_failures import assert_one_message, run_cli

    params = str(project / "params.yaml")
    code, err = run_cli(capsys, "serve", "--params", params)
    assert code == 2
    assert_one_message(err, "no trained model", "dynaflow run")
    code, err = run_cli(capsys, "serve", "--params", params, "--policy", "fastest", "--port", "99999")
    assert code == 2
    assert_one_message(err, "serve.port", "serve.policy = 'fastest': expected slo, threshold, fixed:full")
    code, err = run_cli(capsys, "loadtest", "--params", params, "--duration", "0", "--no-track")
    assert code == 2
    assert_one_message(err, "--duration must be > 0")
    code, err = run_cli(
        capsys, "loadtest", "--params", params, "--url", "http://127.0.0.1:9/predict", "--no-track"
    )
    assert code == 2
    assert_one_message(err, "no dynaflow server answers at http://127.0.0.1:9/healthz")


def test_loadtest_sends_open_loop_and_writes_its_summary(
    project: Path, tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynaflow.cli import main

    out = project / "loadtest"
    with serve(engine_with(tokenizer, delay=0.005)) as url:
        args = ["--url", f"{url}/predict", "--trace", "steady:40", "--duration", "1.5", "--out", str(out)]
        code = main(["loadtest", "--params", str(project / "params.yaml"), *args, "--no-track"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    outcomes = json.loads((out / "outcomes.json").read_text())
    assert summary["sent"] == len(outcomes) > 20 and summary["answered"] == summary["sent"]
    assert summary["policy"] == "slo" and summary["slo_ms"] == 500
    assert all(o["correct"] is not None and o["server"] > 0 for o in outcomes)  # labelled dev sentences
    assert summary["attainment"] == 1.0 and (out / "timeline.png").stat().st_size > 0
