"""One bench for every method: a method registered only here joins measurement, selection, export and the
report without any shared code changing; selection ships Theseus when only its successor fits; a profile
whose in-budget candidates are all at chance ships nothing and says why."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from dynaflow.config import MEASUREMENT_SECTION, Params, load_params
from dynaflow.core.artifacts import write_manifest
from dynaflow.core.errors import DynaflowError
from dynaflow.data.splits import TOKENIZER_DIR
from dynaflow.evaluation.candidates import Candidate
from dynaflow.evaluation.report import load_results
from stages import Layout, Stage, StageContext, flow_stages, register, run_stage, unregister
from stages.measure import measure_candidates, this_machine
from stages.select import rebuild_report
from tests.conftest import tiny_params, write_sst2

pytestmark = pytest.mark.usefixtures("single_thread", "this_machine")

CPU1 = {
    "name": "cpu1",
    "threads": 1,
    "runtime": "onnxruntime",
    "batch_size": 1,
    "seq_len": 16,
    "latency_ms": 1e4,
}


def write_project(root: Path, backbone: Path, **evaluate: Any) -> Params:
    """A project with the data stage run for real and the given ``evaluate`` settings (cpu1 only; float32
    candidates only unless ``int8=True``: these tests are about methods and budgets)."""
    glue = write_sst2(root / "glue")
    settings = {"warmup": 1, "repeats": 10, "profiles": [CPU1], "int8": False, **evaluate}
    raw = tiny_params(backbone, glue) | {"widths": [1.0, 0.5], "depths": [1.0], "evaluate": settings}
    (root / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(mode="json")))
    params = load_params(root / "params.yaml")
    run_stage("data", params, Layout(root))
    return params


def fake_output(path: Path, model: torch.nn.Module, metrics: dict[str, Any] | None = None) -> None:
    """A stage output a test stands in for (a model, its metrics.json, a manifest)."""
    model.save_pretrained(path)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(path, "test")


def tiny_classifier(vocab: int, layers: int, hidden: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


# ------------------------------------------------------------------------------------------------------------
# A method that exists only in this test: a plain BERT cut to one layer of the teacher.

METHOD = "plain"


def train_plain(ctx: StageContext) -> dict[str, Any]:
    model = BertForSequenceClassification.from_pretrained(ctx.upstream("teacher"))
    model.bert.encoder.layer = model.bert.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(ctx.out)
    shutil.copytree(ctx.upstream("data") / TOKENIZER_DIR, ctx.out, dirs_exist_ok=True)
    return {"layers": 1}


def plain_candidates(params: Params, layout: Layout) -> list[Candidate]:
    where = layout.out("plain")
    return [
        Candidate(method=METHOD, name="L1", arch={"layers": 1, "heads": 4, "intermediate": 128},
                  build=lambda: BertForSequenceClassification.from_pretrained(where).eval())
    ]  # fmt: skip


def measure_plain(ctx: StageContext) -> dict[str, Any]:
    return measure_candidates(ctx, METHOD, ctx.upstream("plain"), plain_candidates(ctx.params, ctx.layout))


@pytest.fixture
def plain_method() -> Iterator[None]:
    register(Stage("plain", "artifacts/plain", ("seed",), ("data", "teacher"), train_plain, flow=METHOD))
    register(
        Stage(
            name="plain_eval",
            out="artifacts/plain-evaluation",
            sections=(MEASUREMENT_SECTION,),
            upstream=("data", "plain"),
            run=measure_plain,
            external=this_machine,
            flow=METHOD,
            candidates=plain_candidates,
        )
    )
    yield
    unregister("plain_eval")
    unregister("plain")


def test_a_method_registered_in_a_test_is_measured_selected_exported_and_reported(
    plain_method: None, tmp_path: Path, tiny_backbone: Path
) -> None:
    from stages import code_modules

    params = write_project(tmp_path, tiny_backbone, quality_floor=False, int8=True)
    layout = Layout(tmp_path)
    assert flow_stages(METHOD) == ["data", "teacher", "plain", "plain_eval", "select"]
    assert "tests.test_methods" in code_modules("plain_eval")  # its own code is in its cache key
    for name in flow_stages(METHOD)[1:]:
        run_stage(name, params, layout)

    selection = load_results([layout.out("select")])[0]
    assert selection["methods"] == [METHOD]
    (cpu1,) = selection["profiles"]
    assert [r["candidate"] for r in cpu1["rows"]] == ["plain/L1", "plain/L1-int8"]  # int8 comes for free
    chosen = cpu1["selection"]["row"]
    assert cpu1["selection"]["status"] == "selected" and chosen.get("base", chosen["candidate"]) == "plain/L1"
    export = tmp_path / "artifacts" / "selection" / "exports" / "cpu1"
    assert BertForSequenceClassification.from_pretrained(export).config.num_hidden_layers == 1
    assert (export / "model.onnx").is_file() and not (export / "modeling_elastic_bert.py").exists()
    card = (export / "README.md").read_text()
    assert "`plain/L1` (plain)" in card and "trust_remote_code" not in card
    report, note = rebuild_report(tmp_path)
    assert "methods plain" in note and f"| **{chosen['candidate']}** ★ | plain | 1 |" in report.read_text()

    # A new teacher: the method's measurement was made from the old one, so selection leaves it out.
    from stages.registry import gathered

    assert gathered("select", params, layout) == ["plain_eval"]
    retrained = load_params(tmp_path / "params.yaml", ["teacher.learning_rate=0.002"])
    run_stage("teacher", retrained, layout)
    assert gathered("select", retrained, layout) == []
    with pytest.raises(DynaflowError, match="no up-to-date measured candidates"):
        run_stage("select", retrained, layout)


# ------------------------------------------------------------------------------------------------------------
# DynaBERT and Theseus both measured: the budget only the successor meets picks it.


@pytest.mark.usefixtures("stand_in_training")
def test_selection_ships_the_theseus_successor_when_only_it_fits(tmp_path: Path, tiny_backbone: Path) -> None:
    params = write_project(tmp_path, tiny_backbone, quality_floor=False)
    layout = Layout(tmp_path)
    vocab = BertConfig.from_pretrained(tiny_backbone).vocab_size
    fake_output(layout.out("teacher"), tiny_classifier(vocab, 2, 32), {"score": 0.5})
    # DynaBERT's model: 4 wide layers; the successor: 1 narrow layer (far faster on any machine).
    fake_output(layout.out("depth_kd"), tiny_classifier(vocab, 4, 128))
    fake_output(layout.out("theseus"), tiny_classifier(vocab, 1, 32, seed=1), {"predecessor_layers": 4})
    for name in ("evaluate", "theseus_eval", "select"):
        run_stage(name, params, layout)
    rows = {r["candidate"]: r for r in load_results([layout.out("select")])[0]["profiles"][0]["rows"]}
    assert set(rows) == {"dynabert/w1.0_d1.0", "dynabert/w0.5_d1.0", "theseus/L1"}
    successor = rows.pop("theseus/L1")["latency_p90_ms"]
    fastest_grid = min(r["latency_p90_ms"] for r in rows.values())
    assert successor < fastest_grid, (successor, fastest_grid)

    budget = (successor * fastest_grid) ** 0.5  # between the two: only the successor fits
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["evaluate"]["profiles"][0]["latency_ms"] = budget
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    from stages.registry import status

    # A budget is selection's business: the measurements stay up to date, only selection re-runs.
    assert status(["evaluate", "theseus_eval", "select"], params, layout)["evaluate"] is None
    run_stage("select", params, layout)
    (cpu1,) = load_results([layout.out("select")])[0]["profiles"]
    assert cpu1["selection"]["status"] == "selected" and cpu1["selection"]["fitting"] == 1
    assert cpu1["selection"]["row"]["candidate"] == "theseus/L1"
    export = tmp_path / "artifacts" / "selection" / "exports" / "cpu1"
    exported = json.loads((export / "export.json").read_text())
    assert exported["candidate"] == "theseus/L1" and exported["diff_onnx"] <= 1e-4
    assert BertForSequenceClassification.from_pretrained(export).config.num_hidden_layers == 1


# ------------------------------------------------------------------------------------------------------------
# The quality floor: candidates at the majority-class score are never shipped.


@pytest.mark.usefixtures("stand_in_training")
def test_nothing_is_exported_when_every_in_budget_candidate_is_at_chance(
    tmp_path: Path, tiny_backbone: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = write_project(tmp_path, tiny_backbone)  # the quality floor on, as shipped
    layout = Layout(tmp_path)
    meta = json.loads((layout.out("data") / "task.json").read_text())
    assert meta["chance"]["score"] == 0.5  # tiny SST-2 dev: half positive; train majority: class 0
    vocab = BertConfig.from_pretrained(tiny_backbone).vocab_size
    fake_output(layout.out("teacher"), tiny_classifier(vocab, 2, 32), {"score": 0.9})
    constant = tiny_classifier(vocab, 2, 32)
    with torch.no_grad():  # answers class 0 whatever the input: the majority-class score exactly
        constant.classifier.weight.zero_()
        constant.classifier.bias.copy_(torch.tensor([1.0, 0.0]))
    fake_output(layout.out("depth_kd"), constant)
    run_stage("evaluate", params, layout)
    with caplog.at_level("WARNING"):
        run_stage("select", params, layout)

    (cpu1,) = load_results([layout.out("select")])[0]["profiles"]
    assert {r["metric"] for r in cpu1["rows"]} == {0.5}
    sel = cpu1["selection"]
    assert sel["status"] == "below_quality" and sel["row"] is None and cpu1["export"] is None
    assert sel["rejected"]["candidate"] in {r["candidate"] for r in cpu1["rows"]}  # the best in budget
    assert not (tmp_path / "artifacts" / "selection" / "exports").exists()
    for text in (sel["message"], caplog.text, (layout.out("select") / "report.md").read_text()):
        assert "NOTHING EXPORTED for profile 'cpu1'" in text and sel["rejected"]["candidate"] in text
        assert "chance 0.5000 + 0.02" in text and "teacher 0.9000 - 0.1" in text
    summary = json.loads((tmp_path / "metrics" / "eval_cpu1.json").read_text())
    assert summary["selection_status"] == "below_quality" and "selected" not in summary
    assert summary["rejected_for_quality"]["candidate"] == sel["rejected"]["candidate"]
