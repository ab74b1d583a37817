"""Per-hardware evaluation: latency harness, selection, ONNX and HF export, report, skipped devices, CLI,
the per-profile Prefect deployment."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from dynaflow.config import EvaluateConfig, HardwareProfile, Params, load_params
from dynaflow.core.artifacts import write_manifest
from dynaflow.core.tracking import NullTracker
from dynaflow.evaluation import hardware
from dynaflow.evaluation.export import ExportMismatch, check_close, export_candidate, export_onnx, onnx_logits
from dynaflow.evaluation.report import load_results, plot_points
from dynaflow.evaluation.selection import pareto_front, select
from dynaflow.methods.dynabert.candidates import elastic_logits, subnetwork
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
from dynaflow.models.extract import extract_subnetwork
from tests.conftest import tiny_elastic, tiny_params, write_sst2

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, num_labels=2)  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed: int = 0) -> ElasticBertForSequenceClassification:
    return tiny_elastic(seed, **CONFIG)


def padded_batch(batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 3 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ------------------------------------------------------------------------------------------------------------
# Latency and memory harness


def test_latency_statistics_are_sane_on_a_tiny_model() -> None:
    sub = extract_subnetwork(tiny_model(), 0.5, 0.5).eval()
    run = hardware.torch_runner(sub, hardware.synthetic_inputs(CONFIG["vocab_size"], 2, 16))
    stats = hardware.measure_latency(run, warmup=2, repeats=9)
    assert stats.repeats == 9
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
    assert stats.min_ms <= stats.mean_ms <= stats.max_ms


def test_interleaved_timing_honours_warmup_and_repeats() -> None:
    calls: Counter[str] = Counter()
    runs = {k: (lambda k=k: calls.update([k])) for k in "abc"}
    stats = hardware.time_interleaved(runs, warmup=2, repeats=5)
    assert calls == {"a": 7, "b": 7, "c": 7}
    assert {k: s.repeats for k, s in stats.items()} == {"a": 5, "b": 5, "c": 5}
    with pytest.raises(ValueError, match="repeats"):
        hardware.time_interleaved(runs, warmup=0, repeats=0)

    order: list[str] = []
    runs = {k: (lambda k=k: order.append(k)) for k in "ab"}
    stats = hardware.time_interleaved(runs, warmup=1, repeats=5, block=2)
    assert {k: s.repeats for k, s in stats.items()} == {"a": 5, "b": 5}
    # warm-up a b; rounds of one untimed + 2 timed calls per model (the last round: 1 timed)
    assert "".join(order) == "ab" + "aaa" + "bbb" + "bbb" + "aaa" + "aa" + "bb"


def test_latency_statistics_of_known_samples() -> None:
    s = hardware.LatencyStats.from_seconds([i / 1000 for i in range(10, 0, -1)])  # 1..10 ms, any order
    assert (s.median_ms, s.p90_ms, s.min_ms, s.max_ms, s.mean_ms) == pytest.approx((5.5, 9.1, 1, 10, 5.5))


def test_threads_are_pinned_and_restored() -> None:
    before = torch.get_num_threads()
    with hardware.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    profile = HardwareProfile(name="x", threads="all")
    assert hardware.resolve_threads(profile) == hardware.available_cpus() >= 1


def test_peak_memory_sees_what_the_runner_holds() -> None:
    def build(mib: int):
        held = np.ones(mib * 2**18, dtype=np.float32)  # mib MiB, touched
        return lambda: float(held[::4096].sum())

    small, large = hardware.peak_memory_mb(lambda: build(1)), hardware.peak_memory_mb(lambda: build(64))
    if small is None or large is None:
        pytest.skip("peak resident memory is not measurable here (no /proc/self/clear_refs)")
    assert large - small == pytest.approx(63, abs=12)


# ------------------------------------------------------------------------------------------------------------
def test_latency_is_timed_on_dev_batches_each_padded_to_its_own_longest() -> None:
    from dynaflow.data.splits import TokenizedSplit

    lengths = [3, 7, 2, 9, 4]
    split = TokenizedSplit([np.arange(1, n + 1) for n in lengths], [np.zeros(n, np.int8) for n in lengths],
                           np.zeros(len(lengths), np.int64))  # fmt: skip
    batches = hardware.dev_batches(split, batch_size=2, count=10, seq_len=8)
    assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 8), (1, 4)]  # 9 tokens cut to seq_len 8
    assert [b["attention_mask"].sum(1).tolist() for b in batches] == [[3, 7], [2, 8], [4]]
    assert len(hardware.dev_batches(split, 2, count=2, seq_len=8)) == 2  # a seeded draw of `count` batches
    calls: list[int] = []
    run = hardware.cycling([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(4):
        run()
    assert calls == [0, 1, 2, 0]  # every candidate's n-th call runs the same batch


# Selection and Pareto front (synthetic tables)


def row(w: float, d: float, metric: float, p90: float, params: int, memory: float | None = 10.0) -> dict:
    return {"candidate": f"dynabert/w{w}_d{d}", "method": "dynabert", "metric": metric, "latency_p90_ms": p90,
            "latency_median_ms": p90 * 0.8, "params": params, "memory_mb": memory}  # fmt: skip


def point_name(r: dict) -> str:
    return r["candidate"].removeprefix("dynabert/")


TABLE = [
    row(1.0, 1.0, 0.90, 10.0, 100, 50.0),
    row(0.75, 1.0, 0.89, 7.0, 80, 40.0),
    row(0.5, 1.0, 0.89, 6.0, 60, 30.0),  # same metric as 0.75/1.0, faster: wins the tie
    row(0.5, 0.5, 0.85, 3.0, 30, 20.0),
    row(0.25, 0.5, 0.85, 3.0, 20, 15.0),  # same metric and latency as 0.5/0.5, fewer params: wins the tie
]


@pytest.mark.parametrize(
    ("latency", "memory", "expected"),
    [
        (100.0, None, "w1.0_d1.0"),
        (8.0, None, "w0.5_d1.0"),  # tie on metric -> lower latency
        (3.5, None, "w0.25_d0.5"),  # tie on metric and latency -> fewer parameters
        (None, 35.0, "w0.5_d1.0"),
        (100.0, 16.0, "w0.25_d0.5"),
    ],
)
def test_selection_picks_most_accurate_within_budget(latency, memory, expected) -> None:
    for table in (TABLE, list(reversed(TABLE)), random.Random(0).sample(TABLE, len(TABLE))):
        chosen = select(table, latency_ms=latency, memory_mb=memory, stat="p90", profile="p")
        assert chosen.status == "selected" and point_name(chosen.row) == expected, chosen.message


def test_selection_reports_when_nothing_fits() -> None:
    chosen = select(TABLE, latency_ms=1.0, stat="p90", profile="edge")
    assert chosen.status == "none_fit" and chosen.row is None
    assert "no candidate fits profile 'edge'" in chosen.message and "w0.25_d0.5" in chosen.message
    assert "3 ms" in chosen.message  # how far off the fastest one is
    chosen = select(TABLE, memory_mb=1.0, profile="tiny")
    assert chosen.status == "none_fit" and "15 MiB" in chosen.message
    assert select(TABLE, profile="any").status == "no_budget"


def test_selection_uses_the_chosen_statistic_and_unknown_memory_never_fits() -> None:
    # medians are 0.8 x p90: w0.75_d1.0 has median 5.6 ms, p90 7 ms
    assert point_name(select(TABLE, latency_ms=6.5, stat="median").row) == "w0.5_d1.0"
    assert point_name(select(TABLE, latency_ms=5.6, stat="median").row) == "w0.5_d1.0"
    assert point_name(select(TABLE, latency_ms=5.6, stat="p90").row) == "w0.25_d0.5"
    unknown = [dict(r, memory_mb=None) for r in TABLE]
    assert select(unknown, memory_mb=1e9).status == "none_fit"


def test_pareto_front() -> None:
    rows = [row(1.0, 1.0, 0.90, 10.0, 1), row(0.5, 1.0, 0.89, 6.0, 1), row(0.25, 1.0, 0.85, 3.0, 1),
            row(0.5, 0.5, 0.80, 5.0, 1), row(0.75, 1.0, 0.89, 7.0, 1)]  # fmt: skip
    assert pareto_front(rows, "p90") == [True, True, True, False, False]


# ------------------------------------------------------------------------------------------------------------
# Export


def test_onnx_logits_match_pytorch_on_an_extracted_subnetwork(tmp_path: Path) -> None:
    elastic = tiny_model()
    sub = extract_subnetwork(elastic, 0.5, 0.75).eval()
    path = export_onnx(sub, tmp_path / "model.onnx")
    assert not sub.training  # exporting does not leave the model in training mode
    for batch, seq in ((3, 12), (1, 40), (5, 7)):  # dynamic batch and sequence axes
        inputs = padded_batch(batch, seq)
        diff = check_close("onnx", onnx_logits(path, inputs), elastic_logits(elastic, 0.5, 0.75, inputs))
        assert diff <= 1e-4


def test_check_close_refuses_a_mismatch() -> None:
    with pytest.raises(ExportMismatch, match="differ"):
        check_close("x", np.zeros((2, 2)), np.full((2, 2), 1e-3))
    with pytest.raises(ExportMismatch, match="shape"):
        check_close("x", np.zeros((2, 2)), np.zeros((2, 3)))


def test_hf_export_loads_with_and_without_dynaflow_and_classifies(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    from transformers import AutoTokenizer, pipeline
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    from dynaflow.models.backbone import load_elastic

    elastic = load_elastic(tiny_backbone).eval()  # the tiny BERT with a fresh classifier
    batch = dict(tokenizer(["the movie was good", "a dull mess"], padding=True, return_tensors="pt"))
    out = tmp_path / "export"
    summary = export_candidate(
        subnetwork(elastic, 0.5, 0.5), out, tokenizer_dir=tiny_backbone, batch=batch, onnx=True,
        labels=["negative", "positive"],
        card={"metric": 0.875, "metric_name": "acc", "task": "sst2", "path": "exports/cpu1",
              "profile": HardwareProfile(name="cpu1", threads=1, runtime="onnxruntime").model_dump(),
              "latency": {"median_ms": 1.5, "p90_ms": 2.0, "repeats": 30}},
    )  # fmt: skip
    assert summary["diff_hf"] <= 1e-4 and summary["diff_onnx"] <= 1e-4
    assert {"config.json", "model.safetensors", "model.onnx", "README.md", "tokenizer.json",
            "modeling_elastic_bert.py", "export.json"} <= {p.name for p in out.iterdir()}  # fmt: skip
    card = (out / "README.md").read_text()
    for fragment in ("width 0.5, depth 0.5", "dev acc | 0.8750", "`cpu1`", "median 1.500, p90 2.000",
                     'pipeline("text-classification", model="exports/cpu1"'):  # fmt: skip
        assert fragment in card

    clf = pipeline("text-classification", model=str(out))  # dynaflow imported: no remote code
    assert clf("the movie was good")[0]["label"] in ("negative", "positive")
    # Without dynaflow, trust_remote_code=True loads the class from the copied modeling_elastic_bert.py.
    remote_cls = get_class_from_dynamic_module(
        "modeling_elastic_bert.ElasticBertForSequenceClassification", str(out)
    )
    assert remote_cls.__module__.startswith("transformers_modules")
    remote = remote_cls.from_pretrained(out)
    want = elastic_logits(elastic, 0.5, 0.5, batch)
    with torch.inference_mode():
        check_close("remote code", remote.eval()(**batch).logits.numpy(), want)


# ------------------------------------------------------------------------------------------------------------
# The stage, end to end on a tiny project


PROFILES = [
    {"name": "cpu1", "threads": 1, "runtime": "onnxruntime", "batch_size": 1, "seq_len": 16,
     "latency_ms": 1e4},
    {"name": "cpu_all", "threads": "all", "runtime": "torch", "batch_size": 4, "seq_len": 16,
     "latency_ms": 1e-6},  # nothing fits
    {"name": "gpu", "device": "cuda", "batch_size": 4, "seq_len": 16, "latency_ms": 1.0},
]  # fmt: skip


@pytest.fixture(scope="module")
def project_root(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """A project whose data, teacher and depth_kd outputs exist (random classifiers stand in for the trained).

    The quality floor is off: random models would fail it (tests/test_methods.py covers it).
    """
    from dynaflow.models.backbone import load_classifier
    from stages import data

    root = tmp_path_factory.mktemp("eval-project")
    glue = write_sst2(root / "glue")
    raw = tiny_params(tiny_backbone, glue) | {
        "widths": [1.0, 0.5], "depths": [1.0, 0.5],
        "evaluate": {"warmup": 1, "repeats": 4, "profiles": PROFILES, "quality_floor": False},
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(mode="json")))
    params = load_params(root / "params.yaml")
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    data.prepare(params.data, params.backbone, params.seed, prepared, NullTracker())
    write_manifest(prepared, "test")
    torch.manual_seed(0)
    for name in ("teacher", "dynabert"):
        load_classifier(params.backbone, 2).save_pretrained(root / "artifacts" / name)
    (root / "artifacts" / "teacher" / "metrics.json").write_text(json.dumps({"score": 0.5}))
    for name in ("teacher", "dynabert"):
        write_manifest(root / "artifacts" / name, "test")
    return root


@pytest.fixture(scope="module")
def evaluated(project_root: Path, this_machine: None, stand_in_training: None) -> Path:
    """``run_stage`` of DynaBERT's measurement and of selection; the measurement's output."""
    from stages import Layout, run_stage

    for stage in ("evaluate", "select"):
        run_stage(stage, load_params(project_root / "params.yaml"), Layout(project_root))
    return project_root / "artifacts" / "evaluation"


@pytest.fixture(scope="module")
def selected(evaluated: Path, project_root: Path) -> Path:
    return project_root / "artifacts" / "selection"


def test_stage_measures_every_grid_point_per_profile(evaluated: Path, project_root: Path) -> None:
    results = load_results([evaluated])[0]
    status = {e["profile"]["name"]: e["status"] for e in results["profiles"]}
    assert status == {"cpu1": "measured", "cpu_all": "measured", "gpu": "skipped"}
    grid = {"w1.0_d1.0", "w0.5_d1.0", "w1.0_d0.5", "w0.5_d0.5"}
    assert results["methods"] == ["dynabert"] and all(e["selection"] is None for e in results["profiles"])
    for entry in results["profiles"][:2]:
        rows = {point_name(r): r for r in entry["rows"]}
        # int8 variants on the ONNX Runtime CPU profile only
        int8 = {f"{g}-int8" for g in grid} if entry["profile"]["runtime"] == "onnxruntime" else set()
        assert set(rows) == grid | int8
        rows = {k: r for k, r in rows.items() if k in grid}
        for r in rows.values():
            assert 0 < r["latency_median_ms"] <= r["latency_p90_ms"] and r["repeats"] == 4
            assert 0 <= r["metric"] <= 1 and r["params"] > 0 and r["gflops_per_seq"] > 0 and r["file_mb"] > 0
            assert r["memory_mb"] is None or r["memory_mb"] >= 0
        assert rows["w0.5_d0.5"]["params"] < rows["w1.0_d0.5"]["params"] < rows["w1.0_d1.0"]["params"]
        # the dev metric is computed once per sub-network and shared by the profiles
        assert {k: r["metric"] for k, r in rows.items()} == {
            point_name(r): r["metric"] for r in results["profiles"][0]["rows"] if point_name(r) in grid
        }
    metrics = json.loads((project_root / "metrics" / "evaluate.json").read_text())
    assert metrics["profiles_measured"] == 2 and metrics["profiles_skipped"] == 1
    assert metrics["candidates"] == 4 and "dev.dynabert/w0.5_d0.5.acc" in metrics
    assert "dev.dynabert/w0.5_d0.5-int8.acc" in metrics
    assert "cpu1.dynabert/w0.5_d0.5-int8.latency_p90_ms" in metrics
    selection = json.loads((project_root / "metrics" / "select.json").read_text())
    assert 0 <= selection["cpu1.selected.acc"] <= 1


def test_an_int8_rows_score_is_the_quantised_models_own(
    evaluated: Path, project_root: Path, tmp_path: Path
) -> None:
    """Each int8 row: its own dev score (recomputed here from the quantised ONNX file), agreement with the
    float model, a smaller file; ``base`` names the float candidate that export builds."""
    from dynaflow.data.splits import load_split
    from dynaflow.evaluation.export import agreement, onnx_logits_fn, quantize_int8
    from dynaflow.evaluation.machine import available_cpus
    from dynaflow.evaluation.scoring import predict
    from stages import STAGES, Layout

    cpu1 = load_results([evaluated])[0]["profiles"][0]
    rows = {r["candidate"]: r for r in cpu1["rows"]}
    params, layout = load_params(project_root / "params.yaml"), Layout(project_root)
    dev = load_split(project_root / "data" / "prepared", "dev")
    for c in STAGES["evaluate"].candidates(params, layout):
        q, f = rows[c.id + "-int8"], rows[c.id]
        assert q["precision"] == "int8" and f["precision"] == "float32" and q["base"] == c.id
        assert q["int8_recipe"] == params.evaluate.int8_recipe == "vnni"
        float_onnx = export_onnx(c.build(), tmp_path / c.name / "model.onnx")
        quantised = quantize_int8(float_onnx, tmp_path / c.name / "model.int8.onnx")
        logits = {p: predict(onnx_logits_fn(p, available_cpus()), dev, 1) for p in (float_onnx, quantised)}
        own = float(np.mean(logits[quantised].argmax(1) == dev.labels))
        assert q["metric"] == pytest.approx(own, abs=1e-12) and q["metrics"]["acc"] == q["metric"]
        check = agreement(logits[quantised], logits[float_onnx])
        assert q["int8_agreement"] == pytest.approx(check["agreement"]) and q["int8_examples"] == len(dev)
        assert q["file_mb"] < f["file_mb"] and q["params"] == f["params"]


def test_int8_recipes_quantise_as_they_say(tmp_path: Path) -> None:
    """vnni: one weight scale per matrix, the full int8 range; avx2 (CPUs without VNNI): one scale per output
    channel and 7-bit weights. Both stay close to the float model."""
    import onnx
    from onnx import numpy_helper

    from dynaflow.evaluation.export import quantize_int8
    from dynaflow.evaluation.machine import has_vnni

    model = extract_subnetwork(tiny_model(), 1.0, 1.0).eval()
    float_onnx = export_onnx(model, tmp_path / "model.onnx")
    inputs = padded_batch(3, 12)
    reference = onnx_logits(float_onnx, inputs)
    weights = {}
    for recipe in ("vnni", "avx2"):
        path = quantize_int8(float_onnx, tmp_path / f"{recipe}.onnx", recipe)
        init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        # the matrices (int8; embeddings are uint8 in both recipes) and each one's scales
        matrices = {n.removesuffix("_quantized"): a.astype(int) for n, a in init.items()
                    if n.endswith("_quantized") and a.dtype == np.int8}  # fmt: skip
        assert len(matrices) >= 6 * model.config.num_hidden_layers  # q, k, v, out, FFN in and out
        scales = {init[n + "_scale"].size for n in matrices}
        weights[recipe] = (scales, max(int(np.abs(a).max()) for a in matrices.values()))
        assert check_close(recipe, onnx_logits(path, inputs), reference, atol=0.5) <= 0.5
    assert weights["vnni"] == ({1}, 127)  # one scale per matrix, the full signed 8-bit range
    assert 1 not in weights["avx2"][0] and weights["avx2"][1] <= 64  # a scale per output channel, 7 bits
    assert has_vnni({"avx2", "avx512_vnni"}) and has_vnni({"avx_vnni"})
    assert has_vnni({"avx2", "fma"}) is False and has_vnni(set()) is None


def test_absent_device_is_skipped_with_a_note(evaluated: Path, project_root: Path) -> None:
    gpu = json.loads((project_root / "metrics" / "eval_gpu.json").read_text())
    assert gpu["status"] == "skipped" and "CUDA" in gpu["note"]
    report = (evaluated / "report.md").read_text()
    assert "## Profile `gpu`" in report and "**Skipped**" in report and "no CUDA device" in report


def test_absent_hardware_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in hardware.unavailable(HardwareProfile(name="g", device="cuda"))
    assert hardware.unavailable(HardwareProfile(name="c", threads="all", runtime="onnxruntime")) is None
    many = hardware.available_cpus() + 1
    assert f"needs {many} threads" in hardware.unavailable(HardwareProfile(name="c", threads=many))
    monkeypatch.setattr(hardware, "_ort_providers", lambda: None)
    assert "onnxruntime is not installed" in hardware.unavailable(
        HardwareProfile(name="o", runtime="onnxruntime")
    )


def test_report_and_plots_have_one_point_per_grid_cell(selected: Path) -> None:
    report = (selected / "report.md").read_text()
    # the default: DynaBERT's checkpoint chosen on the data stage's held-out rows, and the report says so
    assert "dynabert: 8 held-out training rows, never trained on (dev unseen)" in report
    results = load_results([selected])[0]
    for entry in results["profiles"][:2]:
        name = entry["profile"]["name"]
        assert f"![{name}: dev acc vs latency](pareto_{name}.png)" in report
        assert (selected / f"pareto_{name}.png").stat().st_size > 5000
        points = plot_points(entry)
        assert sorted(p["candidate"] for p in points) == sorted(r["candidate"] for r in entry["rows"])
        int8 = name == "cpu1"  # ONNX Runtime on the CPU: every grid point also as int8, its own marker group
        assert len(points) == (8 if int8 else 4) and any(p["on_front"] for p in points)
        assert {p["family"] for p in points} == ({"dynabert", "dynabert int8"} if int8 else {"dynabert"})
        assert sum(p["selected"] for p in points) == (1 if entry["selection"]["row"] else 0)
    # a table row per grid point (and int8 variant) and measured profile (the selected one in bold)
    assert report.count("| dynabert/w") + report.count("| **dynabert/w") == 12
    assert "teacher: 8 held-out training rows" in report  # what chose the teacher's weights


def test_selection_exports_within_budget_only(selected: Path, project_root: Path) -> None:
    results = load_results([selected])[0]
    cpu1, cpu_all = results["profiles"][0], results["profiles"][1]
    assert cpu1["selection"]["status"] == "selected" and cpu1["export"] == "artifacts/selection/exports/cpu1"
    assert cpu_all["selection"]["status"] == "none_fit" and cpu_all["export"] is None
    assert "no candidate fits profile 'cpu_all'" in (selected / "report.md").read_text()
    export = selected / "exports" / "cpu1"
    summary = json.loads((export / "export.json").read_text())
    assert summary["diff_onnx"] <= 1e-4 and summary["diff_hf"] <= 1e-4
    card = (export / "README.md").read_text()
    chosen = cpu1["selection"]["row"]
    assert f"width {chosen['width']:g}, depth {chosen['depth']:g}" in card and "`cpu1`" in card
    assert "latency (ms per batch)" in card and "dev acc" in card
    assert not (selected / "exports" / "cpu_all").exists()
    per_profile = json.loads((project_root / "metrics" / "eval_cpu1.json").read_text())
    assert per_profile["selected"]["candidate"] == chosen["candidate"] and per_profile["candidates"] == 8
    if chosen["precision"] == "int8":  # the int8 model ships beside the float one, checked against it on dev
        assert (export / "model.int8.onnx").is_file() and (export / "model.onnx").is_file()
        assert summary["int8"]["agreement"] >= 0.95 and summary["int8"]["examples"] == 16
        assert "model.int8.onnx" in card and summary["precision"] == "int8"


def test_cli_report_merges_a_profile_measured_elsewhere(selected: Path, project_root: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    from dynaflow.cli import main

    local = load_results([selected])[0]
    remote = json.loads(json.dumps(local))
    gpu = dict(remote["profiles"][1], profile=remote["profiles"][2]["profile"], export=None)
    gpu["machine"] = dict(gpu["machine"], host="gpu-box", cuda=["Some GPU"])
    remote["profiles"] = [gpu]
    (tmp_path / "hw" / "gpu").mkdir(parents=True)
    (tmp_path / "hw" / "gpu" / "results.json").write_text(json.dumps(remote))
    out = tmp_path / "report"
    assert main(["report", "--params", str(project_root / "params.yaml"), "--results", str(selected),
                 str(tmp_path / "hw" / "gpu"), "--out", str(out)]) == 0  # fmt: skip
    report = (out / "report.md").read_text()
    assert "**Skipped**" not in report and "`gpu-box`" in report and (out / "pareto_gpu.png").is_file()
    merged = load_results([out])[0]
    assert [e["status"] for e in merged["profiles"]] == ["measured"] * 3
    assert merged["profiles"][0]["selection"] == local["profiles"][0]["selection"]  # kept: one source


@pytest.fixture(scope="module")
def theseus_evaluated(project_root: Path, this_machine: None, stand_in_training: None) -> Path:
    """The theseus_eval stage on a 1-layer plain BERT standing in for the successor of the 2-layer model."""
    from stages import Layout, run_stage

    config = BertConfig.from_pretrained(project_root / "artifacts" / "dynabert")
    teacher_layers = config.num_hidden_layers
    config.num_hidden_layers = teacher_layers // 2
    successor_dir = project_root / "artifacts" / "theseus"
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(successor_dir)
    (successor_dir / "metrics.json").write_text(json.dumps({"predecessor_layers": teacher_layers}))
    write_manifest(successor_dir, "test")
    run_stage("theseus_eval", load_params(project_root / "params.yaml"), Layout(project_root))
    return project_root / "artifacts" / "theseus-evaluation"


def test_theseus_points_join_the_selection_beside_equal_depth(
    evaluated: Path, theseus_evaluated: Path, project_root: Path, tmp_path: Path
) -> None:
    from stages import Layout, run_stage

    results = load_results([theseus_evaluated])[0]
    assert results["methods"] == ["theseus"]
    assert [e["status"] for e in results["profiles"]] == ["measured", "measured", "skipped"]
    for entry in results["profiles"][:2]:
        r, *int8 = entry["rows"]  # cpu1 (ONNX Runtime, CPU) also has the int8 variant
        assert (r["method"], r["layers"], r["depth"], r["width"]) == ("theseus", 1, 0.5, 1.0)
        assert 0 < r["latency_median_ms"] <= r["latency_p90_ms"] and r["candidate"] == "theseus/L1"
        on_ort_cpu = entry["profile"]["name"] == "cpu1"
        assert [q["candidate"] for q in int8] == (["theseus/L1-int8"] if on_ort_cpu else [])
    grid_rows = {point_name(r): r for r in load_results([evaluated])[0]["profiles"][0]["rows"]
                 if r["precision"] == "float32"}  # fmt: skip
    # a plain 1-layer BERT has the size of the DynaBERT sub-network at full width, half depth
    assert results["profiles"][0]["rows"][0]["params"] == grid_rows["w1.0_d0.5"]["params"]
    assert results["profiles"][0]["rows"][0]["gflops_per_seq"] == grid_rows["w1.0_d0.5"]["gflops_per_seq"]

    # Selection gathers every fresh measurement: both methods' candidates on one front per profile.
    run_stage("select", load_params(project_root / "params.yaml"), Layout(project_root))
    merged = load_results([project_root / "artifacts" / "selection"])[0]
    assert merged["methods"] == ["dynabert", "theseus"]
    text = (project_root / "artifacts" / "selection" / "report.md").read_text()
    for entry in merged["profiles"][:2]:
        names = [*(f"dynabert/{n}" for n in grid_rows), "theseus/L1"]
        names += [f"{n}-int8" for n in names] if entry["profile"]["name"] == "cpu1" else []
        assert sorted(r["candidate"] for r in entry["rows"]) == sorted(names)
    assert text.count("| theseus/L1 | 1 | theseus | ") == 2  # the equal-depth table, once per profile
    assert text.count("| dynabert/w1.0_d0.5 | 1 | dynabert | ") == 2
    assert "| dynabert/w1.0_d1.0 | 2 |" not in text  # only equal depths side by side


def test_merged_report_is_rebuilt_only_when_results_or_files_change(
    evaluated: Path, theseus_evaluated: Path, project_root: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from stages import select as select_stage
    from stages.select import rebuild_report

    renders: list[Path] = []
    real_write = select_stage.write_report
    monkeypatch.setattr(select_stage, "write_report", lambda r, o: renders.append(o) or real_write(r, o))
    out = tmp_path / "report"
    rebuild_report(project_root, [evaluated], out)
    built = out.joinpath("report.md").read_text()
    _, note = rebuild_report(project_root, [evaluated], out)
    assert len(renders) == 1 and note.endswith("(unchanged, not rebuilt)")
    assert out.joinpath("report.md").read_text() == built

    plot = next(out.glob("pareto_*.png"))
    plot.unlink()  # a lost file: the report is no longer what its manifest says
    _, note = rebuild_report(project_root, [evaluated], out)
    assert len(renders) == 2 and plot.is_file() and "not rebuilt" not in note

    _, note = rebuild_report(project_root, [evaluated, theseus_evaluated], out)  # new results to merge
    assert len(renders) == 3 and "methods dynabert, theseus" in note
    assert "theseus/L1" in out.joinpath("report.md").read_text()
    assert not list(out.glob(".*.tmp*"))  # every file was written under a temporary name, then renamed


def test_report_warns_about_a_busy_machine(evaluated: Path, tmp_path: Path) -> None:
    from dynaflow.evaluation.report import write_report

    results = load_results([evaluated])[0]
    assert all("foreign_load_cores" in e for e in results["profiles"] if e["status"] == "measured")
    results["profiles"][0]["foreign_load_cores"] = 1.5
    results["profiles"][1]["foreign_load_cores"] = 0.0
    report = write_report(results, tmp_path).read_text()
    assert report.count("**Warning:** other processes kept") == 1 and "1.50 cores" in report
    with hardware.ForeignLoad() as load:
        sum(range(10_000))
    assert load.cores is None or load.cores >= 0


def test_cli_export_any_grid_point(project_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dynaflow.cli import main

    params = str(project_root / "params.yaml")
    out = tmp_path / "w0.5_d1.0"
    assert (
        main(["export", "--params", params, "--width", "0.5", "--depth", "1.0", "--onnx", "--out", str(out)])
        == 0
    )
    assert {"model.onnx", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "width 0.5, depth 1" in card
    assert "exported w0.5_d1.0" in capsys.readouterr().out
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(snippets) == 2  # transformers' pipeline and ONNX Runtime
    for code in snippets:  # each runs as written (no prompt for remote code, the right paths)
        exec(compile(code, "model card", "exec"), {})
    assert "'label'" in capsys.readouterr().out  # the pipeline snippet printed its prediction
    int8 = tmp_path / "int8"  # --int8: the quantised model beside the float one, checked on dev
    argv = ["export", "--params", params, "--width", "0.5", "--depth", "1.0", "--int8", "--out", str(int8)]
    assert main(argv) == 0
    assert {"model.onnx", "model.int8.onnx"} <= {p.name for p in int8.iterdir()}
    assert "int8 agrees on" in capsys.readouterr().out
    assert json.loads((int8 / "export.json").read_text())["int8"]["examples"] == 16
    assert main(["export", "--params", params, "--width", "1.5", "--depth", "1.0"]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_one_profile_flow_writes_its_own_results(project_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from flows.evaluate import evaluate_profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = evaluate_profile.fn(profile="cpu1", params_path=str(project_root / "params.yaml"), track=False)
    out = Path(result["out"])
    assert out == project_root / "artifacts" / "evaluation-hw" / "cpu1"
    entries = load_results([out])[0]["profiles"]
    assert [e["profile"]["name"] for e in entries] == ["cpu1"] and entries[0]["status"] == "measured"
    assert (out / "exports" / "cpu1" / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert entries[0]["selection"]["status"] == "selected"  # every method's candidates, selected here
    from dynaflow.config import ConfigError

    with pytest.raises(ConfigError, match="no hardware profile 'tpu'"):
        evaluate_profile.fn(profile="tpu", params_path=str(project_root / "params.yaml"), track=False)


# ------------------------------------------------------------------------------------------------------------
# Config and the Prefect deployment


def test_repository_defaults_match_params_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert load_params(ROOT / "params.yaml").evaluate == EvaluateConfig()
    names = [p.name for p in EvaluateConfig().profiles]
    assert "cpu" in {p.device for p in EvaluateConfig().profiles} and len(names) == len(set(names))


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        ({"name": "a", "threads": "four"}, "threads must be a positive integer or 'all'"),
        ({"name": "a", "threads": 0}, "threads must be a positive integer"),
        ({"name": "a", "device": "tpu"}, "evaluate.profiles.0.device = 'tpu'"),
        ({"name": "a", "runtime": "tensorrt"}, "evaluate.profiles.0.runtime"),
        ({"name": "a", "latency_ms": -1}, "evaluate.profiles.0.latency_ms = -1"),
        ({"name": "a/b"}, "evaluate.profiles.0.name"),
        ({"name": "a", "gpu": 1}, "unknown key (allowed here: name, device, threads, runtime"),
    ],
)
def test_profile_validation_names_key_and_value(tmp_path: Path, profile: dict, fragment: str) -> None:
    from dynaflow.config import ConfigError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"profiles": [profile]}}))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert fragment in str(info.value)


def test_duplicate_profile_names_are_rejected(tmp_path: Path) -> None:
    from dynaflow.config import ConfigError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"profiles": [{"name": "a"}, {"name": "a"}]}}))
    with pytest.raises(ConfigError, match="repeated: a"):
        load_params(path)


def test_prefect_yaml_deploys_the_one_profile_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.delenv("GLUE_DIR", raising=False)
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    try:  # Prefect's own schema for prefect.yaml (a private module; skip the check if it moves)
        from prefect.cli.deploy._models import PrefectYamlModel

        assert len(PrefectYamlModel.model_validate(raw).deployments) == len(raw["deployments"])
    except ImportError:
        pass
    assert raw["pull"] == [{"prefect.deployments.steps.set_working_directory":
                            {"directory": "{{ $DYNAFLOW_PROJECT }}"}}]  # fmt: skip
    profiles = {p.name: p for p in load_params(ROOT / "params.yaml").evaluate.profiles}
    deployed = {}
    monkeypatch.syspath_prepend(str(ROOT))
    for d in raw["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        assert (ROOT / path).is_file()
        flow_ = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert flow_.name == "dynaflow-evaluate"
        flow_.validate_parameters(d["parameters"])  # raises on a missing or unknown parameter
        profile = profiles[d["parameters"]["profile"]]
        assert d["work_pool"]["name"] == ("dynaflow-gpu" if profile.device == "cuda" else "dynaflow-cpu")
        deployed[profile.name] = d["name"]
    assert set(deployed) == set(profiles)  # one deployment per profile


@pytest.mark.slow
def test_a_process_worker_runs_the_profile_deployment_from_prefect_yaml(
    project_root: Path, tmp_path: Path
) -> None:
    """prefect.yaml as a user deploys it: a process pool, `prefect deploy --all`, a worker, a flow run."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    bin_dir = Path(sys.executable).parent

    def prefect(*args: str, timeout: int = 300) -> str:
        done = subprocess.run([str(bin_dir / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    with prefect_test_harness(server_startup_timeout=90):
        env = {
            **os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "DYNAFLOW_PROJECT": str(ROOT),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }  # fmt: skip
        for pool in ("dynaflow-cpu", "dynaflow-gpu"):  # as prefect.yaml's comments say (deploy needs both)
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("deploy", "--all", timeout=600)
        out = project_root / "artifacts" / "evaluation-hw" / "cpu_all"
        scheduled = run_deployment(
            "dynaflow-evaluate/evaluate-cpu_all", timeout=0,
            parameters={"params_path": str(project_root / "params.yaml"), "track": False},
        )  # fmt: skip
        assert not out.exists()
        prefect("worker", "start", "--pool", "dynaflow-cpu", "--run-once", timeout=600)
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(scheduled.id).state
        assert state is not None and state.is_completed(), state
    entries = load_results([out])[0]["profiles"]
    assert [(e["profile"]["name"], e["status"]) for e in entries] == [("cpu_all", "measured")]
    assert sum(r["method"] == "dynabert" for r in entries[0]["rows"]) == 4
    assert (out / "manifest.json").is_file()


def test_plot_labels_do_not_collide() -> None:
    import matplotlib.pyplot as plt

    from dynaflow.evaluation.report import place_labels

    # Four sub-networks almost on top of each other (as 0.25/0.5 and 0.25/0.75 were on cpu1).
    points = [{"label": f"0.25/{d}", "latency_ms": 2.0 + i * 0.01, "metric": 0.80 + i * 0.001, "family": "m"}
              for i, d in enumerate((0.5, 0.75, 1.0, 0.6))]  # fmt: skip
    fig, ax = plt.subplots()
    ax.scatter([p["latency_ms"] for p in points], [p["metric"] for p in points])
    ax.set_xlim(0, 10)
    ax.set_ylim(0.5, 0.9)
    boxes = place_labels(ax, points, {"m": "C0"})
    plt.close(fig)
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_an_exported_candidate_is_an_mlflow_model_that_scores_texts(
    project_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from dynaflow.cli import main
    from dynaflow.core.tracking import start_run
    from dynaflow.evaluation.mlflow_model import log_exported_model

    out = tmp_path / "export"
    params = str(project_root / "params.yaml")
    assert main(["export", "--params", params, "--width", "0.5", "--depth", "0.5", "--out", str(out)]) == 0
    store = tmp_path / "mlruns-project"
    store.mkdir()
    tracker = start_run(store, "select")
    uri = log_exported_model(tracker, out, "cpu1")
    tracker.end()
    assert uri is not None
    model = mlflow.pyfunc.load_model(uri)
    scored = model.predict(pd.DataFrame({"text": ["a charming and funny film", "a dull mess"]}))
    assert list(scored.columns) == ["label", "score"] and len(scored) == 2
    assert model.metadata.get_input_schema().input_names() == ["text"]  # signature from the example
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert int(mlflow.register_model(uri, "dynaflow-cpu1").version) == 1  # the registry takes it


def test_an_int8_variant_that_strays_from_its_float_model_is_not_shipped(
    evaluated: Path, project_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Selection passes over an int8 row below evaluate.int8_min_agreement (its export check would fail)."""
    from dynaflow.evaluation.report import merge_results
    from stages import Layout
    from stages.select import CandidateIndex, select_and_export

    params = load_params(project_root / "params.yaml")
    merged = merge_results(load_results([evaluated]))
    for r in merged["profiles"][0]["rows"]:  # cpu1: every int8 variant now strays, and is the faster one
        if r["precision"] == "int8":
            r["int8_agreement"], r["metric"] = 0.5, 1.0
    find = CandidateIndex(params, Layout(project_root), {"dynabert": "evaluate"})
    out = select_and_export(merged, params, Layout(project_root), tmp_path, Path("exports"), find)
    chosen = out["profiles"][0]["selection"]["row"]
    assert chosen["precision"] == "float32" and (tmp_path / "exports" / "cpu1" / "model.onnx").is_file()
    assert not (tmp_path / "exports" / "cpu1" / "model.int8.onnx").exists()
    assert "below evaluate.int8_min_agreement" in caplog.text
