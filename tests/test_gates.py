"""Token gates and PoWER-BERT: open gates change nothing, 0/1 gates drop exactly what the soft form ignores,
[CLS] and padding are handled, the regulariser pushes gates apart, exports reload, and both stages run
through the shared harness and selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from dynaflow.config import load_params
from dynaflow.evaluation.export import export_onnx, onnx_logits
from dynaflow.methods.gates.budget import token_budget
from dynaflow.methods.gates.candidates import mark_remote, remote_code
from dynaflow.methods.gates.modeling_gated_bert import (
    GatedBertForSequenceClassification,
    gated_copy,
    gated_flops,
    kept_lengths,
)
from dynaflow.methods.gates.regularizers import bimodal_term, mass_term, prefix_gates, retention
from dynaflow.models.elastic_bert import ElasticBertConfig, ElasticBertForSequenceClassification
from dynaflow.models.extract import extract_subnetwork, subnetwork_flops
from stages import Layout, flow_stages, run_stage
from tests.conftest import tiny_elastic

LAYERS, POSITIONS = 3, 40


@pytest.fixture(scope="module")
def source() -> ElasticBertForSequenceClassification:
    config = ElasticBertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=POSITIONS, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ElasticBertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits of a trained model's size, not the init's
        model.classifier.weight.normal_(0, 1.0)
    return model


def padded(n: int = 4, length: int = 14, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def random_binary_gates(model: GatedBertForSequenceClassification, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.gates.copy_((torch.rand(model.gates.shape, generator=g) > 0.4).float())


def test_open_gates_give_the_source_models_logits(source) -> None:
    gated = gated_copy(source).eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(**padded()).logits, source(**padded()).logits, rtol=0, atol=1e-5)
    gated.config.hard_gates = True  # nothing to drop: the hard form is the source model too
    with torch.no_grad():
        torch.testing.assert_close(gated(**padded()).logits, source(**padded()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_gates_predict_the_same_soft_and_hard(source, seed: int) -> None:
    gated = gated_copy(source).eval()
    random_binary_gates(gated, seed)
    with torch.no_grad():
        soft = gated(**padded(seed=seed)).logits
        gated.config.hard_gates = True
        hard = gated(**padded(seed=seed)).logits
        full = source(**padded(seed=seed)).logits
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-5)
    assert not torch.allclose(hard, full, atol=1e-3)  # the gates did drop tokens


def test_straight_through_trains_what_inference_runs(source) -> None:
    """Gates anywhere in [0, 1]: the straight-through forward predicts as the hard form, and the gradient
    still reaches every gate a real token's rank uses, including gates below one half."""
    gated = gated_copy(source, straight_through=True).eval()
    with torch.no_grad():
        gated.gates.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    trained = gated(**padded()).logits
    trained.sum().backward()
    gated.config.hard_gates = True
    with torch.no_grad():
        torch.testing.assert_close(gated(**padded()).logits, trained.detach(), rtol=0, atol=1e-5)
    grad = gated.gates.grad
    assert grad[0, 1:9].ne(0).all()  # first layer: every rank of the 9-token input had a gradient
    assert grad[:, 0].eq(0).all() and grad[:, 14:].eq(0).all()  # [CLS] fixed; no input reaches rank 14


def test_cls_is_never_dropped_and_padding_never_kept(source) -> None:
    gated = gated_copy(source, hard_gates=True).eval()
    with torch.no_grad():
        gated.gates.zero_()  # every gate off: only [CLS] may survive
    assert gated.keep_mask()[:, 0].all() and not gated.keep_mask()[:, 1:].any()
    assert kept_lengths(gated.keep_mask(), 9) == [9, 1, 1, 1]
    with torch.no_grad():  # [CLS] alone after the first layer still gives the soft form's prediction
        hard = gated(**padded()).logits
        gated.config.hard_gates = False
        torch.testing.assert_close(gated(**padded()).logits, hard, rtol=0, atol=1e-5)
    # padding: an input padded in a batch keeps the same tokens as the input alone, in every layer
    random_binary_gates(gated)
    gated.config.hard_gates = True
    batch = padded()
    with torch.no_grad():
        alone = gated(**{k: v[2:3, :4] for k, v in batch.items()}).logits[0]
        torch.testing.assert_close(gated(**batch).logits[2], alone, rtol=0, atol=1e-5)
    lengths = kept_lengths(gated.keep_mask(), 4)
    assert lengths[0] == 4 and all(1 <= n <= 4 for n in lengths)  # counted on its 4 real tokens, not 14


