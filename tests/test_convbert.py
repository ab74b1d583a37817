"""ConvBERT students: the surgery keeps the teacher's function, the export is plain transformers and ONNX,
padding leaks only through the convolution branch, and the stage runs through the shared harness."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, ConvBertForSequenceClassification
from transformers.activations import ACT2FN

from dynaflow.config import ConfigError, load_params
from dynaflow.data.splits import TokenizedSplit
from dynaflow.evaluation.export import export_onnx, onnx_logits
from dynaflow.methods.convbert.model import build_student, group_neurons, new_parameter_names
from stages import Layout, flow_stages, run_stage
from stages.convbert import padding_effect
from tests.conftest import make_tiny_backbone

HEADS, HIDDEN = 4, 32


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> BertForSequenceClassification:
    path = make_tiny_backbone(
        tmp_path_factory.mktemp("tiny-bert-convbert"), layers=2, heads=HEADS, hidden=HIDDEN
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with torch.no_grad():  # biases away from zero, so that a bias copied wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.classifier.weight.normal_(0, 1.0)  # logits of a trained model's size, not the init's 1e-3
    return model


def kept_heads_reference(teacher: BertForSequenceClassification) -> BertForSequenceClassification:
    """The teacher with only its first half of heads (the others' output columns zeroed) and the ConvBERT
    head's activation (GELU, config.hidden_act) where BERT's pooler has tanh."""
    ref = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in ref.bert.encoder.layer:
            layer.attention.output.dense.weight[:, HIDDEN // 2 :] = 0
    ref.bert.pooler.activation = ACT2FN[teacher.config.hidden_act]
    return ref


def unpadded(n: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 30, (n, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def padded() -> dict[str, torch.Tensor]:
    batch = unpadded(4, 12)
    batch["attention_mask"][1, 7:] = batch["attention_mask"][3, 3:] = 0
    batch["input_ids"][batch["attention_mask"] == 0] = 0
    return batch


def test_fresh_student_computes_the_teacher_with_its_kept_heads(teacher) -> None:
    student = build_student(teacher, kernel_size=3, groups=1)
    ref = kept_heads_reference(teacher)
    with torch.no_grad():
        got = student(**unpadded(), output_hidden_states=True)
        want = ref(**unpadded(), output_hidden_states=True)
        full = teacher(**unpadded()).logits
    assert len(got.hidden_states) == len(want.hidden_states) == teacher.config.num_hidden_layers + 1
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(got.logits, full, atol=1e-3)  # dropping heads did change the function
    assert student.config.pad_token_id == 0 and student.config.num_groups == 1


def test_only_the_convolution_branch_is_new(teacher) -> None:
    a, b = build_student(teacher, groups=1, seed=0), build_student(teacher, groups=1, seed=1)
    new = set(new_parameter_names(a))
    per_layer = {n.split("attention.self.")[1] for n in new}
    assert per_layer == {
        "key_conv_attn_layer.depthwise.weight", "key_conv_attn_layer.pointwise.weight",
        "key_conv_attn_layer.bias",
        "conv_kernel_layer.weight", "conv_kernel_layer.bias", "conv_out_layer.weight", "conv_out_layer.bias",
    }  # fmt: skip
    assert len(new) == 7 * teacher.config.num_hidden_layers
    pb = dict(b.named_parameters())
    seeded = {n for n, p in a.named_parameters() if not torch.equal(p, pb[n])}
    # Everything else is copied from the teacher: the seed moves the randomly initialised parameters only.
    assert seeded and seeded <= new
    assert {n for n in new if "conv_out_layer" in n}.isdisjoint(seeded)  # zero in both
    for n in new:
        if "conv_out_layer" in n:
            assert not a.get_parameter(n).any(), n


def test_grouped_ffn_keeps_the_block_diagonal_of_the_best_neuron_order(teacher) -> None:
    layer = teacher.bert.encoder.layer[0]
    w_in, w_out = layer.intermediate.dense.weight.detach(), layer.output.dense.weight.detach()
    order = group_neurons(w_in, w_out, 2)
    assert sorted(order.tolist()) == list(range(w_in.shape[0]))  # a permutation

    def kept(perm: torch.Tensor) -> float:
        i, h = w_in.shape[0] // 2, w_in.shape[1] // 2
        a, b = w_in[perm], w_out[:, perm]
        blocks = [(slice(g * i, (g + 1) * i), slice(g * h, (g + 1) * h)) for g in range(2)]
        return float(sum(a[n, d].pow(2).sum() + b[d, n].pow(2).sum() for n, d in blocks))

    assert kept(order) > kept(torch.arange(w_in.shape[0]))
    student = build_student(teacher, groups=2)
    grouped = student.convbert.encoder.layer[0].intermediate.dense.weight  # (groups, in/g, out/g)
    i = w_in.shape[0] // 2
    torch.testing.assert_close(grouped[1], w_in[order][i:, HIDDEN // 2 :].t())
    dense = build_student(teacher, groups=1)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in dense.parameters())


def test_saved_student_loads_with_plain_transformers_and_exports_to_onnx(teacher, tmp_path: Path) -> None:
    student = build_student(teacher, kernel_size=3, groups=2)
    with torch.no_grad():  # a trained-looking student: the convolution branch in use
        for n in new_parameter_names(student):
            student.get_parameter(n).normal_(0, 0.2)
    student.save_pretrained(tmp_path / "hf")
    loaded = ConvBertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = student(**padded()).logits
        torch.testing.assert_close(loaded(**padded()).logits, want, rtol=0, atol=1e-6)
    onnx = export_onnx(loaded, tmp_path / "model.onnx")
    np.testing.assert_allclose(onnx_logits(onnx, padded()), want.numpy(), rtol=0, atol=1e-4)


def split_of(batch: dict[str, torch.Tensor]) -> TokenizedSplit:
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    rows = [ids[mask.bool()].numpy() for ids, mask in pairs]
    return TokenizedSplit(rows, [np.zeros_like(r) for r in rows], np.zeros(len(rows), dtype=np.int64))


def test_padding_reaches_predictions_only_through_the_convolution_branch(teacher) -> None:
    batch = padded()
    batch["attention_mask"][3, 2:] = 0  # two tokens: [CLS] itself is within the window of the padding
    batch["input_ids"][batch["attention_mask"] == 0] = 0
    split = split_of(batch)
    fresh = build_student(teacher, kernel_size=5)  # convolution output exactly zero: padding is masked
    assert padding_effect(fresh, split)["padding.max_logit_diff"] < 1e-5
    with torch.no_grad():
        for n in new_parameter_names(fresh):
            fresh.get_parameter(n).normal_(0, 0.2)
    assert padding_effect(fresh, split)["padding.max_logit_diff"] > 1e-3  # the leak the stage reports


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("convbert.kernel_size=4", "kernel_size must be odd"), ("convbert.groups=[2,2]", "distinct")],
)
def test_config_validation(project: Path, override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_params(project / "params.yaml", [override])


def test_odd_head_count_is_refused_with_the_reason(teacher) -> None:
    odd = copy.deepcopy(teacher.config)
    odd.num_attention_heads = 1
    with pytest.raises(ConfigError, match="keeps half the heads"):
        build_student(BertForSequenceClassification(odd))


def test_stage_end_to_end(project: Path, this_machine: None) -> None:
    """data -> teacher -> rewire -> convbert -> convbert_eval -> select through the runner, both students."""
    params = load_params(
        project / "params.yaml",
        ["convbert.batch_size=8", "convbert.learning_rate=1e-3"],
    )
    layout = Layout(project)
    assert flow_stages("convbert") == ["data", "teacher", "rewire", "convbert", "convbert_eval", "select"]
    for name in ("data", "teacher", "rewire", "convbert", "convbert_eval"):
        run_stage(name, params, layout)
    metrics = json.loads((project / "metrics" / "convbert.json").read_text())
    for g in (1, 2):
        out = layout.out("convbert") / f"g{g}"
        student = ConvBertForSequenceClassification.from_pretrained(out)
        assert student.config.num_groups == g and student.config.pad_token_id == 0
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["steps"] == 48 // 8 and 0 < saved["selected_step"] <= saved["steps"]
        assert metrics[f"g{g}.score"] == saved["score"] and f"g{g}.padding.max_logit_diff" in metrics
    assert metrics["g2.parameters"] < metrics["g1.parameters"] < metrics["g1.teacher_parameters"]
    results = json.loads((layout.out("convbert_eval") / "results.json").read_text())
    assert "held-out" in results["checkpoints"]["convbert"]
    measured = [e for e in results["profiles"] if e["status"] == "measured"]
    assert measured and all(
        {r["candidate"] for r in e["rows"]} == {"convbert/g1", "convbert/g2"} for e in measured
    )
    rows = [r for e in measured for r in e["rows"]]
    assert all(r["groups"] in (1, 2) and r["heads"] == HEADS // 2 for r in rows)
    # selection gathers the students like any method's candidates: on every profile's front and report
    run_stage("select", params, layout)
    merged = json.loads((layout.out("select") / "results.json").read_text())
    assert "convbert" in merged["methods"]
    for entry in (e for e in merged["profiles"] if e["status"] == "measured"):
        assert {"convbert/g1", "convbert/g2"} <= {r["candidate"] for r in entry["rows"]}, entry["profile"]
    assert "convbert/g1" in (layout.out("select") / "report.md").read_text()
