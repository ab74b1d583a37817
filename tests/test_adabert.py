"""AdaBERT: a genotype forced on the supernet is its derived network, derivation and the efficiency loss
behave, padding changes nothing, exports reload, the teacher runs once, and the stages go through the
shared harness and selection."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from dynaflow.config import load_params
from dynaflow.evaluation.export import export_onnx, onnx_logits
from dynaflow.methods.adabert.candidates import mark_remote, remote_code
from dynaflow.methods.adabert.distill import matched_layers, student_loss
from dynaflow.methods.adabert.genotype import KEPT_EDGES, derive, one_hot, random_genotype, validate
from dynaflow.methods.adabert.modeling_adabert import (
    EDGES,
    OPS,
    PARAMETER_FREE,
    AdaBertConfig,
    AdaBertForSequenceClassification,
    edge_index,
)
from dynaflow.methods.adabert.supernet import AdaBertSupernet, derived_from, efficiency_loss, op_costs
from stages import Layout, flow_stages, run_stage

pytestmark = pytest.mark.usefixtures("single_thread")
K_MAX = 3


def config(pairs: bool = True) -> AdaBertConfig:
    return AdaBertConfig(vocab_size=97, embedding_size=24, max_position_embeddings=40, hidden_size=16,
                         num_labels=2, sentence_pairs=pairs, hidden_dropout_prob=0.0)  # fmt: skip


def batch(n: int = 4, length: int = 14, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 97, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types * mask}


@pytest.fixture(scope="module")
def supernet() -> AdaBertSupernet:
    torch.manual_seed(0)
    net = AdaBertSupernet(config(), K_MAX).eval()
    with torch.no_grad():  # node and state mixes away from uniform: a wrong copy would show
        for name, p in net.named_parameters():
            if "weights" in name:
                p.normal_(0, 1.0)
    return net


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_forced_genotype_in_the_supernet_is_the_derived_network(supernet, seed: int) -> None:
    genotype = random_genotype(np.random.default_rng(seed), K_MAX)
    ops, depth = (torch.from_numpy(a) for a in one_hot(genotype, K_MAX))
    derived = derived_from(supernet, genotype)
    with torch.no_grad():
        single = supernet.layer_logits(batch(), ops, depth, single_path=True)
        every = supernet.layer_logits(batch(), ops, depth, single_path=False)
        mine = derived.layer_logits(**batch())
        out = derived(**batch()).logits
    assert len(mine) == genotype["depth"] == len(single)
    for a, b, c in zip(single, every, mine, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, mine[-1], rtol=0, atol=0)
    # The derived network holds only the kept ops: 6 per cell.
    assert all(len(cell.ops) == KEPT_EDGES for cell in derived.cells)


def test_padding_changes_nothing(supernet) -> None:
    genotype = {"depth": 2, "cell": [[[0, "max_pool3"], [1, "dil_conv7"]], [[1, "avg_pool3"], [2, "conv5"]],
                                     [[0, "identity"], [3, "conv3"]]]}  # fmt: skip
    model = derived_from(supernet, genotype)
    b = batch(length=14)
    with torch.no_grad():
        together = model(**b).logits
        for i in range(4):
            n = int(b["attention_mask"][i].sum())
            alone = model(**{k: v[i : i + 1, :n] for k, v in b.items()}).logits
            torch.testing.assert_close(alone, together[i : i + 1], rtol=0, atol=1e-5)


def test_derivation_keeps_two_edges_per_node_and_the_likeliest_depth() -> None:
    probs = np.full((EDGES, len(OPS)), 0.01)
    probs[:, OPS.index("zero")] = 0.9  # zero is never kept, however likely
    favoured = {edge_index(0, 1): "conv5", edge_index(0, 0): "conv3", edge_index(1, 2): "dil_conv3",
                edge_index(1, 0): "conv7", edge_index(2, 3): "conv3",
                edge_index(2, 1): "dil_conv5"}  # fmt: skip
    for e, op in favoured.items():
        probs[e, OPS.index(op)] = 0.5
    genotype = derive(probs, np.array([0.1, 0.7, 0.2]))
    assert genotype == {"depth": 2, "cell": [[[0, "conv3"], [1, "conv5"]], [[0, "conv7"], [2, "dil_conv3"]],
                                             [[1, "dil_conv5"], [3, "conv3"]]]}  # fmt: skip
    assert validate(genotype, K_MAX) == genotype


def test_parameter_free_cap_guards_against_collapse() -> None:
    probs = np.full((EDGES, len(OPS)), 0.01)
    probs[:, OPS.index("avg_pool3")] = 0.8  # a collapsed search: pooling everywhere
    probs[:, OPS.index("conv3")] = np.linspace(0.1, 0.7, EDGES)  # the runner-up, closer on later edges
    ops = [op for edges in derive(probs, np.ones(2), 1.0)["cell"] for _, op in edges]
    assert ops == ["avg_pool3"] * KEPT_EDGES  # no cap: the collapse stands
    capped = derive(probs, np.ones(2), 0.5)
    ops = [op for edges in capped["cell"] for _, op in edges]
    assert sum(op in PARAMETER_FREE for op in ops) == KEPT_EDGES // 2
    assert [op for edges in derive(probs, np.ones(2), 0.0)["cell"] for _, op in edges] == [
        "conv3"
    ] * KEPT_EDGES
    # The switched edges are those where conv3 came closest: the later nodes.
    assert ops[-1] == "conv3" and ops[0] == "avg_pool3"
    rng = np.random.default_rng(0)
    for _ in range(50):
        cell = random_genotype(rng, K_MAX, 0.0)["cell"]
        assert not any(op in PARAMETER_FREE for edges in cell for _, op in edges)


def test_efficiency_loss_prices_larger_ops_and_deeper_stacks_higher() -> None:
    costs = op_costs(128)
    small = {"depth": 2, "cell": [[[0, "conv3"], [1, "max_pool3"]], [[0, "conv3"], [2, "identity"]],
                                  [[1, "conv3"], [3, "avg_pool3"]]]}  # fmt: skip
    large = {"depth": 2, "cell": [[[0, "conv7"], [1, "dil_conv7"]], [[0, "conv5"], [2, "conv7"]],
                                  [[1, "dil_conv5"], [3, "conv7"]]]}  # fmt: skip

    def loss(genotype: dict, depth: int | None = None) -> float:
        g = genotype | {"depth": depth or genotype["depth"]}
        ops, d = (torch.from_numpy(a) for a in one_hot(g, K_MAX))
        return float(efficiency_loss(ops, d, costs))

    assert loss(large) > loss(small) > 0
    assert loss(small, 3) > loss(small, 1)
    assert costs[OPS.index("zero")] == costs[OPS.index("identity")] == 0 and costs.max() == 1


def test_student_loss_matches_depths_to_teacher_layers_and_weights_right_probes() -> None:
    assert (
        matched_layers(2, 6) == [3, 6] and matched_layers(3, 6) == [2, 4, 6] and matched_layers(4, 6)[-1] == 6
    )
    labels = torch.tensor([0, 1])
    targets = torch.zeros(2, 7, 2)
    targets[:, 3] = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # layer 3's probe is right on both
    targets[:, 6] = torch.tensor([[-5.0, 5.0], [5.0, -5.0]])  # the teacher's logits: wrong on both
    student = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    loss, _ = student_loss(student, labels, targets, gamma=1.0, attentive=True, regression=False)
    loss.backward()
    # Attentive weights: the right probe (depth 1's) dominates, the wrong teacher (depth 2's) barely counts.
    assert student[0].grad.abs().sum() > 100 * student[1].grad.abs().sum()
    student = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    student_loss(student, labels, targets, gamma=1.0, attentive=False, regression=False)[0].backward()
    torch.testing.assert_close(student[0].grad.abs().sum(), student[1].grad.abs().sum())


def test_export_reloads_as_remote_code_and_onnx(supernet, tmp_path: Path) -> None:
    genotype = random_genotype(np.random.default_rng(7), K_MAX)
    model = derived_from(supernet, genotype)
    mark_remote(model)
    model.save_pretrained(tmp_path)
    for name, text in remote_code().items():
        (tmp_path / name).write_text(text)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__ != AdaBertForSequenceClassification.__module__  # the exported copy
    b = batch(n=3, length=20, seed=5)  # longer than the export's example inputs: dynamic length
    with torch.no_grad():
        want = model(**b).logits
        torch.testing.assert_close(loaded(**b).logits, want, rtol=0, atol=0)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    np.testing.assert_allclose(onnx_logits(path, b), want.numpy(), atol=1e-4)


def test_stages_end_to_end(project: Path, this_machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """data -> teacher -> probes -> search -> students -> measurements -> select; the teacher runs only in
    the probes stage."""
    params = load_params(project / "params.yaml")
    layout = Layout(project)
    assert flow_stages("adabert") == ["data", "teacher", "adabert_probes", "adabert_search", "adabert",
                                      "adabert_random", "adabert_eval", "adabert_random_eval",
                                      "select"]  # fmt: skip
    for name in ("data", "teacher", "adabert_probes"):
        run_stage(name, params, layout)
    targets = np.load(layout.out("adabert_probes") / "targets.npz")["layer_targets"]
    train_rows = json.loads((layout.out("data") / "task.json").read_text())["counts"]["train"]
    layers = json.loads((layout.out("teacher") / "config.json").read_text())["num_hidden_layers"]
    assert targets.shape[:2] == (train_rows, layers + 1)  # embeddings, then every layer

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran after the probes stage")

    with monkeypatch.context() as patched:
        patched.setattr(BertForSequenceClassification, "forward", no_teacher)
        for name in ("adabert_search", "adabert", "adabert_random"):
            run_stage(name, params, layout)
    for name in ("adabert_eval", "adabert_random_eval"):
        run_stage(name, params, layout)
    genotype = json.loads((layout.out("adabert_search") / "genotype.json").read_text())
    assert validate(genotype, params.adabert.max_cells) == genotype
    history = json.loads((layout.out("adabert_search") / "arch_history.json").read_text())
    assert len(history) == params.adabert_search.epochs
    # Warm-up epoch: the architecture did not move; afterwards it did.
    assert np.allclose(history[0]["op_probs"], 1 / len(OPS), atol=1e-4)
    assert not np.allclose(history[-1]["op_probs"], 1 / len(OPS), atol=1e-4)
    saved = AdaBertForSequenceClassification.from_pretrained(layout.out("adabert") / "searched")
    assert saved.config.genotype == genotype
    summary = json.loads((layout.out("adabert_random") / "summary.json").read_text())
    scores = {name: a["heldout_score"] for name, a in summary["architectures"].items()}
    assert summary["chosen"] == max(scores, key=scores.get) and len(scores) == 2
    run_stage("select", params, layout)
    merged = json.loads((layout.out("select") / "results.json").read_text())
    assert {"adabert", "adabert_random"} <= set(merged["methods"])
    for entry in (e for e in merged["profiles"] if e["status"] == "measured"):
        assert {"adabert/searched", f"adabert_random/{summary['chosen']}"} <= {
            r["candidate"] for r in entry["rows"]
        }
    # The searched student ships through the shared export: remote code, reloaded as a user without
    # dynaflow would (trust_remote_code), and ONNX, both against the model's own logits.
    from dynaflow.evaluation.export import export_candidate, reference_batch
    from dynaflow.methods.adabert.candidates import student

    out = project / "export"
    summary = export_candidate(student(layout.out("adabert") / "searched"), out,
                               tokenizer_dir=layout.out("data") / "tokenizer",
                               batch=reference_batch(layout.out("data"), 0), onnx=True)  # fmt: skip
    assert summary["diff_hf"] <= 1e-4 and summary["diff_onnx"] <= 1e-4
    assert {"modeling_adabert.py", "model.onnx"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    ("genotype", "fragment"),
    [
        ({"depth": 0, "cell": []}, "depth must be an integer in 1..3"),
        ({"depth": 1, "cell": [[[0, "conv3"]]]}, "must list 3 nodes"),
        ({"depth": 1, "cell": [[[2, "conv3"]], [], []]}, "node 0: edge [2, 'conv3'] must be [source in 0..1"),
        ({"depth": 1, "cell": [[[0, "conv4"]], [], []]}, "op in conv3"),
        ([1, 2], "a genotype is"),
    ],
)
def test_a_malformed_genotype_is_named(genotype: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        validate(genotype, K_MAX)