def test_hard_form_keeps_the_most_attended_tokens(source) -> None:
    """With only [CLS] and rank 1 kept, the kept token is the one the first layer attends to most."""
    gated = gated_copy(source, hard_gates=True).eval()
    with torch.no_grad():
        gated.gates.zero_()
        gated.gates[:, 1] = 1.0
    assert kept_lengths(gated.keep_mask(), 10) == [10, 2, 2, 2]
    with torch.no_grad():  # gates beyond rank 1 could not matter: switching them on below 0.5 changes nothing
        before = gated(**padded()).logits
        gated.gates[:, 2:] = 0.49
        torch.testing.assert_close(gated(**padded()).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("start", [0.4, 0.6])
def test_bimodal_gradient_pushes_gates_to_the_nearer_end(start: float) -> None:
    gates = torch.full((2, 10), start, requires_grad=True)
    bimodal_term(gates, 10).backward()
    step = -gates.grad[:, 1:]  # gradient descent moves the gates this way
    assert (step < 0).all() if start < 0.5 else (step > 0).all()
    assert (gates.grad[:, 0] == 0).all()  # [CLS]'s gate is not a choice


def test_mass_counts_only_ranks_real_tokens_hold() -> None:
    gates = torch.ones(2, 10, requires_grad=True)
    costs = torch.tensor([0.5, 1.0])
    mass_term(gates, torch.tensor([4, 6]), costs, "length", 10).backward()
    grad = gates.grad
    assert (grad[:, 6:] == 0).all() and (grad[:, 0] == 0).all() and (grad[:, 4:6] > 0).all()
    # ranks 1-3 hold real tokens of both inputs, 4-5 of the longer one only
    assert (grad[:, 1:4].amin(1) > grad[:, 4:6].amax(1)).all()
    assert torch.allclose(grad[1], 2 * grad[0])  # c_j weighs the layers
    positions = torch.ones(2, 10, requires_grad=True)
    mass_term(positions, torch.tensor([4, 6]), costs, "positions", 10).backward()
    assert (positions.grad[:, 1:] > 0).all()


def test_power_bert_retention_is_monotone_prefix() -> None:
    gates = torch.zeros(3, 8)
    gates[0, :6], gates[1, :7], gates[2, :2] = 1.0, 1.0, 0.6
    kept = retention(gates, 8)
    assert kept == [6, 6, 1]  # never more than the layer before; round(1.2) = 1
    assert prefix_gates(kept, 10).sum(1).tolist() == [6.0, 6.0, 1.0]


def test_flops_count_the_kept_lengths(source) -> None:
    gated = gated_copy(source)
    keep = gated.keep_mask()
    assert gated_flops(gated.config, kept_lengths(keep, 12)) == subnetwork_flops(gated.config, 1.0, 1.0, 12)
    random_binary_gates(gated)
    budget = token_budget(gated.config, gated.keep_mask(), [5, 12, 20])
    assert budget["flops_reduction"] > 1 and budget["kept_per_layer"][0] == pytest.approx(37 / 3, abs=1e-3)


def test_flops_count_what_the_hard_form_runs(source) -> None:
    """gated_flops is the hard form's encoder matmuls, counted by torch on one real run: what the layers keep
    decides where each matmul runs (beside them: the ranking's einsum, the pooler and the classifier)."""
    from torch.utils.flop_counter import FlopCounterMode

    gated = gated_copy(source, hard_gates=True).eval()
    random_binary_gates(gated, 1)
    cfg, n = gated.config, 11
    lengths = kept_lengths(gated.keep_mask(), n)
    assert lengths[1] < n  # the first layer drops tokens: the case the count could get wrong
    ids = torch.randint(5, cfg.vocab_size, (1, n))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gated(input_ids=ids, attention_mask=torch.ones_like(ids))
    ranking = sum(2 * t * t for t in lengths[:-1])  # torch's einsum sums the heads first, then one bmm
    head = 2 * cfg.hidden_size * (cfg.hidden_size + cfg.num_labels)
    assert counter.get_total_flops() == gated_flops(cfg, lengths) + ranking + head


def test_gates_on_a_dynabert_subnetwork(source) -> None:
    """width x depth x length: a gated model on an extracted sub-network keeps its logits with open gates."""
    sub = extract_subnetwork(source, 0.5, 0.67).eval()
    gated = gated_copy(sub).eval()
    with torch.no_grad():
        torch.testing.assert_close(gated(**padded()).logits, sub(**padded()).logits, rtol=0, atol=1e-5)


def test_export_reloads_as_remote_code_and_onnx(source, tmp_path: Path) -> None:
    gated = gated_copy(source, hard_gates=True).eval()
    random_binary_gates(gated)
    mark_remote(gated)
    gated.save_pretrained(tmp_path)
    for name, text in remote_code().items():
        (tmp_path / name).write_text(text)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__ != GatedBertForSequenceClassification.__module__  # the exported copy
    batch = padded(n=3, length=20, seed=5)  # longer than the export's example inputs: dynamic length
    with torch.no_grad():
        want = gated(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=1e-6)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    np.testing.assert_allclose(onnx_logits(path, batch), want.numpy(), atol=1e-4)


def test_stages_end_to_end(project: Path, this_machine: None) -> None:
    """data -> teacher -> gates, powerbert -> their measurements -> select, through the runner."""
    # six steps: gates fast enough to cross one half within them
    sets = [f"{s}.{k}" for s in ("gates", "powerbert")
            for k in ("batch_size=8", "learning_rate=1e-3", "gate_learning_rate=0.2")]  # fmt: skip
    params = load_params(
        project / "params.yaml", [*sets, "gates.lambdas=[0.0, 2.0]", "powerbert.lambdas=[2.0]"]
    )
    layout = Layout(project)
    assert flow_stages("gates") == ["data", "teacher", "gates", "powerbert", "gates_eval", "powerbert_eval",
                                    "select"]  # fmt: skip
    for name in ("data", "teacher", "gates", "powerbert", "gates_eval", "powerbert_eval"):
        run_stage(name, params, layout)
    metrics = json.loads((project / "metrics" / "gates.json").read_text())
    none, strong = (json.loads((layout.out("gates") / n / "metrics.json").read_text()) for n in ("l0", "l2"))
    assert none["flops_reduction"] == pytest.approx(1.0, abs=0.05) and strong["flops_reduction"] > 1.05
    assert (
        metrics["l2.score"] == strong["score"]
        and len(json.loads((layout.out("gates") / "l2" / "gates.json").read_text())) == 1
    )  # one epoch: one snapshot
    power = json.loads((layout.out("powerbert") / "l2" / "metrics.json").read_text())
    assert power["retention"] == sorted(power["retention"], reverse=True)
    run_stage("select", params, layout)
    merged = json.loads((layout.out("select") / "results.json").read_text())
    assert {"gates", "powerbert"} <= set(merged["methods"])
    for entry in (e for e in merged["profiles"] if e["status"] == "measured"):
        assert {"gates/l0", "gates/l2", "powerbert/l2"} <= {r["candidate"] for r in entry["rows"]}


def test_gates_on_a_dynabert_cell_end_to_end(
    project: Path, this_machine: None, stand_in_training: None
) -> None:
    """gates_dynabert cuts the cell from depth_kd's model, scores it as the source, gates it per λ, and its
    measurement lists each cell and λ at the cell's width and depth; a cell outside the grid is refused."""
    import shutil

    from dynaflow.config import ConfigError
    from dynaflow.core.artifacts import write_manifest

    sets = [f"gates.{k}" for k in ("batch_size=8", "learning_rate=1e-3", "gate_learning_rate=0.2")]
    cells = ["gates_dynabert.subnetworks=[[0.5, 0.5]]", "gates_dynabert.lambdas=[0.0, 2.0]"]
    params = load_params(project / "params.yaml", [*sets, *cells])
    layout = Layout(project)
    for name in ("data", "teacher"):
        run_stage(name, params, layout)
    shutil.copytree(layout.out("teacher"), layout.out("depth_kd"))  # the teacher stands in for DynaBERT
    write_manifest(layout.out("depth_kd"), "test")
    outside = load_params(project / "params.yaml", [*sets, "gates_dynabert.subnetworks=[[0.6, 0.5]]"])
    refused = r"gates_dynabert.subnetworks: \(0.6, 0.5\) is not a cell of the trained grid"
    with pytest.raises(ConfigError, match=refused):
        run_stage("gates_dynabert", outside, layout)
    for name in ("gates_dynabert", "gates_dynabert_eval"):
        run_stage(name, params, layout)
    out = layout.out("gates_dynabert")
    none, strong = (json.loads((out / f"w0.5_d0.5-{n}" / "metrics.json").read_text()) for n in ("l0", "l2"))
    assert none["flops_reduction"] == pytest.approx(1.0, abs=0.05) and strong["flops_reduction"] > 1.05
    # The source is the cut cell, not the teacher: half the heads and neurons, half the layers.
    assert none["source_gflops_per_example"] < none["teacher_gflops_per_example"] / 2
    assert 0 <= none["source.score"] <= 1 and (none["width"], none["depth"]) == (0.5, 0.5)
    config = json.loads((out / "w0.5_d0.5-l2" / "config.json").read_text())
    assert config["extracted_subnet"]["width_mult"] == 0.5 and config["num_hidden_layers"] == 1
    results = json.loads((layout.out("gates_dynabert_eval") / "results.json").read_text())
    rows = [r for e in results["profiles"] if e["status"] == "measured" for r in e["rows"]]
    assert {r["candidate"] for r in rows} == {"gates_dynabert/w0.5_d0.5-l0", "gates_dynabert/w0.5_d0.5-l2"}
    assert all(r["width"] == 0.5 and r["depth"] == 0.5 and r["layers"] == 1 for r in rows)


@pytest.mark.parametrize("distil_from", ["teacher", "dynabert", "source"])
def test_gated_cell_distils_from_the_model_named(tmp_path: Path, distil_from: str) -> None:
    """``gates_dynabert.distil_from`` picks the frozen model the gated cell learns from: the teacher,
    DynaBERT's full-size model or the cut cell itself; the student is a copy that trains on its own."""
    from dynaflow.models.backbone import load_elastic
    from stages.gates_dynabert import cell_run_name, source_subnetwork

    teacher_dir, dynabert_dir = tmp_path / "teacher", tmp_path / "depth_kd"
    tiny_elastic(seed=1).save_pretrained(teacher_dir)
    tiny_elastic(seed=2).save_pretrained(dynabert_dir)
    student, frozen = source_subnetwork(dynabert_dir, teacher_dir, (0.5, 0.5), distil_from)
    ids = torch.randint(5, 90, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cell = extract_subnetwork(load_elastic(dynabert_dir).eval(), 0.5, 0.5).eval()
    expected = {"teacher": load_elastic(teacher_dir).eval(), "dynabert": load_elastic(dynabert_dir).eval(),
                "source": cell}[distil_from]  # fmt: skip
    with torch.no_grad():
        logits = frozen(**batch).logits
        torch.testing.assert_close(logits, expected(**batch).logits)
        for other in {"teacher", "dynabert", "source"} - {distil_from}:
            wrong = {"teacher": teacher_dir, "dynabert": dynabert_dir}.get(other)
            wrong_model = load_elastic(wrong).eval() if wrong else cell
            assert not torch.allclose(logits, wrong_model(**batch).logits)
    assert not any(w.requires_grad for w in frozen.parameters())
    assert student.training and all(w.requires_grad for w in student.bert.parameters())
    with torch.no_grad():  # the student starts as the cell (open gates) but shares no weight with the source
        torch.testing.assert_close(student.eval()(**batch).logits, cell(**batch).logits)
        next(student.parameters()).add_(1.0)
        torch.testing.assert_close(frozen(**batch).logits, logits)
    assert cell_run_name((0.5, 0.5), 0.02, distil_from) == f"w0.5_d0.5-l0.02-kd_{distil_from}"
    assert cell_run_name((0.5, 0.5), 0.02, "auto") == "w0.5_d0.5-l0.02"


def test_auto_distils_from_the_better_on_held_out_rows(
    project: Path, stand_in_training: None, tmp_path: Path
) -> None:
    """``distil_from: auto`` picks whichever of the teacher and DynaBERT's full model scores higher on the
    held-out rows (never on dev), so swapping the two models swaps the choice."""
    from dynaflow.data.splits import load_split, write_split
    from dynaflow.models.backbone import load_elastic
    from stages.gates_dynabert import resolve_distil_from

    params, layout = load_params(project / "params.yaml"), Layout(project)
    for name in ("data", "teacher"):
        run_stage(name, params, layout)
    data = layout.out("data")
    held = load_split(data, "heldout")
    write_split(data / "heldout.parquet", held.input_ids, held.token_type_ids, np.ones_like(held.labels))
    dev = load_split(data, "dev")  # dev all 0: a choice made on dev would go the other way
    write_split(data / "dev.parquet", dev.input_ids, dev.token_type_ids, np.zeros_like(dev.labels))

    def always(label: int) -> Path:  # the teacher's weights, its classifier answering ``label`` always
        model = load_elastic(layout.out("teacher"))
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, 5.0] if label else [5.0, 0.0]))
        model.save_pretrained(tmp_path / f"always{label}")
        return tmp_path / f"always{label}"

    right, wrong = always(1), always(0)
    for teacher, dynabert, expected in ((right, wrong, "teacher"), (wrong, right, "dynabert")):
        chosen = resolve_distil_from("auto", {"data": data, "teacher": teacher, "depth_kd": dynabert}, 16)
        assert chosen["distil_from"] == expected
        assert chosen[f"heldout_score.{expected}"] == 1.0
    assert resolve_distil_from("source", {}, 16) == {"distil_from": "source"}
